# Boot images for Forgejo Actions runner hosts, and the script that publishes them as a
# Forgejo release. docs/RUNNER_IMAGES.md is the operators' runbook.
{
  description = "Forgejo Actions runner boot images (netboot, ISO, SD card) and their release script";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-26.05";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;

      forEachSystem =
        f:
        lib.genAttrs [
          "x86_64-linux"
          "aarch64-linux"
        ] (system: f nixpkgs.legacyPackages.${system});

      # How each image boots. These take nixpkgs' image modules without the
      # installation-device profile that nixpkgs' installers add, which would bring
      # passwordless root, console autologin and root login over SSH.
      media = {
        netboot =
          { modulesPath, ... }:
          {
            imports = [ (modulesPath + "/installer/netboot/netboot.nix") ];
            hardware.enableAllHardware = true;
          };
        iso =
          { modulesPath, ... }:
          {
            imports = [ (modulesPath + "/installer/cd-dvd/iso-image.nix") ];
            isoImage.makeEfiBootable = true;
            isoImage.makeUsbBootable = true;
            hardware.enableAllHardware = true;
          };
        sd =
          { modulesPath, ... }:
          {
            imports = [ (modulesPath + "/installer/sd-card/sd-image-aarch64.nix") ];
          };
      };

      runnerSystem =
        system: bootMedia:
        lib.nixosSystem {
          modules = [
            bootMedia
            self.nixosModules.runner
            {
              nixpkgs.hostPlatform = system;
              system.stateVersion = "26.05";
            }
          ];
        };

      # nixos/release.nix's makeNetboot: kernel, initrd and iPXE script in one directory,
      # each listed in nix-support/hydra-build-products as `file <type> <path>`.
      netbootBundle =
        nixos:
        let
          inherit (nixos.config.system.build) kernel netbootRamdisk netbootIpxeScript;
          kernelFile = nixos.config.system.boot.loader.kernelFile;
        in
        nixos.pkgs.symlinkJoin {
          name = "netboot";
          paths = [
            netbootRamdisk
            kernel
            netbootIpxeScript
          ];
          postBuild = ''
            mkdir -p $out/nix-support
            echo "file ${kernelFile} ${kernel}/${kernelFile}" >> $out/nix-support/hydra-build-products
            echo "file initrd ${netbootRamdisk}/initrd" >> $out/nix-support/hydra-build-products
            echo "file ipxe ${netbootIpxeScript}/netboot.ipxe" >> $out/nix-support/hydra-build-products
          '';
          preferLocalBuild = true;
        };

      # Runs the release script from this flake's own source, in the caller's directory.
      releaseBoot =
        pkgs:
        pkgs.writeShellApplication {
          name = "release-boot";
          runtimeInputs = [ pkgs.deno ];
          text = ''
            exec deno run --allow-all --frozen --config ${self}/deno.json ${self}/scripts/release-boot.ts "$@"
          '';
        };
    in
    {
      # A Forgejo Actions runner host: forgejo-runner with the `nix` label running jobs on
      # the host, Nix with flakes, and SSH with keys only. Import it and set runnerHost.*
      # (and anything else) in your own modules to extend it.
      nixosModules.runner =
        {
          config,
          lib,
          pkgs,
          ...
        }:
        let
          cfg = config.runnerHost;
          placeholderUrl = "https://forgejo.example.org";
          placeholderWarning = "runnerHost.forgejoUrl is still ${placeholderUrl}: set it to your Forgejo instance, or the runner cannot register.";
        in
        {
          options.runnerHost = {
            forgejoUrl = lib.mkOption {
              type = lib.types.str;
              default = placeholderUrl;
              description = "Base URL of the Forgejo instance the runner registers with.";
            };
            labels = lib.mkOption {
              type = lib.types.listOf lib.types.str;
              default = [ "nix:host" ];
              description = ''
                Labels the runner registers with. `nix:host` offers the label `nix` and runs
                its jobs directly on this host, where Nix with flakes is installed. A
                `:docker://` label would also need virtualisation.docker or podman.
              '';
            };
            tokenFile = lib.mkOption {
              type = lib.types.str;
              default = "/var/lib/forgejo-runner/token";
              description = ''
                Where the booted host reads its registration token: an environment file with
                the line `TOKEN=<registration token>`. A string, not a Nix path, so the token
                never enters the Nix store or an image. The runner starts once the file exists.
              '';
            };
            authorizedKeys = lib.mkOption {
              type = lib.types.listOf lib.types.str;
              default = [ ];
              description = "Public SSH keys that may log in as root; passwords are refused.";
            };
          };

          config = {
            assertions = [
              {
                assertion = !lib.hasPrefix builtins.storeDir cfg.tokenFile;
                message = "runnerHost.tokenFile is in the Nix store, where the token would be world-readable and part of the image: point it at a file on the host, such as /var/lib/forgejo-runner/token.";
              }
            ];
            warnings = lib.optional (cfg.forgejoUrl == placeholderUrl) placeholderWarning;

            nix.settings.experimental-features = [
              "nix-command"
              "flakes"
            ];

            services.openssh = {
              enable = true;
              settings = {
                PasswordAuthentication = false;
                KbdInteractiveAuthentication = false;
                PermitRootLogin = "prohibit-password";
              };
            };
            users.users.root.openssh.authorizedKeys.keys = cfg.authorizedKeys;

            services.gitea-actions-runner = {
              package = pkgs.forgejo-runner;
              instances.forgejo = {
                enable = true;
                name = config.networking.hostName;
                url = cfg.forgejoUrl;
                inherit (cfg) labels tokenFile;
                # The module's default host packages, plus nix for `nix develop` in jobs.
                hostPackages = [
                  pkgs.bash
                  pkgs.coreutils
                  pkgs.curl
                  pkgs.gawk
                  pkgs.gitMinimal
                  pkgs.gnused
                  pkgs.nodejs
                  pkgs.wget
                  config.nix.package
                ];
              };
            };

            # The token arrives after boot on netboot and ISO hosts, whose /var is in RAM:
            # skip the runner until the file exists, then start it when it appears.
            systemd.services.gitea-runner-forgejo.unitConfig.ConditionPathExists = cfg.tokenFile;
            systemd.paths.gitea-runner-forgejo-token = {
              wantedBy = [ "multi-user.target" ];
              pathConfig = {
                PathExists = cfg.tokenFile;
                Unit = "gitea-runner-forgejo.service";
              };
            };
          };
        };

      nixosConfigurations = {
        runner-x86_64-netboot = runnerSystem "x86_64-linux" media.netboot;
        runner-x86_64-iso = runnerSystem "x86_64-linux" media.iso;
        runner-aarch64-sd = runnerSystem "aarch64-linux" media.sd;
      };

      packages = {
        x86_64-linux = {
          netboot = netbootBundle self.nixosConfigurations.runner-x86_64-netboot;
          iso = self.nixosConfigurations.runner-x86_64-iso.config.system.build.isoImage;
        };
        aarch64-linux.sd = self.nixosConfigurations.runner-aarch64-sd.config.system.build.sdImage;
      };

      devShells = forEachSystem (pkgs: {
        default = pkgs.mkShell {
          packages = [
            pkgs.deno
            pkgs.nix
          ];
        };
      });

      apps = forEachSystem (pkgs: {
        default = {
          type = "app";
          program = "${releaseBoot pkgs}/bin/release-boot";
          meta.description = "Build the runner boot images and publish them as a Forgejo release";
        };
      });

      formatter = forEachSystem (pkgs: pkgs.nixfmt);
    };
}

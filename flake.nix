# Boot images for Forgejo Actions runner hosts, and the script that publishes them as a
# Forgejo release. docs/RUNNER_IMAGES.md is the operators' runbook; site.nix holds the fleet's
# settings.
{
  description = "Forgejo Actions runner boot images (netboot, ISO, SD card, kexec) and their release script";

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
      # passwordless root, console autologin and root login over SSH. That profile also
      # enables redistributable firmware (through installer/scan/not-detected.nix); the runner
      # module enables it again, since real NICs and storage controllers need it.
      media = {
        netboot =
          { modulesPath, ... }:
          {
            imports = [
              (modulesPath + "/installer/netboot/netboot.nix")
              self.nixosModules.hostnameFromKernelCommandLine
            ];
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

      # An image meant for publishing: the fleet's settings from site.nix, and assertions that
      # refuse placeholders.
      runnerSystem =
        system: bootMedia: extraModules:
        lib.nixosSystem {
          modules = [
            bootMedia
            self.nixosModules.runner
            ./nix/boot-server.nix
            ./site.nix
            {
              nixpkgs.hostPlatform = system;
              system.stateVersion = "26.05";
              runnerHost.publish = true;
            }
          ]
          ++ extraModules;
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

      # One file to reinstall or rescue a running Linux host without PXE, in the shape
      # nix-community/nixos-images publishes: the netboot module's kexecTree (kernel, initrd,
      # kexec-boot) plus a static kexec, so the host needs nothing but tar and zstd.
      # nixpkgs' own system.build.kexecTarball packs only kexec-boot's closure under
      # /kexec_nixos, without the kernel and initrd that script loads (nixpkgs PR 410511).
      kexecTarball =
        nixos:
        let
          inherit (nixos) pkgs;
          system = pkgs.stdenv.hostPlatform.system;
          name = "nixos-kexec-${system}";
        in
        pkgs.runCommand "${name}.tar.zst" { } ''
          mkdir -p ${name}
          cp -L ${nixos.config.system.build.kexecTree}/* ${name}/
          cp ${pkgs.pkgsStatic.kexec-tools}/bin/kexec ${name}/kexec
          tar --sort=name --mtime=@1 --owner=0 --group=0 --numeric-owner --mode=u+w -c ${name} \
            | ${pkgs.zstd}/bin/zstd -10 > $out
        '';

      # The boot test: the x86_64 netboot image booted over PXE in a VM, as nixpkgs'
      # nixos/tests/boot.nix does (makeNetbootTest), with a dummy credential placed after boot.
      # The runner cannot reach a server there; the test sees the configuration rendered from
      # the credential and forgejo-runner daemon started on it.
      bootTestCredential = {
        url = "https://forgejo.test";
        uuid = "33834eef-e758-48c4-a676-1745426747aa";
        token = "d4fe2db46a4c6bdc434a9ce3378d9a1489c1b30e";
      };
      bootTestSystem = runnerSystem "x86_64-linux" media.netboot [
        (
          { modulesPath, ... }:
          {
            imports = [ (modulesPath + "/testing/test-instrumentation.nix") ];
            runnerHost.forgejoUrl = lib.mkForce bootTestCredential.url;
            runnerHost.authorizedKeys = lib.mkForce [
              "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBootTestKeyNotForUse runner-boots"
            ];
          }
        )
      ];
      runnerBoots =
        pkgs:
        let
          qemu-common = import (nixpkgs + "/nixos/lib/qemu-common.nix") {
            inherit (pkgs) lib stdenv;
          };
          bundle = netbootBundle bootTestSystem;
          startCommand = lib.concatStringsSep " " [
            (qemu-common.qemuBinary pkgs.qemu_test)
            "-m 3072"
            "-netdev user,id=net0,tftp=${bundle},bootfile=netboot.ipxe"
            "-device virtio-net-pci,netdev=net0"
            "-boot order=n"
          ];
          inherit (bootTestSystem.config.runnerHost) credentialFile;
          credentialLines = lib.concatMapStrings (name: "${name}=${bootTestCredential.${name}}\\n") [
            "url"
            "uuid"
            "token"
          ];
        in
        pkgs.testers.runNixOSTest {
          name = "runner-boots";
          nodes = { };
          testScript = ''
            machine = create_machine("${startCommand}")
            machine.start()
            machine.wait_for_unit("multi-user.target")
            machine.succeed("install -d -m 700 ${dirOf credentialFile}")
            machine.succeed("umask 077 && printf '${credentialLines}' > ${credentialFile}")
            machine.wait_until_succeeds("test -s /run/forgejo-runner/config.yaml")
            machine.succeed("grep -F 'uuid: \"${bootTestCredential.uuid}\"' /run/forgejo-runner/config.yaml")
            machine.succeed("test \"$(stat -c %a /run/forgejo-runner/config.yaml)\" = 600")
            machine.wait_until_succeeds("test \"$(systemctl show -P ExecMainStartTimestampMonotonic forgejo-runner)\" != 0")
            machine.shutdown()
          '';
        };

      # The iPXE a runner host chains to, when site.nix names the CA that signs releases for iPXE
      # (nix/boot-server.nix; docs/PXE.md, "Verified boot"). Without one there is none to offer.
      trustedIpxe =
        let
          inherit (self.nixosConfigurations.runner-x86_64-netboot) config;
        in
        lib.optionalAttrs (config.bootServer.trustedCa != null) {
          ipxe-efi = config.system.build.trustedIpxe.efi;
          ipxe-undionly = config.system.build.trustedIpxe.undionly;
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
      nixosModules = {
        runner = import ./nix/runner.nix;

        # nix-community/nixos-images' netboot module: every machine booted from one netboot
        # image gets its own name from `hostname=` on the kernel command line (the iPXE script
        # passes ${cmdline} through), else "nixos".
        hostnameFromKernelCommandLine =
          { lib, pkgs, ... }:
          let
            setHostname = pkgs.writeShellApplication {
              name = "hostname-from-cmdline";
              text = builtins.readFile ./nix/hostname-from-cmdline.sh;
            };
          in
          {
            networking.hostName = "";
            system.build.hostnameFromCmdline = setHostname;
            system.activationScripts.hostname = lib.mkForce ''
              ${setHostname}/bin/hostname-from-cmdline /proc/cmdline /proc/sys/kernel/hostname
            '';
          };
      };

      nixosConfigurations = {
        runner-x86_64-netboot = runnerSystem "x86_64-linux" media.netboot [ ];
        runner-x86_64-iso = runnerSystem "x86_64-linux" media.iso [ ];
        runner-aarch64-netboot = runnerSystem "aarch64-linux" media.netboot [ ];
        runner-aarch64-sd = runnerSystem "aarch64-linux" media.sd [ ];
      };

      packages = {
        x86_64-linux = {
          netboot = netbootBundle self.nixosConfigurations.runner-x86_64-netboot;
          kexec = kexecTarball self.nixosConfigurations.runner-x86_64-netboot;
          iso = self.nixosConfigurations.runner-x86_64-iso.config.system.build.isoImage;
        }
        // trustedIpxe;
        aarch64-linux = {
          netboot = netbootBundle self.nixosConfigurations.runner-aarch64-netboot;
          kexec = kexecTarball self.nixosConfigurations.runner-aarch64-netboot;
          sd = self.nixosConfigurations.runner-aarch64-sd.config.system.build.sdImage;
        };
      };

      checks.x86_64-linux.runner-boots = runnerBoots nixpkgs.legacyPackages.x86_64-linux;

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

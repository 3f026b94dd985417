# A Forgejo Actions runner host: forgejo-runner running jobs on the host under per-system
# labels, Nix with flakes, SSH with keys only. The runner's identity and secret come from a
# root-only credential file on the host, rendered into the runner's configuration at every
# start, so one image serves every host and holds no secret.
#
# nixos-26.05 has no services.forgejo-runner (it arrived with 26.11), and its
# services.gitea-actions-runner registers with `forgejo-runner register --token`, which current
# runners deprecate. So this module runs `forgejo-runner daemon` itself, in the shape of
# nixpkgs' later forgejo-runner module: DynamicUser, the credential through LoadCredential.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  cfg = config.runnerHost;
  system = pkgs.stdenv.hostPlatform.system;
  placeholderUrl = "https://forgejo.example.org";

  # The static part of the runner's configuration, one top-level key per line with a JSON
  # value (JSON is YAML); the renderer appends the server section from the credential.
  settings = {
    log = {
      level = "info";
      job_level = "info";
    };
    runner = {
      capacity = 1;
      inherit (cfg) labels;
      timeout = cfg.jobTimeout;
      shutdown_timeout = cfg.jobTimeout;
    };
  };
  settingsFile = pkgs.writeText "forgejo-runner-settings.yaml" (
    lib.concatMapStrings (name: "${name}: ${builtins.toJSON settings.${name}}\n") (
      builtins.attrNames settings
    )
  );

  renderConfig = pkgs.writeShellApplication {
    name = "forgejo-runner-config";
    runtimeInputs = [
      cfg.package
      pkgs.coreutils
    ];
    text = ''
      expected_url=${lib.escapeShellArg cfg.forgejoUrl}
      labels=${lib.escapeShellArg (lib.concatStringsSep "," cfg.labels)}
      settings=${settingsFile}
    ''
    + builtins.readFile ./render-runner-config.sh;
  };
in
{
  options.runnerHost = {
    publish = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = ''
        This configuration is built into an image meant for publishing: evaluation fails while
        forgejoUrl is the placeholder or authorizedKeys is empty. The flake's images set it.
      '';
    };
    forgejoUrl = lib.mkOption {
      type = lib.types.str;
      default = placeholderUrl;
      description = ''
        Base URL of the Forgejo instance the runner connects to. A credential file naming
        another server is refused.
      '';
    };
    labels = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [ "nix-${system}:host" ];
      defaultText = "[ \"nix-<system>:host\" ]";
      description = ''
        Labels the runner offers. `nix-x86_64-linux:host` offers the label
        `nix-x86_64-linux` and runs its jobs directly on this host, where Nix with flakes is
        installed: a workflow's `runs-on` names the architecture it needs.
      '';
    };
    credentialFile = lib.mkOption {
      type = lib.types.str;
      default = "/var/lib/runner-credential/credential";
      description = ''
        The host's root-only credential file: `url=`, `uuid=` and `token=` lines from Forgejo's
        "Create new runner" (or `url=` and `registration_token=` for servers that only hand out
        registration tokens). A string, not a Nix path, so it never enters the Nix store. The
        runner starts once the file exists.
      '';
    };
    credentialDevice = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = "/dev/disk/by-label/runner-cred";
      description = ''
        A small ext4 file system on the host's own disk (or a USB stick) holding the credential
        file, mounted read-only at the credential file's directory when it is present. null: no
        such mount; the file is placed there some other way.
      '';
    };
    storeDevice = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = null;
      example = "/dev/disk/by-label/nix-rw-store";
      description = ''
        Netboot and ISO images: a local disk partition (ext4, formatted on first use) for the
        Nix store's writable layer instead of RAM, so builds of multi-GB images fit. Stage 1
        waits for it, so set it only in images for hosts that have it.
      '';
    };
    authorizedKeys = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [ ];
      description = "Public SSH keys that may log in as root; passwords are refused.";
    };
    jobTimeout = lib.mkOption {
      type = lib.types.str;
      default = "3h";
      description = ''
        The runner's runner.timeout (and shutdown_timeout). Forgejo's [actions]
        ENDLESS_TASK_TIMEOUT (3h by default) stops a job too: keep them equal, and a workflow's
        timeout-minutes below both.
      '';
    };
    package = lib.mkOption {
      type = lib.types.package;
      default = pkgs.forgejo-runner;
      description = "The forgejo-runner package.";
    };
  };

  config = {
    assertions = [
      {
        assertion = !lib.hasPrefix builtins.storeDir cfg.credentialFile;
        message = "runnerHost.credentialFile is in the Nix store, where the token would be world-readable and part of the image: point it at a root-only file on the host, such as /var/lib/runner-credential/credential.";
      }
      {
        assertion = builtins.match "https?://[^\"\\\\[:space:]]+" cfg.forgejoUrl != null;
        message = "runnerHost.forgejoUrl ${builtins.toJSON cfg.forgejoUrl} is not a base URL such as https://git.example.org.";
      }
      {
        assertion = cfg.publish -> cfg.forgejoUrl != placeholderUrl;
        message = "runnerHost.forgejoUrl is still the placeholder ${placeholderUrl}: set your Forgejo's URL in site.nix before building images to publish.";
      }
      {
        assertion = cfg.publish -> cfg.authorizedKeys != [ ];
        message = "runnerHost.authorizedKeys is empty, so nobody could log in to a published image: add your public SSH keys in site.nix.";
      }
    ];

    # Real NICs, storage controllers and CPUs need firmware that nixpkgs' installers bring
    # through their installation-device profile, which these images leave out.
    hardware.enableRedistributableFirmware = lib.mkDefault true;

    nix.settings = {
      experimental-features = [
        "nix-command"
        "flakes"
      ];
      # Collect garbage during a build when free space in the store falls below min-free,
      # until max-free is free: on a netboot host the store's writable layer is RAM.
      min-free = lib.mkDefault (2 * 1024 * 1024 * 1024);
      max-free = lib.mkDefault (8 * 1024 * 1024 * 1024);
    };

    # optionalAttrs rather than mkIf: whether these mounts exist is known from runnerHost alone.
    fileSystems =
      lib.optionalAttrs (cfg.credentialDevice != null) {
        ${dirOf cfg.credentialFile} = {
          device = cfg.credentialDevice;
          fsType = "ext4";
          options = [
            "ro"
            "nofail"
            "x-systemd.device-timeout=5s"
          ];
        };
      }
      # Replaces the tmpfs nixpkgs' netboot and ISO modules put under the store's overlay.
      // lib.optionalAttrs (cfg.storeDevice != null) {
        "/nix/.rw-store" = lib.mkForce {
          device = cfg.storeDevice;
          fsType = "ext4";
          options = [ "defaults" ];
          autoFormat = true;
          neededForBoot = true;
        };
      };

    services.openssh = {
      enable = true;
      settings = {
        PasswordAuthentication = false;
        KbdInteractiveAuthentication = false;
        PermitRootLogin = "prohibit-password";
      };
    };
    users.users.root.openssh.authorizedKeys.keys = cfg.authorizedKeys;

    systemd.services.forgejo-runner = {
      description = "Forgejo Actions runner";
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ];
      wantedBy = [ "multi-user.target" ];
      # The credential arrives after boot on a host without a credential disk: skip the runner
      # until the file exists; forgejo-runner-credential.path starts it when it appears.
      unitConfig.ConditionPathExists = cfg.credentialFile;
      environment.HOME = "/var/lib/forgejo-runner";
      # What jobs on the host find on PATH: nixpkgs' runner modules' default host packages,
      # plus nix for `nix develop`.
      path = [
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
      serviceConfig = {
        DynamicUser = true;
        User = "forgejo-runner";
        StateDirectory = "forgejo-runner";
        RuntimeDirectory = "forgejo-runner";
        RuntimeDirectoryMode = "0700";
        WorkingDirectory = "/var/lib/forgejo-runner";
        # systemd reads the root-only file and hands the service a private copy (%d).
        LoadCredential = "credential:${cfg.credentialFile}";
        ExecStartPre = "${renderConfig}/bin/forgejo-runner-config %d/credential %t/forgejo-runner/config.yaml %S/forgejo-runner";
        ExecStart = "${cfg.package}/bin/forgejo-runner daemon --config %t/forgejo-runner/config.yaml";
        Restart = "on-failure";
        RestartSec = 10;
      };
    };
    systemd.paths.forgejo-runner-credential = {
      wantedBy = [ "multi-user.target" ];
      pathConfig = {
        PathExists = cfg.credentialFile;
        Unit = "forgejo-runner.service";
      };
    };

    # For tests and tools: the renderer this host runs, and the configuration's static part.
    system.build.forgejoRunnerConfig = renderConfig;
  };
}

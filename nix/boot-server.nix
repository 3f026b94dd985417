# The fleet's boot server as site.nix names it (the URL of the boot directory's script, the CA
# that signs releases for iPXE), and the trusted iPXE built from it: nixpkgs' ipxe with
# first-stage.ipxe embedded and that CA as its only root. It changes nothing in a runner
# system: it is imported there only so that site.nix stays one module, and the flake offers its
# iPXE as packages. docs/PXE.md, "Verified boot", is the operators' side.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  cfg = config.bootServer;
  placeholderUrl = "http://boot.example.org/netboot/current/netboot.ipxe";

  # iPXE splits a script line into tokens at whitespace before it expands ${...}, and a token
  # `||`, `&&`, `;` or one starting with `#` ends the command (iPXE's src/core/exec.c,
  # split_command and command_terminator): text spliced into the first stage must not hold those,
  # or a line could lose its `|| goto`.
  assertions = [
    {
      assertion = cfg.scriptUrl != placeholderUrl;
      message = "bootServer.scriptUrl is still the placeholder ${placeholderUrl}: set the URL of your boot directory's netboot.ipxe in site.nix before building the trusted iPXE.";
    }
    {
      assertion = builtins.match "https?://[^[:space:]\"'$\\\\]*[^/[:space:]\"'$\\\\]" cfg.scriptUrl != null;
      message = "bootServer.scriptUrl ${builtins.toJSON cfg.scriptUrl} is not the http:// or https:// URL of a file, without spaces, quotes or $: the first stage fetches it as written.";
    }
    {
      assertion = builtins.match "[^#|&;\r\n]*" cfg.kernelArguments != null;
      message = "bootServer.kernelArguments ${builtins.toJSON cfg.kernelArguments} holds #, |, &, ; or a line break, which would end the first stage's command early: remove them.";
    }
    {
      assertion = builtins.isPath cfg.trustedCa;
      message = "bootServer.trustedCa ${builtins.toJSON (toString cfg.trustedCa)} is a string: name the CA certificate as a file of the flake, such as ./ca.crt, so that the build can read it.";
    }
  ];
  failedAssertions = map (a: a.message) (builtins.filter (a: !a.assertion) assertions);

  # Thrown from inside the iPXE derivation, so that listing the flake's outputs (nix flake show)
  # still works; building or checking them names every setting still missing.
  firstStage =
    if failedAssertions != [ ] then
      throw "Failed assertions:\n- ${builtins.concatStringsSep "\n- " failedAssertions}"
    else
      pkgs.writeText "first-stage.ipxe" (
        builtins.replaceStrings
          [
            "@scriptUrl@"
            "@kernelArguments@"
          ]
          [
            cfg.scriptUrl
            cfg.kernelArguments
          ]
          (builtins.readFile ./first-stage.ipxe)
      );

  # nixpkgs' pkgs/by-name/ip/ipxe/package.nix (iPXE 2.0.0): the embedScript argument (line 14)
  # becomes EMBED= in makeFlags (line 133); IMAGE_TRUST_CMD and DOWNLOAD_PROTO_HTTPS are among
  # its default options (lines 88 and 90); TRUST= has no argument, so it joins makeFlags here.
  # TRUST= makes the CA the only root iPXE trusts, by its SHA-256 fingerprint (iPXE's
  # src/Makefile.housekeeping, TRUSTED_FPS).
  trustedIpxe = (pkgs.ipxe.override { embedScript = firstStage; }).overrideAttrs (old: {
    makeFlags = old.makeFlags ++ [ "TRUST=${cfg.trustedCa}" ];
  });

  # One file of that build as an output of its own: package.nix copies each target to $out
  # under its own name (line 161), ipxe.efi from bin-x86_64-efi/ and undionly.kpxe from bin/
  # (lines 53 and 63). hydra-build-products lets release-boot publish it like any image.
  bootFile =
    file: type:
    pkgs.runCommand "trusted-${file}" { } ''
      mkdir -p $out/nix-support
      cp ${trustedIpxe}/${file} $out/${file}
      echo "file ${type} $out/${file}" > $out/nix-support/hydra-build-products
    '';
in
{
  options.bootServer = {
    trustedCa = lib.mkOption {
      type = lib.types.nullOr lib.types.path;
      default = null;
      description = ''
        The CA certificate (PEM) that signs releases for iPXE, as a file of the flake (./ca.crt):
        the trusted iPXE accepts only images signed under it. null: releases are not signed for
        iPXE, and the flake offers no trusted iPXE.
      '';
    };
    scriptUrl = lib.mkOption {
      type = lib.types.str;
      default = placeholderUrl;
      description = ''
        The URL of the boot directory's netboot.ipxe on the boot server (its signature is the same
        URL with .sig appended). http:// is enough: the signature, not the transport, protects it.
      '';
    };
    kernelArguments = lib.mkOption {
      type = lib.types.str;
      default = "hostname=runner-\${mac:hexhyp}";
      description = ''
        What the first stage sets ''${cmdline} to, which the release's script appends to the
        kernel command line; iPXE expands settings in it once, at boot. Not signed: a setting that
        comes from DHCP, such as ''${hostname}, lets whoever answers DHCP add kernel arguments.
      '';
    };
  };

  # firstStage too, for tests that build iPXE from its source with the same script.
  config.system.build = lib.mkIf (cfg.trustedCa != null) {
    trustedIpxe = {
      efi = bootFile "ipxe.efi" "efi";
      undionly = bootFile "undionly.kpxe" "kpxe";
      inherit firstStage;
    };
  };
}

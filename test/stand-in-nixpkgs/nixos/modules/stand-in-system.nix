# What every NixOS system has, reduced to what release-boot's flake reads: the options it
# reads rather than sets (with nixpkgs' defaults), the kernel, and a toplevel that, like
# nixpkgs' toplevel, fails on failed assertions and prints warnings. Unlike nixpkgs,
# system.stateVersion has no default here, so a configuration that forgets it fails.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  failedAssertions = map (a: a.message) (builtins.filter (a: !a.assertion) config.assertions);
  toplevel = pkgs.runCommand "nixos-system-stand-in" {
    inherit (config.system) stateVersion;
    inherit (config.system.build) kernel;
  } ''
    mkdir $out
    echo "$stateVersion" > $out/nixos-version
    ln -s $kernel $out/kernel
    printf '#!/bin/sh\n' > $out/init
  '';
in
{
  options = {
    nixpkgs.hostPlatform = lib.mkOption { type = lib.types.str; };
    networking.hostName = lib.mkOption {
      type = lib.types.str;
      default = "nixos";
    };
    nix.package = lib.mkOption {
      type = lib.types.package;
      default = pkgs.nix;
    };
    system.stateVersion = lib.mkOption { type = lib.types.str; };
    system.boot.loader.kernelFile = lib.mkOption {
      type = lib.types.str;
      default = pkgs.stdenv.hostPlatform.linux-kernel.target;
    };
    assertions = lib.mkOption {
      type = lib.types.listOf lib.types.attrs;
      default = [ ];
    };
    warnings = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [ ];
    };
  };

  config.system.build = {
    kernel = pkgs.runCommand "linux-stand-in" { } ''
      mkdir $out
      echo "stand-in kernel" > $out/${config.system.boot.loader.kernelFile}
    '';
    toplevel =
      if failedAssertions != [ ] then
        throw "Failed assertions:\n- ${builtins.concatStringsSep "\n- " failedAssertions}"
      else
        builtins.foldl' (
          drv: warning: builtins.trace "warning: ${warning}" drv
        ) toplevel config.warnings;
  };
}

# Stand-in for nixpkgs' nixos/modules/installer/cd-dvd/iso-image.nix: the two boot options
# release-boot's flake sets (false by default, as in nixpkgs) and system.build.isoImage with
# nixpkgs' layout: iso/<name>.iso, listed in nix-support/hydra-build-products.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  fileName = "nixos-stand-in-${pkgs.stdenv.hostPlatform.system}.iso";
in
{
  options.isoImage = {
    makeEfiBootable = lib.mkOption {
      type = lib.types.bool;
      default = false;
    };
    makeUsbBootable = lib.mkOption {
      type = lib.types.bool;
      default = false;
    };
  };

  config.system.build.isoImage = pkgs.runCommand fileName { } ''
    mkdir -p $out/iso $out/nix-support
    echo "stand-in ISO of ${config.system.build.toplevel}" > $out/iso/${fileName}
    echo "efi=${toString config.isoImage.makeEfiBootable}" >> $out/iso/${fileName}
    echo "usb=${toString config.isoImage.makeUsbBootable}" >> $out/iso/${fileName}
    echo "file iso $out/iso/${fileName}" > $out/nix-support/hydra-build-products
  '';
}

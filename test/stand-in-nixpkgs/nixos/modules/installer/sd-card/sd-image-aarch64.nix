# Stand-in for nixpkgs' nixos/modules/installer/sd-card/sd-image-aarch64.nix (and the
# sd-image.nix it imports): system.build.sdImage with nixpkgs' layout,
# sd-image/<name>.img.zst, listed in nix-support/hydra-build-products.
{ config, pkgs, ... }:
let
  fileName = "nixos-stand-in-${pkgs.stdenv.hostPlatform.system}.img.zst";
in
{
  system.build.sdImage = pkgs.runCommand fileName { } ''
    mkdir -p $out/sd-image $out/nix-support
    echo "stand-in SD image of ${config.system.build.toplevel}" > $out/sd-image/${fileName}
    echo "file sd-image $out/sd-image/${fileName}" > $out/nix-support/hydra-build-products
  '';
}

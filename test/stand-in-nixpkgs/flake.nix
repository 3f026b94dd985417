# A stand-in for nixpkgs with no inputs, for evaluating and building release-boot's
# flake.nix offline: `--override-input nixpkgs path:<this directory>`. It provides only
# the interface that flake uses (lib.nixosSystem, lib.genAttrs, legacyPackages with the
# builders, ipxe and testers.runNixOSTest, nixos/lib/qemu-common.nix, and the installer and
# testing modules it imports) with derivations of a few bytes each, so it checks the
# wiring (output names, systems, packages taken from config.system.build, the runner's
# unit) and the scripts the images run, not NixOS.
{
  description = "Stand-in nixpkgs for release-boot's offline flake tests";

  outputs =
    { self }:
    let
      lib = import ./lib.nix;
    in
    {
      inherit lib;
      legacyPackages = lib.genAttrs [
        "x86_64-linux"
        "aarch64-linux"
      ] (system: import ./pkgs.nix { inherit system; });
    };
}

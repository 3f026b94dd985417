# Stand-in for nixpkgs' nixos/modules/installer/netboot/netboot.nix: the same two outputs
# with the same layout (netbootRamdisk/initrd, netbootIpxeScript/netboot.ipxe, which boots
# the kernel by its file name), a few bytes each.
{ config, pkgs, ... }:
let
  inherit (config.system.build) toplevel;
in
{
  system.build.netbootRamdisk = pkgs.runCommand "initrd-stand-in" { } ''
    mkdir $out
    echo "stand-in initrd of ${toplevel}" > $out/initrd
  '';

  system.build.netbootIpxeScript =
    pkgs.runCommand "netboot.ipxe-stand-in"
      {
        script = ''
          #!ipxe
          kernel ${config.system.boot.loader.kernelFile} init=${toplevel}/init initrd=initrd ''${cmdline}
          initrd initrd
          boot
        '';
      }
      ''
        mkdir $out
        printf '%s' "$script" > $out/netboot.ipxe
      '';
}

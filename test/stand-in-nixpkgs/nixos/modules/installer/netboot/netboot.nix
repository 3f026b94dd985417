# Stand-in for nixpkgs' nixos/modules/installer/netboot/netboot.nix: the same outputs with the
# same layout (netbootRamdisk/initrd, netbootIpxeScript/netboot.ipxe, which boots the kernel
# by its file name and passes ${cmdline} through; kexecTree with initrd.gz, bzImage and
# kexec-boot), a few bytes each, and the store's writable layer as nixpkgs declares it: a
# tmpfs at /nix/.rw-store under mkImageMediaOverride.
{
  config,
  lib,
  pkgs,
  ...
}:
let
  inherit (config.system.build) toplevel;
in
{
  fileSystems."/nix/.rw-store" = lib.mkImageMediaOverride {
    fsType = "tmpfs";
    options = [ "mode=0755" ];
    neededForBoot = true;
  };

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

  system.build.kexecScript = pkgs.writeScript "kexec-boot" ''
    #!/usr/bin/env bash
    kexec --load ./bzImage --initrd=./initrd.gz --command-line "init=${toplevel}/init"
    kexec -e
  '';

  system.build.kexecTree = pkgs.linkFarm "kexec-tree" [
    {
      name = "initrd.gz";
      path = "${config.system.build.netbootRamdisk}/initrd";
    }
    {
      name = "bzImage";
      path = "${config.system.build.kernel}/${config.system.boot.loader.kernelFile}";
    }
    {
      name = "kexec-boot";
      path = config.system.build.kexecScript;
    }
  ];
}

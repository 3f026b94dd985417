# Stand-in for nixpkgs' nixos/lib/qemu-common.nix: qemuBinary, the QEMU command line start for
# the host system, as nixpkgs' boot tests use it.
{ lib, stdenv }:
{
  qemuBinary =
    qemuPkg:
    {
      x86_64-linux = "${qemuPkg}/bin/qemu-kvm -cpu max";
      aarch64-linux = "${qemuPkg}/bin/qemu-system-aarch64 -machine virt,gic-version=max,accel=kvm:tcg -cpu max";
    }
    .${stdenv.hostPlatform.system};
}

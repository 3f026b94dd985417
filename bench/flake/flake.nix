# Benchmark targets: one pseudo-random file per target, shaped like an installer ISO
# (the file listed in nix-support/hydra-build-products). bench.ts copies this flake to a
# temp dir and writes sizes.nix beside it ({ target-name = bytes; ... }), so the sizes are
# part of the flake and every size is its own derivation.
{
  outputs =
    { self }:
    let
      system = "x86_64-linux";
      sizes = import ./sizes.nix;
      # AES-CTR keystream: pseudo-random (nothing compresses), reproducible per name and
      # size, and produced faster than the disk takes it. Debian's nix builds without a
      # sandbox, so the host's openssl and coreutils are reachable.
      image =
        name: bytes:
        derivation {
          name = "bench-${name}";
          inherit system;
          builder = "/bin/sh";
          PATH = "/usr/bin:/bin";
          args = [
            "-c"
            ''
              mkdir -p $out/iso $out/nix-support
              key=$(printf %s '${name} ${toString bytes}' | sha256sum | cut -c1-32)
              openssl enc -aes-128-ctr -K "$key" -iv 00000000000000000000000000000000 \
                -nosalt -in /dev/zero 2>/dev/null | head -c ${toString bytes} > $out/iso/x.iso
              test "$(stat -c %s $out/iso/x.iso)" = ${toString bytes}
              echo "file iso $out/iso/x.iso" > $out/nix-support/hydra-build-products
            ''
          ];
        };
    in
    {
      packages.${system} = builtins.mapAttrs image sizes;
    };
}

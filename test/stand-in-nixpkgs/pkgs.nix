# legacyPackages.<system> of the stand-in: the packages and builders release-boot's
# flake.nix names, each a tiny derivation built by /bin/sh. Debian's nix builds without a
# sandbox, so the host's /bin tools are reachable; only x86_64-linux ones can be built here.
{ system }:
let
  sh =
    name: attrs: script:
    derivation (
      {
        inherit name system;
        builder = "/bin/sh";
        args = [
          "-c"
          script
        ];
        PATH = "/usr/bin:/bin";
      }
      // attrs
    );

  # A program that prints which stand-in it is and the arguments it got, one per line.
  program =
    name:
    sh "${name}-stand-in" { } ''
      mkdir -p $out/bin
      printf '#!/bin/sh\necho "stand-in ${name}"\nprintf "%%s\\n" "$@"\n' > $out/bin/${name}
      chmod +x $out/bin/${name}
    '';

  binPath = packages: builtins.concatStringsSep ":" (map (p: "${p}/bin") packages);

  kernelTargets = {
    x86_64-linux = "bzImage";
    aarch64-linux = "Image";
  };
in
{
  lib = import ./lib.nix;

  stdenv.hostPlatform = {
    inherit system;
    linux-kernel.target = kernelTargets.${system};
  };

  deno = program "deno";
  nix = program "nix";
  forgejo-runner = program "forgejo-runner";
  nixfmt = program "nixfmt";
  bash = program "bash";
  coreutils = program "coreutils";
  curl = program "curl";
  gawk = program "gawk";
  gitMinimal = program "git";
  gnused = program "sed";
  nodejs = program "node";
  wget = program "wget";
  # zstd that leaves its input as it is, so a tarball piped through it can still be listed.
  zstd = sh "zstd-stand-in" { } ''
    mkdir -p $out/bin
    printf '#!/bin/sh\nexec cat\n' > $out/bin/zstd
    chmod +x $out/bin/zstd
  '';
  qemu_test = program "qemu-kvm";
  pkgsStatic.kexec-tools = program "kexec";

  # nixpkgs' pkgs/by-name/ip/ipxe/package.nix (iPXE 2.0.0) reduced to what the flake uses:
  # .override { embedScript }, which adds EMBED= to makeFlags (its line 133), and .overrideAttrs
  # of makeFlags, applied in that order. Each target it builds is a text file under the target's
  # own name (as its installPhase copies them) that records what real iPXE would take from the
  # flags: the make command line, the fingerprint of each TRUST= certificate (computed with
  # openssl, as iPXE's Makefile.housekeeping does), then the EMBED= script to the end.
  ipxe =
    let
      package =
        {
          embedScript ? null,
        }:
        let
          withAttrs =
            attrs:
            sh "ipxe-2.0.0-stand-in" attrs ''
              set -eu
              mkdir $out
              for target in bin-x86_64-efi/ipxe.efi bin/ipxe.lkrn bin/undionly.kpxe; do
                file=$out/''${target##*/}
                echo "stand-in iPXE $target" > $file
                echo "make $makeFlags $target" >> $file
                for flag in $makeFlags; do
                  case $flag in
                    TRUST=*)
                      for cert in $(echo "''${flag#TRUST=}" | tr , ' '); do
                        fingerprint=$(openssl x509 -in "$cert" -noout -sha256 -fingerprint)
                        echo "trusted root: $fingerprint" >> $file
                      done
                      ;;
                  esac
                done
                for flag in $makeFlags; do
                  case $flag in
                    EMBED=*)
                      echo "embedded script:" >> $file
                      cat "''${flag#EMBED=}" >> $file
                      ;;
                  esac
                done
              done
              ln -s undionly.kpxe $out/undionly.kpxe.0
            ''
            // {
              override = args: package ({ inherit embedScript; } // args);
              overrideAttrs = f: withAttrs (attrs // f attrs);
            };
        in
        withAttrs {
          makeFlags = [
            "ECHO_E_BIN_ECHO=echo"
            "ECHO_E_BIN_ECHO_E=echo"
            "CROSS="
          ]
          ++ (if embedScript != null then [ "EMBED=${embedScript}" ] else [ ]);
        };
    in
    package { };

  writeText =
    name: text:
    sh name { inherit text; } ''
      printf '%s' "$text" > $out
    '';

  writeScript =
    name: text:
    sh name { inherit text; } ''
      printf '%s' "$text" > $out
      chmod +x $out
    '';

  # Like nixpkgs' linkFarm with a list: a directory of symlinks named as given.
  linkFarm =
    name: entries:
    sh name
      {
        links = map (entry: "${entry.name}=${entry.path}") entries;
      }
      ''
        mkdir $out
        for link in $links; do
          ln -s "''${link#*=}" "$out/''${link%%=*}"
        done
      '';

  # nixpkgs' testers.runNixOSTest takes the test's modules (name, nodes, testScript) and
  # builds a derivation that runs the test driver in VMs. The stand-in cannot run VMs: its
  # derivation keeps the test script, so tests can read what the test would run.
  testers.runNixOSTest =
    {
      name,
      nodes,
      testScript,
      ...
    }:
    assert builtins.isAttrs nodes;
    sh "vm-test-run-${name}" { inherit testScript; } ''
      printf '%s' "$testScript" > $out
    '';

  runCommand = name: env: script: sh name env script;

  # Like nixpkgs' symlinkJoin: the union of the paths' trees as symlinks, then postBuild.
  symlinkJoin =
    {
      name,
      postBuild ? "",
      ...
    }@args:
    sh name (removeAttrs args [ "postBuild" ]) ''
      mkdir -p $out
      for path in $paths; do
        cp -rs --remove-destination "$path"/* $out/
        chmod -R u+w $out
      done
      ${postBuild}
    '';

  # Like nixpkgs' writeShellApplication, minus shellcheck and bash's strict mode.
  writeShellApplication =
    {
      name,
      text,
      runtimeInputs ? [ ],
      ...
    }:
    sh name
      {
        inherit text;
        path = binPath runtimeInputs;
      }
      ''
        mkdir -p $out/bin
        {
          echo '#!/bin/sh'
          echo "export PATH=\"$path:\$PATH\""
          printf '%s\n' "$text"
        } > $out/bin/${name}
        chmod +x $out/bin/${name}
      '';

  mkShell =
    {
      packages ? [ ],
      ...
    }:
    sh "nix-shell" { path = binPath packages; } ''
      echo "export PATH=\"$path:\$PATH\"" > $out
    '';
}

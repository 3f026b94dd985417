/**
 * What the boot tests need from the machine, and `bootTest`: loud when skipped, failing
 * instead when CI=true or REQUIRE_BOOT=1, as the real-nix tests do with REQUIRE_NIX=1.
 */
import { Buffer } from "node:buffer";
import * as path from "node:path";
import { nixAvailable } from "../nix_helpers.ts";
import { repoRoot } from "../run_helpers.ts";

/** busybox-static's binary: the initrd has no libraries, so only a static busybox runs there. */
export const BUSYBOX = "/bin/busybox";
/** iPXE's upstream source, kept beside the repository (see its SOURCE.md). */
export const IPXE_SOURCE = path.join(repoRoot, "..", "shared", "ipxe", "ipxe-src.tar.xz");
/** The iPXE ROM QEMU gives its virtio NIC, from Debian's ipxe-qemu: the `-boot n` firmware. */
const DEBIAN_IPXE_ROM = "/usr/lib/ipxe/qemu/efi-virtio.rom";

/** The newest Debian kernel in /boot, or undefined when linux-image-amd64 is not installed. */
export function debianKernel(): string | undefined {
  const kernels = readdirOrNothing("/boot")
    .filter((name) => name.startsWith("vmlinuz-"))
    .sort();
  const newest = kernels.at(-1);
  return newest && path.join("/boot", newest);
}

function readdirOrNothing(dir: string): string[] {
  try {
    return [...Deno.readDirSync(dir)].map((entry) => entry.name);
  } catch {
    return [];
  }
}

/** The probes run while a test file declares its tests, before any runs: so synchronously. */
function runs(program: string, args: string[]): boolean {
  try {
    return new Deno.Command(program, { args, stdout: "null", stderr: "null" }).outputSync().success;
  } catch {
    return false;
  }
}

function exists(file: string): boolean {
  try {
    Deno.statSync(file);
    return true;
  } catch {
    return false;
  }
}

/** An ELF file with no PT_INTERP program header needs no dynamic loader. */
function isStaticElf(file: string): boolean {
  let bytes: Buffer;
  try {
    bytes = Buffer.from(Deno.readFileSync(file));
  } catch {
    return false;
  }
  if (bytes.readUInt32BE(0) !== 0x7f454c46 || bytes[4] !== 2) return false;
  const programHeaders = Number(bytes.readBigUInt64LE(0x20));
  const entrySize = bytes.readUInt16LE(0x36);
  const count = bytes.readUInt16LE(0x38);
  const PT_INTERP = 3;
  for (let at = 0; at < count; at++) {
    if (bytes.readUInt32LE(programHeaders + at * entrySize) === PT_INTERP) return false;
  }
  return true;
}

/** The Debian packages (or files) the boot tests lack on this machine, by what to install. */
function probeMissing(): string[] {
  const checks: [string, () => boolean][] = [
    ["qemu-system-x86", () => runs("qemu-system-x86_64", ["--version"])],
    ["linux-image-amd64", () => debianKernel() !== undefined],
    ["busybox-static", () => isStaticElf(BUSYBOX)],
    ["cpio", () => runs("cpio", ["--version"])],
    ["ipxe-qemu", () => exists(DEBIAN_IPXE_ROM)],
    ["gcc", () => runs("gcc", ["--version"])],
    ["make", () => runs("make", ["--version"])],
    ["perl", () => runs("perl", ["-v"])],
    ["xz-utils", () => runs("xz", ["--version"])],
    ["liblzma-dev", () => exists("/usr/include/lzma.h")],
    ["nix-bin", () => nixAvailable],
    [`the iPXE source at ${IPXE_SOURCE}`, () => exists(IPXE_SOURCE)],
  ];
  return checks.filter(([, check]) => !check()).map(([what]) => what);
}

/** `make()`'s value, made on the first call only. */
function once<T>(make: () => T): () => T {
  let made: { value: T } | undefined;
  return () => (made ??= { value: make() }).value;
}

/**
 * What the machine lacks, probed when the first boot test is declared: a module that imports
 * this one for its paths (the iPXE build, the QEMU kit) starts no process.
 */
const missingForBoot = once(probeMissing);

const required = Deno.env.get("CI") === "true" || Deno.env.get("REQUIRE_BOOT") === "1";

/** A test that boots QEMU: skipped loudly on a machine without the tools, never in CI. */
export function bootTest(name: string, fn: (t: Deno.TestContext) => Promise<void>): void {
  const missing = missingForBoot();
  const skip = missing.length > 0 && !required;
  if (skip) {
    console.error(
      `\n!!! SKIPPED (missing ${missing.join(", ")}): ${name}\n!!! Run .ci/install, or .ci/run.\n`,
    );
  }
  Deno.test({
    name,
    ignore: skip,
    fn: async (t) => {
      if (missing.length > 0) {
        throw new Error(
          `CI=true or REQUIRE_BOOT=1, but this machine lacks ${
            missing.join(", ")
          }: run .ci/install`,
        );
      }
      await fn(t);
    },
  });
}

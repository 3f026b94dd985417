/**
 * What the boot tests need from the machine, and `bootTest`: loud when skipped, failing
 * instead when CI=true or REQUIRE_BOOT=1, as the real-nix tests do with REQUIRE_NIX=1.
 */
import * as fs from "node:fs/promises";
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
export async function debianKernel(): Promise<string | undefined> {
  const kernels = (await fs.readdir("/boot").catch(() => [] as string[]))
    .filter((name) => name.startsWith("vmlinuz-"))
    .sort();
  const newest = kernels.at(-1);
  return newest && path.join("/boot", newest);
}

async function runs(program: string, args: string[]): Promise<boolean> {
  try {
    const output = await new Deno.Command(program, { args, stdout: "null", stderr: "null" })
      .output();
    return output.success;
  } catch {
    return false;
  }
}

async function exists(file: string): Promise<boolean> {
  return await fs.stat(file).then(() => true, () => false);
}

/** An ELF file with no PT_INTERP program header needs no dynamic loader. */
async function isStaticElf(file: string): Promise<boolean> {
  const bytes = await fs.readFile(file).catch(() => undefined);
  if (!bytes || bytes.readUInt32BE(0) !== 0x7f454c46 || bytes[4] !== 2) return false;
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
async function missingForBoot(): Promise<string[]> {
  const checks: [string, Promise<boolean>][] = [
    ["qemu-system-x86", runs("qemu-system-x86_64", ["--version"])],
    ["linux-image-amd64", debianKernel().then((kernel) => kernel !== undefined)],
    ["busybox-static", isStaticElf(BUSYBOX)],
    ["cpio", runs("cpio", ["--version"])],
    ["ipxe-qemu", exists(DEBIAN_IPXE_ROM)],
    ["gcc", runs("gcc", ["--version"])],
    ["make", runs("make", ["--version"])],
    ["perl", runs("perl", ["-v"])],
    ["xz-utils", runs("xz", ["--version"])],
    ["liblzma-dev", exists("/usr/include/lzma.h")],
    ["nix-bin", Promise.resolve(nixAvailable)],
    [`the iPXE source at ${IPXE_SOURCE}`, exists(IPXE_SOURCE)],
  ];
  const results = await Promise.all(checks.map(([, check]) => check));
  return checks.filter((_, at) => !results[at]).map(([what]) => what);
}

const missing = await missingForBoot();
const required = Deno.env.get("CI") === "true" || Deno.env.get("REQUIRE_BOOT") === "1";

/** A test that boots QEMU: skipped loudly on a machine without the tools, never in CI. */
export function bootTest(name: string, fn: (t: Deno.TestContext) => Promise<void>): void {
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

/**
 * A kernel and initrd that really boot: Debian's kernel from /boot, and a gzipped newc cpio
 * holding busybox-static and an /init that prints the kernel command line and powers off.
 */
import * as fs from "node:fs/promises";
import * as os from "node:os";
import * as path from "node:path";
import { gzipSync } from "node:zlib";
import { BUSYBOX, debianKernel } from "./requirements.ts";

/** The console line /init prints; what follows it is /proc/cmdline. */
export const MARKER = "BOOT-MARKER cmdline: ";

const INIT = `#!/bin/busybox sh
/bin/busybox mkdir -p /proc
/bin/busybox mount -t proc proc /proc
echo "${MARKER}$(/bin/busybox cat /proc/cmdline)"
/bin/busybox poweroff -f
`;

/** Writes `bzImage` and `initrd` into `dir`. */
export async function makeBootKit(dir: string): Promise<{ kernel: string; initrd: string }> {
  const source = await debianKernel();
  if (!source) throw new Error("no /boot/vmlinuz-*: install linux-image-amd64");
  const kernel = path.join(dir, "bzImage");
  const initrd = path.join(dir, "initrd");
  await fs.copyFile(source, kernel);
  await fs.writeFile(initrd, gzipSync(await initramfs()));
  return { kernel, initrd };
}

async function initramfs(): Promise<Uint8Array> {
  const root = await fs.mkdtemp(path.join(os.tmpdir(), "release-boot-initrd-"));
  try {
    await fs.mkdir(path.join(root, "bin"));
    await fs.copyFile(BUSYBOX, path.join(root, "bin", "busybox"));
    await fs.writeFile(path.join(root, "init"), INIT, { mode: 0o755 });
    const child = new Deno.Command("cpio", {
      args: ["--create", "--format=newc", "--reproducible", "--quiet"],
      cwd: root,
      stdin: "piped",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    const writer = child.stdin.getWriter();
    await writer.write(new TextEncoder().encode([".", "bin", "bin/busybox", "init"].join("\n")));
    await writer.close();
    const output = await child.output();
    if (!output.success) throw new Error(`cpio failed: ${new TextDecoder().decode(output.stderr)}`);
    return output.stdout;
  } finally {
    await fs.rm(root, { recursive: true, force: true });
  }
}

/**
 * Builds `bin/ipxe.lkrn` from the shared iPXE source with image signatures and HTTPS turned
 * on. The source tree is unpacked and compiled once per machine (a cache directory keyed by
 * the tarball's and the configuration's hash); each embedded script and trusted CA is then a
 * relink of seconds, kept as its own file. One build at a time, across test processes.
 */
import { createHash } from "node:crypto";
import * as fs from "node:fs/promises";
import * as os from "node:os";
import * as path from "node:path";
import { IPXE_SOURCE } from "./requirements.ts";

/**
 * config/local/: signatures (`imgtrust`, `imgverify`) and HTTPS, as nixpkgs' pkgs.ipxe turns
 * them on. CROSSCERT is emptied so that a chain iPXE cannot complete is refused at once,
 * instead of iPXE asking ca.ipxe.org for a cross-signed certificate.
 */
const LOCAL_CONFIG: Record<string, string> = {
  "general.h": "#define IMAGE_TRUST_CMD\n#define DOWNLOAD_PROTO_HTTPS\n",
  "crypto.h": '#undef CROSSCERT\n#define CROSSCERT ""\n',
};

export interface IpxeImage {
  /** The built bin/ipxe.lkrn, which QEMU boots with -kernel. */
  lkrn: string;
  /** What this call had to do: compile the whole tree, relink, or nothing. */
  work: "first build" | "relink" | "cached";
  seconds: number;
}

/**
 * An ipxe.lkrn that runs `embed` (an iPXE script) instead of booting DHCP's file name, and
 * trusts only the root CA certificate in the PEM file `trust`; either may be left out.
 */
export async function buildIpxe(
  options: { embed?: string; trust?: string } = {},
): Promise<IpxeImage> {
  const started = performance.now();
  const seconds = () => (performance.now() - started) / 1000;
  const cache = await cacheDir();
  const trust = options.trust === undefined ? undefined : await fs.readFile(options.trust);
  const key = createHash("sha256")
    .update(JSON.stringify([options.embed ?? null, trust?.toString("base64") ?? null]))
    .digest("hex")
    .slice(0, 16);
  const lkrn = path.join(cache, "images", `ipxe-${key}.lkrn`);
  // An image appears only whole (renamed into place), so a cached one needs no lock.
  if (await exists(lkrn)) return { lkrn, work: "cached", seconds: seconds() };
  await fs.mkdir(cache, { recursive: true });
  const lock = await Deno.open(`${cache}.lock`, { create: true, write: true });
  try {
    await lock.lock(true);
    if (await exists(lkrn)) return { lkrn, work: "cached", seconds: seconds() };

    const stamp = path.join(cache, "built");
    const firstBuild = !(await exists(stamp));
    if (firstBuild) await unpack(cache);
    const inputs = path.join(cache, "inputs");
    await fs.mkdir(inputs, { recursive: true });
    const args = ["-C", path.join(cache, "ipxe", "src"), `-j${navigator.hardwareConcurrency}`];
    if (options.embed !== undefined) {
      const script = path.join(inputs, `${key}.ipxe`);
      await fs.writeFile(script, options.embed);
      args.push(`EMBED=${script}`);
    }
    if (trust !== undefined) {
      const ca = path.join(inputs, `${key}.crt`);
      await fs.writeFile(ca, trust);
      args.push(`TRUST=${ca}`);
    }
    // Compiling takes both cores for a minute or more: at a lower priority, so that the
    // timing-sensitive tests running beside it keep their share.
    await run("nice", ["-n", "10", "make", ...args, "bin/ipxe.lkrn"]);
    await fs.writeFile(stamp, "");
    await fs.mkdir(path.dirname(lkrn), { recursive: true });
    await fs.copyFile(path.join(cache, "ipxe", "src", "bin", "ipxe.lkrn"), `${lkrn}.part`);
    await fs.rename(`${lkrn}.part`, lkrn);
    return { lkrn, work: firstBuild ? "first build" : "relink", seconds: seconds() };
  } finally {
    lock.close();
  }
}

/** RELEASE_BOOT_IPXE_CACHE, else a directory in the system's temporary directory. */
async function cacheDir(): Promise<string> {
  const source = createHash("sha256").update(await fs.readFile(IPXE_SOURCE))
    .update(JSON.stringify(LOCAL_CONFIG)).digest("hex").slice(0, 16);
  const parent = Deno.env.get("RELEASE_BOOT_IPXE_CACHE") ?? os.tmpdir();
  return path.join(parent, `release-boot-ipxe-${source}`);
}

/** A fresh tree: whatever an interrupted first build left is thrown away. */
async function unpack(cache: string): Promise<void> {
  await fs.rm(path.join(cache, "ipxe"), { recursive: true, force: true });
  await run("tar", ["-xJf", IPXE_SOURCE, "-C", cache]);
  const local = path.join(cache, "ipxe", "src", "config", "local");
  for (const [name, text] of Object.entries(LOCAL_CONFIG)) {
    await fs.writeFile(path.join(local, name), text);
  }
}

async function run(program: string, args: string[]): Promise<void> {
  const output = await new Deno.Command(program, { args, stdout: "piped", stderr: "piped" })
    .output();
  if (!output.success) {
    const tail = new TextDecoder().decode(output.stderr).trim().split("\n").slice(-20).join("\n");
    throw new Error(`${program} ${args.join(" ")} failed:\n${tail}`);
  }
}

async function exists(file: string): Promise<boolean> {
  return await fs.stat(file).then(() => true, () => false);
}

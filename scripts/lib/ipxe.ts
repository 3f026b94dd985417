/**
 * iPXE scripts: rewriting where a script fetches its images from, and reading which kernel and
 * initrd a script (or, without one, the file names) boots. Pure text work, no network.
 */
import * as fs from "node:fs/promises";
import * as path from "node:path";
import { MANIFEST_NAME, SUMS_NAME } from "../../types/manifest.ts";
import { ReleaseError, type Run } from "./run.ts";
import { type FileAsset } from "./nix.ts";
import { sha256Hex } from "./hash.ts";

/** iPXE commands whose first argument (after options) is an image URI. */
const IPXE_FETCHING = new Set(["kernel", "initrd", "imgfetch", "module", "chain", "imgexec"]);

/** iPXE image options that take a value. */
const IPXE_VALUE_OPTIONS = new Set(["-n", "--name", "-t", "--timeout"]);

/**
 * Points an iPXE script's image URIs at new locations. `locate` maps a file name the script
 * fetches (e.g. "bzImage") to its new URI, or undefined to leave it. iPXE names a fetched
 * image after its URI's last segment, so the kernel's `initrd=` argument follows the rename.
 * Everything else (init=, ${cmdline}, comments) stays as built.
 */
export function rewriteIpxe(script: string, locate: (file: string) => string | undefined): string {
  return script.split("\n").map((line) => {
    const indent = line.match(/^\s*/)![0];
    const words = line.trim().split(/\s+/);
    if (!IPXE_FETCHING.has(words[0])) return line;
    let at = 1;
    while (at < words.length && words[at].startsWith("-")) {
      at += IPXE_VALUE_OPTIONS.has(words[at]) ? 2 : 1;
    }
    if (at >= words.length) return line;
    words[at] = locate(words[at]) ?? words[at];
    for (let arg = at + 1; arg < words.length; arg++) {
      const initrd = words[arg].match(/^initrd=(.+)$/);
      const moved = initrd && locate(initrd[1]);
      if (moved) words[arg] = `initrd=${moved.split("/").pop()}`;
    }
    return indent + words.join(" ");
  }).join("\n");
}

/**
 * For every built iPXE script, publishes a copy under the stable `<target>-<system>.ipxe`
 * name whose kernel and initrd come from `base` (the release's download URLs), and keeps
 * the script as built under `<target>-<system>.built.ipxe`.
 */
export async function pointIpxeAtRelease(
  run: Run,
  assets: FileAsset[],
  base: string,
): Promise<FileAsset[]> {
  const result: FileAsset[] = [];
  for (const built of assets) {
    result.push(built);
    if (!built.name.endsWith(".built.ipxe")) continue;
    const siblings = assets.filter((a) => a.target === built.target && a.system === built.system);
    const locate = (file: string) => {
      const found = siblings.find((a) => a !== built && path.basename(a.path) === file);
      return found && `${base}${encodeURIComponent(found.name)}`;
    };
    const text = rewriteIpxe(await fs.readFile(built.path, "utf8"), locate);
    const bytes = new TextEncoder().encode(text);
    const script = {
      ...built,
      name: built.name.replace(/\.built\.ipxe$/, ".ipxe"),
      // Bytes made here, not the store file's: nix's record of that file does not vouch.
      narHash: undefined,
      bytes,
      size: bytes.length,
      sha256: sha256Hex(bytes),
    };
    result.push(script);
    run.log(
      `${script.sha256}  ${script.name} (boots from ${base || "the directory it is served from"})`,
    );
  }
  return result;
}

/** One file to download, with the checksum SHA256SUMS gives it. */
export interface BootFile {
  name: string;
  sha256: string;
}

/** An iPXE script to write beside the files, from `from` with its images found by `locate`. */
interface LocalScript {
  from: string;
  name: string;
  locate: (file: string) => string | undefined;
}

export interface BootSet {
  files: BootFile[];
  scripts: LocalScript[];
}

/** A release without manifest.json: the script and the images its kernel/initrd lines fetch. */
export function bootFilesOfScript(
  script: string,
  text: string,
  sums: Map<string, string>,
  tag: string,
): BootSet {
  // iPXE names an image after its URI's last segment; the release holds it under that name.
  const nameOf = (uri: string) => {
    const last = uri.split(/[?#]/)[0].split("/").filter(Boolean).at(-1) ?? uri;
    try {
      return decodeURIComponent(last);
    } catch {
      return last;
    }
  };
  const fetched = { kernel: [] as string[], initrd: [] as string[] };
  for (const line of text.split("\n")) {
    const command = line.trim().split(/\s+/)[0];
    if (command !== "kernel" && command !== "initrd") continue;
    // rewriteIpxe reads the line's tokens: its first question is the image the line fetches.
    let image: string | undefined;
    rewriteIpxe(line, (uri) => {
      image ??= uri;
      return undefined;
    });
    if (image) fetched[command].push(image);
  }
  const held = (uris: string[]) => uris.map(nameOf).filter((name) => sums.has(name));
  const kernels = held(fetched.kernel);
  const initrds = held(fetched.initrd);
  if (kernels.length === 0 || initrds.length === 0) {
    const named = [...fetched.kernel, ...fetched.initrd];
    throw new ReleaseError(
      `${script} of ${tag} names no ${
        kernels.length === 0 ? "kernel" : "initrd"
      } that ${tag} holds${
        named.length > 0 ? ` (it fetches ${named.join(", ")})` : ""
      }: cannot tell what to boot`,
    );
  }
  const images = new Set([...kernels, ...initrds]);
  const local = script === "netboot.ipxe" ? "netboot.local.ipxe" : "netboot.ipxe";
  return {
    files: [script, ...images].map((name) => listedFile(sums, name, tag)),
    scripts: [{
      from: script,
      name: local,
      locate: (uri) => images.has(nameOf(uri)) ? encodeURIComponent(nameOf(uri)) : undefined,
    }],
  };
}

/** A file SHA256SUMS lists, with the checksum it gives it. */
function listedFile(sums: Map<string, string>, name: string, tag: string): BootFile {
  const sha256 = sums.get(name);
  if (sha256 === undefined) throw new ReleaseError(`${tag}'s ${SUMS_NAME} does not list ${name}`);
  return { name, sha256 };
}

const KERNEL_NAME = /bzImage|vmlinuz|(^|[-_.])Image([-_.]|$)|kernel/;

const INITRD_NAME = /initrd|initramfs/;

/** No manifest.json, no iPXE script: one kernel and one initrd, told by their names. */
export function bootFilesByName(sums: Map<string, string>, tag: string): BootSet {
  const kernels = [...sums.keys()].filter((name) => KERNEL_NAME.test(name));
  const initrds = [...sums.keys()].filter((name) => INITRD_NAME.test(name));
  if (kernels.length !== 1 || initrds.length !== 1) {
    throw new ReleaseError(
      `${tag} has no ${MANIFEST_NAME}, no iPXE script, and not one kernel and one initrd by name (${
        [...sums.keys()].join(", ") || "no files"
      }): cannot tell what to boot`,
    );
  }
  return {
    files: [kernels[0], initrds[0]].map((name) => listedFile(sums, name, tag)),
    scripts: [],
  };
}

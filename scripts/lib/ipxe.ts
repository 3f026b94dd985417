/**
 * iPXE scripts: rewriting where a script fetches its images from, the script a boot directory
 * serves (it loads only the release's own files), and reading which kernel and initrd a script
 * (or, without one, the file names) boots. Pure text work, no network.
 */
import * as fs from "node:fs/promises";
import * as path from "node:path";
import { MANIFEST_NAME, SUMS_NAME } from "../../types/manifest.ts";
import { ReleaseError, type Run } from "./run.ts";
import { type FileAsset } from "./nix.ts";
import { sha256Hex } from "./hash.ts";

/**
 * iPXE commands whose first argument (after options) is an image: a URI to fetch, or the name
 * of an image already fetched. They fetch; fetch and select; fetch and run.
 */
const IPXE_FETCHING = new Set([
  ...["imgfetch", "module", "initrd"],
  ...["imgselect", "imgload", "kernel"],
  ...["imgexec", "chain", "boot"],
]);

/** iPXE commands that boot what no image argument names: a SAN disk's URI, DHCP's filename. */
const IPXE_BOOTING_ELSEWHERE = new Set(["sanboot", "sanhook", "autoboot"]);

/** iPXE image options that take a value. */
const IPXE_VALUE_OPTIONS = new Set(["-n", "--name", "-t", "--timeout"]);

/** Words that join several commands on one line, as iPXE's shell reads them. */
const IPXE_JOINERS = new Set(["||", "&&", ";"]);

/** One command of a script line, ending before word `to`, and the image it fetches. */
interface Command {
  name: string;
  to: number;
  /** Where its image argument is among the line's words, if it has one. */
  image?: number;
  /** The name `-n`/`--name` gives the image, by which later commands may run it. */
  imageName?: string;
}

function wordsOf(line: string): string[] {
  return line.trim().split(/\s+/).filter(Boolean);
}

/** The commands of a line's words: iPXE runs `a || b`, `a && b` and `a ; b`; `#` ends a line. */
function commandsOf(words: string[]): Command[] {
  const commands: Command[] = [];
  let from = 0;
  for (let at = 0; at <= words.length; at++) {
    const comment = at < words.length && words[at].startsWith("#");
    if (at < words.length && !comment && !IPXE_JOINERS.has(words[at])) continue;
    if (at > from) commands.push(readCommand(words, from, at));
    if (comment) break;
    from = at + 1;
  }
  return commands;
}

function readCommand(words: string[], from: number, to: number): Command {
  const command: Command = { name: words[from], to };
  if (!IPXE_FETCHING.has(command.name)) return command;
  let at = from + 1;
  while (at < to && words[at].startsWith("-")) {
    if (words[at] === "-n" || words[at] === "--name") command.imageName = words[at + 1];
    at += IPXE_VALUE_OPTIONS.has(words[at]) ? 2 : 1;
  }
  if (at < to) command.image = at;
  return command;
}

/**
 * Points an iPXE script's image URIs at new locations. `locate` maps a file name the script
 * fetches (e.g. "bzImage") to its new URI, or undefined to leave it. iPXE names a fetched
 * image after its URI's last segment, so the kernel's `initrd=` argument follows the rename.
 * Everything else (init=, ${cmdline}, comments) stays as built.
 */
export function rewriteIpxe(script: string, locate: (file: string) => string | undefined): string {
  return script.split("\n").map((line) => {
    const words = wordsOf(line);
    const loads = commandsOf(words).flatMap(({ image, to }) =>
      image === undefined ? [] : [{ image, to }]
    );
    if (loads.length === 0) return line;
    for (const { image, to } of loads) {
      words[image] = locate(words[image]) ?? words[image];
      for (let arg = image + 1; arg < to; arg++) {
        const initrd = words[arg].match(/^initrd=(.+)$/);
        const moved = initrd && locate(initrd[1]);
        if (moved) words[arg] = `initrd=${moved.split("/").pop()}`;
      }
    }
    return line.match(/^\s*/)![0] + words.join(" ");
  }).join("\n");
}

/**
 * A release's iPXE script as a boot directory serves it: rewritten so that every image loads
 * from beside it. A command that loads anything `locate` does not find among the release's
 * files (another host, file://, another release's script, a SAN disk, DHCP's filename) is
 * refused, naming its line, so the served script boots only what was verified.
 */
export function serveFromDirectory(
  script: string,
  text: string,
  locate: (file: string) => string | undefined,
  tag: string,
): string {
  const named = new Set<string>();
  text.split("\n").forEach((line, index) => {
    const words = wordsOf(line);
    for (const command of commandsOf(words)) {
      const image = command.image === undefined ? undefined : words[command.image];
      const local = image === undefined
        ? !IPXE_BOOTING_ELSEWHERE.has(command.name) && !command.name.includes("${")
        : named.has(image) || locate(image) !== undefined;
      if (!local) {
        throw new ReleaseError(
          `${script} of ${tag}, line ${
            index + 1
          } ("${line.trim()}"), loads from outside ${tag}: refusing to serve a script that loads anything but the release's own files; nothing was changed`,
        );
      }
      if (command.imageName) named.add(command.imageName);
    }
  });
  return rewriteIpxe(text, locate);
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

/** An iPXE script fetch writes beside the files, as the boot directory serves it. */
interface LocalScript {
  name: string;
  text: string;
}

export interface BootSet {
  files: BootFile[];
  scripts: LocalScript[];
}

/** The script a boot directory serves, loading its kernel and initrd from beside it. */
export const LOCAL_SCRIPT = "netboot.ipxe";

/**
 * A release without manifest.json: the script, the images it loads (the release must hold a
 * kernel and an initrd among them), and the script rewritten to load them from beside it. A
 * script itself named netboot.ipxe is served only rewritten, under that name.
 */
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
  // Another script of the release would be served unchecked: it is not an image to load.
  const held = (uri: string) => {
    const name = nameOf(uri);
    return sums.has(name) && !name.endsWith(".ipxe") ? name : undefined;
  };
  const loads = text.split("\n").flatMap((line) => {
    const words = wordsOf(line);
    return commandsOf(words).flatMap(({ name, image }) =>
      image === undefined ? [] : [{ command: name, uri: words[image] }]
    );
  });
  const fetched = (command: string) =>
    loads.filter((load) => load.command === command).map((load) => load.uri);
  const kernels = fetched("kernel").filter(held);
  const initrds = fetched("initrd").filter(held);
  if (kernels.length === 0 || initrds.length === 0) {
    const named = [...fetched("kernel"), ...fetched("initrd")];
    throw new ReleaseError(
      `${script} of ${tag} names no ${
        kernels.length === 0 ? "kernel" : "initrd"
      } that ${tag} holds${
        named.length > 0 ? ` (it fetches ${named.join(", ")})` : ""
      }: cannot tell what to boot`,
    );
  }
  const images = new Set(loads.flatMap((load) => held(load.uri) ?? []));
  const locate = (uri: string) => {
    const name = held(uri);
    return name && encodeURIComponent(name);
  };
  const served = serveFromDirectory(script, text, locate, tag);
  return {
    files: [...(script === LOCAL_SCRIPT ? [] : [script]), ...images]
      .map((name) => listedFile(sums, name, tag)),
    scripts: [{ name: LOCAL_SCRIPT, text: served }],
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

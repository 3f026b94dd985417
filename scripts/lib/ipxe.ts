/**
 * iPXE scripts: rewriting where a script fetches its images from, the script a boot directory
 * serves (it loads only the release's own files), reading which kernel and initrd a script
 * (or, without one, the file names) boots, and what a release signed for iPXE adds: scripts
 * that verify every image they load, and a signature for each file a booting machine loads.
 * Text work and signing from digests, no network.
 */
import * as fs from "node:fs/promises";
import * as path from "node:path";
import { INDEX_NAMES, MANIFEST_NAME, SUMS_NAME } from "../../types/manifest.ts";
import { ReleaseError, type Run } from "./run.ts";
import { type FileAsset } from "./nix.ts";
import { sha256Hex } from "./hash.ts";
import { type IpxeSigningIdentity, signDigest } from "./ipxe_sign.ts";

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

/** A detached iPXE signature of asset `<name>`: `<name>.sig`. */
export const IPXE_SIGNATURE_SUFFIX = ".sig";

/** Where a verifying script goes on any failure: one line saying what failed, and no boot. */
const REFUSED = [":refused", "echo Not booting: ${checking} failed to load or verify", "exit 1"];

/**
 * A built script made to verify what it loads, for an iPXE that trusts only signed images:
 * each kernel and initrd line loads from `locate` (the release's URL, or a name in the boot
 * directory) and is followed by `imgverify` of the image against its `.sig` beside it; any
 * failure prints one line and boots nothing. Only comments, kernel, initrd and a bare boot
 * (nixpkgs' netboot.ipxe) can be made so: any other command could load or run something
 * unverified, so it is refused, naming its line. `images`: the names of the loaded images, as
 * iPXE names them (the last segment of their location).
 */
export function verifyingIpxe(
  script: string,
  text: string,
  locate: (file: string) => string | undefined,
): { text: string; images: string[] } {
  const images: string[] = [];
  const lines = text.replace(/\n+$/, "").split("\n").flatMap((line, index) => {
    const words = wordsOf(line);
    const commands = commandsOf(words);
    if (commands.length === 0) return [line];
    const refuse = (why: string) =>
      new ReleaseError(
        `${script}, line ${
          index + 1
        } ("${line.trim()}"), ${why}: release-boot signs for iPXE only scripts of kernel, initrd and boot lines (as nixpkgs' netboot.ipxe); nothing was signed`,
      );
    const [command] = commands;
    if (commands.length > 1 || command.to !== words.length) {
      throw refuse("holds more than one command, or a comment after its command");
    }
    const indent = line.match(/^\s*/)![0];
    if (command.name === "boot" && words.length === 1) return [`${indent}boot || goto refused`];
    if (!["kernel", "initrd"].includes(command.name) || command.image !== 1) {
      throw refuse(`is not a kernel, initrd or bare boot line`);
    }
    const location = locate(words[1]);
    if (location === undefined) {
      throw refuse(`loads ${words[1]}, which is not a file of the release`);
    }
    const image = decodeURIComponent(location.split("/").at(-1)!);
    images.push(image);
    return [
      `${indent}set checking ${image}`,
      `${rewriteIpxe(line, locate)} || goto refused`,
      `${indent}imgverify ${image} ${location}${IPXE_SIGNATURE_SUFFIX} || goto refused`,
    ];
  });
  if (images.length === 0) {
    throw new ReleaseError(
      `${script} loads no kernel or initrd: there is nothing to sign for iPXE`,
    );
  }
  return { text: [...lines, ...REFUSED, ""].join("\n"), images };
}

/**
 * True for the files signing for iPXE writes (a `.sig`, a boot directory's script) and for the
 * release's script, which signing replaces by its verifying form: none is a build product.
 */
export function madeForIpxe(name: string): boolean {
  if (INDEX_NAMES.has(name)) return false;
  return name.endsWith(IPXE_SIGNATURE_SUFFIX) ||
    (name.endsWith(".ipxe") && !name.endsWith(".built.ipxe"));
}

/**
 * A signed release's scripts, for every built script among `assets`: the release's script in
 * its verifying form (loading from `base`, the release's download URLs) and the boot
 * directory's `.dir.ipxe` (loading by name from beside it); `images`, the files they load.
 * `readScript` reads a built script's text. Publishing and `verify` both make them here.
 */
export async function verifyingScripts(
  assets: FileAsset[],
  readScript: (built: FileAsset) => Promise<string>,
  base: string,
): Promise<{ scripts: FileAsset[]; images: FileAsset[] }> {
  const scripts: FileAsset[] = [];
  const images: FileAsset[] = [];
  for (const built of assets.filter((asset) => asset.name.endsWith(".built.ipxe"))) {
    const siblings = assets.filter((asset) =>
      asset.target === built.target && asset.system === built.system && !madeForIpxe(asset.name) &&
      asset !== built
    );
    const text = await readScript(built);
    const loadingFrom = (prefix: string) =>
      verifyingIpxe(built.name, text, (file) => {
        const found = siblings.find((asset) => path.basename(asset.path) === file);
        return found && `${prefix}${encodeURIComponent(found.name)}`;
      });
    const fromRelease = loadingFrom(base);
    scripts.push(
      scriptAsset(built, built.name.replace(/\.built\.ipxe$/, ".ipxe"), fromRelease.text),
      scriptAsset(built, signedScriptName(built.name), loadingFrom("").text),
    );
    for (const name of new Set(fromRelease.images)) {
      images.push(siblings.find((asset) => asset.name === name)!);
    }
  }
  return { scripts, images };
}

/**
 * What signing a release for iPXE writes: its verifying scripts (`verifyingScripts`) and a
 * `.sig` for each of them and each image they load, made from the SHA-256 alone. The same
 * assets and identity give the same bytes, so a rerun uploads nothing.
 */
export async function signForIpxe(
  run: Run,
  assets: FileAsset[],
  readScript: (built: FileAsset) => Promise<string>,
  base: string,
  identity: IpxeSigningIdentity,
): Promise<FileAsset[]> {
  const { scripts, images } = await verifyingScripts(assets, readScript, base);
  const signatures = [...images, ...scripts].map((file) =>
    bytesLike(file, `${file.name}${IPXE_SIGNATURE_SUFFIX}`, signDigest(identity, file.sha256))
  );
  const signed = [...scripts, ...signatures];
  if (signed.length === 0) run.log("No iPXE script among the assets: nothing to sign for iPXE");
  for (const file of signed) run.log(`${file.sha256}  ${file.name} (for iPXE, ${identity.signer})`);
  return signed;
}

/** `assets` with `made` (verifying scripts, signatures) in place of those of the same name. */
export function withIpxeFiles(assets: FileAsset[], made: FileAsset[]): FileAsset[] {
  return [...assets.filter((asset) => !made.some((file) => file.name === asset.name)), ...made];
}

/**
 * A release's assets as its build jobs left them, to judge whether they are all in: of the
 * files signing for iPXE writes, only the copies `manifest` lists, as it lists them. A
 * --finalize stopped part-way leaves other copies, which its rerun replaces.
 */
export function asBuiltForIpxe(
  assets: { name: string; size: number }[],
  manifest: { assets: { name: string; size: number }[] },
): { name: string; size: number }[] {
  const listed = manifest.assets.filter((entry) =>
    madeForIpxe(entry.name) && assets.some((copy) => copy.name === entry.name)
  );
  return [...assets.filter((copy) => !madeForIpxe(copy.name)), ...listed];
}

function scriptAsset(built: FileAsset, name: string, text: string): FileAsset {
  return bytesLike(built, name, new TextEncoder().encode(text));
}

/** Bytes made from `from`: its target, system and store path say where they came from. */
function bytesLike(from: FileAsset, name: string, bytes: Uint8Array): FileAsset {
  return { ...from, name, bytes, size: bytes.length, sha256: sha256Hex(bytes) };
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
 * The boot directory's script a release signed for iPXE carries for `<t>-<s>.built.ipxe`:
 * `<t>-<s>.dir.ipxe`, loading the release's files by their names and verifying each.
 */
export function signedScriptName(built: string): string {
  return built.replace(/\.built\.ipxe$/, ".dir.ipxe");
}

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

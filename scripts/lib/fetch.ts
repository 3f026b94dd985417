/**
 * `release-boot fetch`: a published release laid out for PXE in DIR/<tag>, every byte checked
 * before it is kept, then DIR/current pointed at it (and `--rollback` back). It writes nothing
 * outside DIR and nothing to the release.
 */
import process from "node:process";
import { Buffer } from "node:buffer";
import * as fs from "node:fs/promises";
import * as path from "node:path";
import { createHash } from "node:crypto";
import { constants as fsConstants } from "node:fs";
import { type Attachment, type Release } from "../../types/forgejo.ts";
import { type Manifest, MANIFEST_NAME, SUMS_NAME } from "../../types/manifest.ts";
import { hashFile, READ_SIZE, sha256Hex } from "./hash.ts";
import { inLanes } from "./lanes.ts";
import { readSmallFile } from "./small_file.ts";
import { releaseLock, removeLeftoversOfKilledRuns, takeLock } from "./dir_lock.ts";
import { type Env, fileSystemFailure, formatBytes, ReleaseError, type Run } from "./run.ts";
import { readTrust } from "./allowed_signers.ts";
import { type DownloadOptions, type FetchOptions } from "./cli.ts";
import { connectForgejo, type Forgejo, mirrorOf, readToken } from "./forgejo.ts";
import { readIndex, type RemoteIndex, renderSums } from "./release_index.ts";
import {
  assetsOfTargets,
  authenticSums,
  findBootRelease,
  releaseManifest,
} from "./trusted_release.ts";
import {
  type BootFile,
  bootFilesByName,
  bootFilesOfScript,
  type BootSet,
  checkSignedScript,
  LOCAL_SCRIPT,
  serveFromDirectory,
  signedScriptName,
} from "./ipxe.ts";

export async function fetchForBoot(run: Run, options: FetchOptions, env: Env): Promise<void> {
  const out = run.resolve(options.out);
  if (options.rollback) {
    if (!(await lstatOrUndefined(out))) throw new ReleaseError(`there is no ${out} to roll back`);
    return await withBootLock(run, out, () => rollBack(run, out));
  }
  const trusted = options.trust === undefined ? undefined : await readTrust(options.trust, run);
  // A mirror serves public files; the primary server's token has no business there.
  const token = mirrorOf(options.site.server, options.mirrors) ? undefined : readToken(env, run);
  const forgejo = connectForgejo(run, options.site, token, options);
  const release = await run.step("Find the release", () => findBootRelease(forgejo, options.tag));
  const tag = release.tag_name;
  const directory = tagDirectoryName(tag);
  // Everything that decides whether to trust the release happens before DIR is touched.
  const index = await readIndex(forgejo, release);
  const sums = await authenticSums(run, index, tag, trusted);
  const signed = trusted !== undefined;
  const boot = await chooseBootFiles(run, forgejo, release, index, sums, options, signed);
  const dir = await withBootLock(run, out, async () => {
    await refuseWithoutRoom(out, directory, release, boot.files);
    const dir = await openTagDirectory(out, directory);
    await run.step("Download and verify", async () => {
      // Every signature before any image: lanes freed by signatures would otherwise start on
      // images while a signature that does not match is still on its way.
      for (const batch of signaturesThenImages(boot.files)) {
        await inLanes(
          batch,
          DOWNLOAD_LANES,
          (file, signal) =>
            downloadVerified(run, forgejo, release, file, dir, boot.checked.get(file.name), signal),
        );
      }
    });
    await writeBootDirectory(run, dir, boot);
    await pointCurrentAt(run, out, directory);
    await removeOldReleases(run, out, options.keep);
    return dir;
  });
  run.log(
    `${tag}: ${boot.files.length} files verified in ${dir}; ${
      path.join(out, CURRENT)
    } points at it: serve that over HTTP and chain netboot.ipxe`,
  );
  run.result(dir);
}

/** The iPXE signatures to download, then the rest. */
function signaturesThenImages(files: BootFile[]): BootFile[][] {
  const isSignature = (file: BootFile) => file.name.endsWith(".sig");
  return [files.filter(isSignature), files.filter((file) => !isSignature(file))];
}

/** The files to boot, and the texts of the scripts read to choose them, by name. */
interface BootPlan extends BootSet {
  /** Each checked against SHA256SUMS already: one among the files is written, not fetched again. */
  checked: Map<string, string>;
}

/**
 * The files to boot: with manifest.json (checked against SHA256SUMS), the chosen targets'
 * assets; without it, a release another tool made, the iPXE script and the kernel and initrd
 * it names, or failing a script, the one kernel and one initrd by their names.
 */
async function chooseBootFiles(
  run: Run,
  forgejo: Forgejo,
  release: Release,
  index: RemoteIndex,
  sums: Map<string, string>,
  options: DownloadOptions,
  signed: boolean,
): Promise<BootPlan> {
  const tag = release.tag_name;
  const checked = new Map<string, string>();
  const readScript = async (name: string) => {
    const text = await verifiedText(forgejo, release, name, sums);
    checked.set(name, text);
    return text;
  };
  const manifest = releaseManifest(index, sums, tag, { signed, command: "fetch" });
  if (manifest) {
    const { targets, system } = options;
    const boot = await bootFilesOf(manifest, sums, targets, system, tag, readScript);
    return { ...(signed ? withSignedSizes(boot, manifest) : boot), checked };
  }
  const scripts = [...sums.keys()].filter((name) => name.endsWith(".ipxe"));
  if (scripts.length === 0) {
    const boot = bootFilesByName(sums, tag);
    run.log(
      `${tag} has no iPXE script: fetching its kernel and initrd only; boot them with your own`,
    );
    return { ...boot, checked };
  }
  const script = oneScript(scripts, options, tag);
  return { ...bootFilesOfScript(script, await readScript(script), sums, tag), checked };
}

/** An iPXE script of the release, read whole and checked against SHA256SUMS. */
async function verifiedText(
  forgejo: Forgejo,
  release: Release,
  name: string,
  sums: Map<string, string>,
): Promise<string> {
  const tag = release.tag_name;
  const copy = release.assets.find((asset) => asset.name === name);
  if (!copy) throw new ReleaseError(`${tag} lists ${name} but does not hold it`);
  const text = await forgejo.assets.text(copy);
  if (text === undefined || sha256Hex(new TextEncoder().encode(text)) !== sums.get(name)) {
    throw new ReleaseError(`${name} of ${tag} does not match ${SUMS_NAME}; refusing to boot it`);
  }
  return text;
}

/**
 * The assets of the chosen targets from manifest.json, each as SHA256SUMS lists it, and each
 * built script as the boot directory serves it (read with `readScript`). A release signed for
 * iPXE carries that script itself, signed: it is served unchanged, with its signature and
 * those of the files it loads beside it.
 */
async function bootFilesOf(
  manifest: Pick<Manifest, "assets">,
  sums: Map<string, string>,
  targets: string[],
  system: string,
  tag: string,
  readScript: (name: string) => Promise<string>,
): Promise<BootSet> {
  const chosen = assetsOfTargets(manifest, targets, system, tag);
  const built = chosen.filter((a) => a.name.endsWith(".built.ipxe"));
  const signed = built.some((script) => sums.has(signedScriptName(script.name)));
  // Signatures and signed scripts are laid out below, whether manifest.json lists them or not.
  const assets = signed
    ? chosen.filter((a) =>
      !a.name.endsWith(".dir.ipxe") && !(a.name.endsWith(".sig") && sums.has(a.name.slice(0, -4)))
    )
    : chosen;
  const listed = (name: string) => {
    const sha256 = sums.get(name);
    if (!sha256) {
      throw new ReleaseError(
        `${name} is not listed in ${tag}'s ${SUMS_NAME}: the release is inconsistent, refusing to trust it`,
      );
    }
    return { name, sha256 };
  };
  // The signatures are small and are downloaded first: one that does not match is found before
  // any image is asked for.
  const signatures = signed
    ? assets.filter((a) => sums.has(`${a.name}.sig`)).map((a) => listed(`${a.name}.sig`))
    : [];
  const files: BootFile[] = [...signatures, ...assets.map((asset) => listed(asset.name))];
  const scripts = [];
  for (const script of built) {
    const local = built.length === 1
      ? LOCAL_SCRIPT
      : script.name.replace(/\.built\.ipxe$/, ".local.ipxe");
    const siblings = assets.filter((a) =>
      a.target === script.target && a.system === script.system && !a.name.endsWith(".ipxe")
    );
    const signedScript = signedScriptName(script.name);
    if (sums.has(signedScript)) {
      const text = await readScript(signedScript);
      const served = new Set(siblings.flatMap((a) => [a.name, `${a.name}.sig`]));
      const loaded = checkSignedScript(signedScript, text, served, tag);
      for (const name of [signedScript, ...loaded]) {
        if (!sums.has(`${name}.sig`)) {
          throw new ReleaseError(
            `${tag} is signed for iPXE (its ${SUMS_NAME} lists ${signedScript}) but has no ${name}.sig, so a trusted iPXE refuses to boot it: refusing it; nothing was changed: publish the release again with the iPXE signing key`,
          );
        }
      }
      files.unshift({ ...listed(`${signedScript}.sig`), localName: `${local}.sig` });
      scripts.push({ name: local, text, signature: `${local}.sig` });
      continue;
    }
    const locate = (file: string) => {
      const found = siblings.find((a) => path.basename(a.storePath) === file);
      return found && encodeURIComponent(found.name);
    };
    scripts.push({
      name: local,
      text: serveFromDirectory(script.name, await readScript(script.name), locate, tag),
    });
  }
  return { files, scripts };
}

/**
 * Each file with the size the signed manifest records for it: the server's sizes are only its
 * word, so a download stops at the smaller of the two.
 */
function withSignedSizes(boot: BootSet, manifest: Pick<Manifest, "assets">): BootSet {
  const files = boot.files.map((file) => {
    const size = manifest.assets.find((asset) => asset.name === file.name)?.size;
    return size === undefined ? file : { ...file, size };
  });
  return { ...boot, files };
}

function oneScript(scripts: string[], options: DownloadOptions, tag: string): string {
  if (scripts.length === 1) return scripts[0];
  const fitting = scripts.filter((name) =>
    name.includes(options.system) && options.targets.some((target) => name.includes(target))
  );
  if (fitting.length === 1) return fitting[0];
  throw new ReleaseError(
    `${tag} has no ${MANIFEST_NAME} and ${
      fitting.length === 0 ? "none" : "more than one"
    } of its iPXE scripts (${
      scripts.join(", ")
    }) fits --targets and --system: cannot tell which to boot`,
  );
}

/**
 * Files downloaded at once. Each is hashed on this process's one JS thread as it arrives, so
 * more lanes add no hashing speed: on loopback with 2 cores, 1, 2, 3 and 4 lanes fetched
 * 4 x 512 MiB in 3.9, 3.7, 3.7 and 3.8 s (medians), that thread busy throughout. A few lanes
 * keep it busy while the server or the network is slow on one file, and a file that stalls
 * no longer holds up the rest; more would only hold more connections and memory.
 */
const DOWNLOAD_LANES = 3;

const CURRENT = "current";

const PREVIOUS = "previous";

const LOCK_NAME = ".release-boot.lock";

/** In every tag directory release-boot made: its tag, and by its mtime when it was fetched. */
const TAG_MARK = ".release-boot-tag";

/** A mark holds a directory name: a larger file is none, and is not read. */
const MAX_MARK_SIZE = 1024;

/** A tag as one directory name: `/` (valid in a tag) cannot make a subdirectory. */
function tagDirectoryName(tag: string): string {
  const name = tag.replaceAll("/", "%2F");
  if (name === CURRENT || name === PREVIOUS || name.startsWith(".")) {
    throw new ReleaseError(`a release tagged ${tag} cannot get a directory of its own in DIR`);
  }
  return name;
}

/** Thrown for anything in DIR release-boot did not make: it is never written through. */
/** A file under --out this user cannot read: one line with the fix. */
function cannotRead(file: string, code: string): ReleaseError {
  return new ReleaseError(
    `cannot read ${file} (${code}): check that this user can read and write --out, then rerun`,
  );
}

function notOurs(file: string, what: string): ReleaseError {
  return new ReleaseError(
    `${file} is ${what}, which release-boot did not make: nothing was written through it; remove it, or fetch into another --out`,
  );
}

async function lstatOrUndefined(file: string) {
  return await fs.lstat(file).catch((error: NodeJS.ErrnoException) => {
    if (error.code === "ENOENT") return undefined;
    throw cannotRead(file, error.code ?? error.message);
  });
}

/**
 * One fetch at a time per DIR: a lock file holding the pid, created exclusively. A lock whose
 * process is gone is taken over; a live one makes this fetch stop at once. A file-system call
 * that fails under DIR (read-only, full, immutable) ends the fetch with one line.
 */
async function withBootLock<T>(run: Run, out: string, work: () => Promise<T>): Promise<T> {
  try {
    return await lockedIn(run, out, work);
  } catch (error) {
    throw fileSystemFailure(
      error,
      `check that this user can write --out ${out} (not read-only, full or immutable), then rerun`,
    );
  }
}

async function lockedIn<T>(run: Run, out: string, work: () => Promise<T>): Promise<T> {
  const root = await lstatOrUndefined(out);
  if (root && !root.isDirectory()) {
    const real = await fs.stat(out).catch(() => undefined);
    if (!real?.isDirectory()) throw new ReleaseError(`--out ${out} is not a directory`);
  }
  await fs.mkdir(out, { recursive: true }).catch((error: NodeJS.ErrnoException) => {
    throw new ReleaseError(`cannot make --out ${out} (${error.code ?? error.message})`);
  });
  const { mode } = await fs.stat(out);
  if (mode & 0o022) {
    run.log(
      `warning: --out ${out} can be written by other users (mode ${
        (mode & 0o777).toString(8)
      }), who then choose what boots: chmod go-w ${out}`,
    );
  }
  const file = path.join(out, LOCK_NAME);
  const lock = {
    file,
    taker: "fetch",
    guards: path.dirname(file),
    notALock: (planted: string) => notOurs(planted, "not a lock file"),
  };
  await takeLock(run, lock);
  try {
    await removeHalfMade(out);
    return await work();
  } finally {
    await releaseLock(lock);
  }
}

/**
 * Under the lock, what a killed fetch left half-made goes: a tag directory (`.NAME.PID.new`),
 * and what it left making or taking over the lock, unless a live fetch is making one now.
 */
async function removeHalfMade(out: string): Promise<void> {
  for (const entry of await fs.readdir(out)) {
    if (!entry.startsWith(`${LOCK_NAME}.`) && /^\..+\.\d+\.new$/.test(entry)) {
      await fs.rm(path.join(out, entry), { recursive: true, force: true });
    }
  }
  await removeLeftoversOfKilledRuns(out, LOCK_NAME);
}

/**
 * Refuses before anything is written when DIR's file system cannot hold the files still to
 * download, at the sizes the release lists, instead of filling it part-way.
 */
async function refuseWithoutRoom(
  out: string,
  directory: string,
  release: Release,
  files: BootFile[],
): Promise<void> {
  let needed = 0;
  for (const file of files) {
    if (await lstatOrUndefined(path.join(out, directory, file.localName ?? file.name))) continue;
    needed += release.assets.find((asset) => asset.name === file.name)?.size ?? 0;
  }
  const { bavail, bsize } = await fs.statfs(out);
  if (needed > bavail * bsize) {
    throw new ReleaseError(
      `${release.tag_name} needs ${formatBytes(needed)} in ${out}, whose file system has ${
        formatBytes(bavail * bsize)
      } free: nothing was written; free some space, or fetch into another --out`,
    );
  }
}

/** A file with another name elsewhere is refused: whoever writes there changes what boots. */
function refuseHardLink(file: string, stat: { nlink: number }): void {
  if (stat.nlink !== 1) throw notOurs(file, `a file with ${stat.nlink} hard links`);
}

/**
 * The mark of a tag directory release-boot made: the directory's name, and when it was fetched.
 * Anything but a small regular file is no mark, and is not read.
 */
async function readMark(dir: string): Promise<{ tag: string; at: number } | undefined> {
  const mark = path.join(dir, TAG_MARK);
  const read = await readSmallFile(mark, MAX_MARK_SIZE, { followLinks: false });
  if ("bytes" in read) {
    return { tag: new TextDecoder().decode(read.bytes).trim(), at: read.mtimeMs };
  }
  if (read.problem === "unreadable" && read.code !== "ENOENT") {
    throw cannotRead(mark, read.code);
  }
  return undefined;
}

/**
 * DIR/<tag>: made here, or made by an earlier fetch (its mark names it). A link, a file, a
 * directory without that mark, or a link or hard-linked file inside it is refused before
 * anything is written.
 */
async function openTagDirectory(out: string, name: string): Promise<string> {
  const dir = path.join(out, name);
  const mark = path.join(dir, TAG_MARK);
  const stat = await lstatOrUndefined(dir);
  if (!stat) {
    // Made beside it and renamed into place, so DIR/<tag> never exists without its mark.
    const fresh = path.join(out, `.${name}.${process.pid}.new`);
    await fs.rm(fresh, { recursive: true, force: true });
    await fs.mkdir(fresh);
    await fs.writeFile(path.join(fresh, TAG_MARK), `${name}\n`, { flag: "wx" });
    await fs.rename(fresh, dir);
    return dir;
  }
  if (!stat.isDirectory()) {
    throw notOurs(dir, stat.isSymbolicLink() ? "a symbolic link" : "not a directory");
  }
  const marked = await readMark(dir);
  if (marked?.tag !== name) {
    throw notOurs(
      dir,
      marked
        ? `a directory release-boot made for ${marked.tag}`
        : "a directory without release-boot's mark",
    );
  }
  for (const entry of await fs.readdir(dir)) {
    const file = path.join(dir, entry);
    const entryStat = await lstatOrUndefined(file);
    if (entryStat && !entryStat.isFile()) {
      throw notOurs(file, entryStat.isSymbolicLink() ? "a symbolic link" : "not a regular file");
    }
    if (entryStat) refuseHardLink(file, entryStat);
  }
  const now = new Date();
  await fs.utimes(mark, now, now);
  return dir;
}

/**
 * Downloads into `<name>.<sha>.part` (resuming one left by an interrupted run), hashing the
 * bytes as they are written, and only when they match SHA256SUMS renames the part to its
 * final name. A part that does not match is deleted; an existing file with other bytes is
 * refused, never replaced. `text`, a script already read, is written the same way instead of
 * being downloaded again. `signal` stops the download where it is, its part kept to resume.
 */
async function downloadVerified(
  run: Run,
  forgejo: Forgejo,
  release: Release,
  file: BootFile,
  dir: string,
  text?: string,
  signal?: AbortSignal,
): Promise<void> {
  const local = file.localName ?? file.name;
  const final = path.join(dir, local);
  const existing = await lstatOrUndefined(final);
  if (existing) {
    if (!existing.isFile()) throw notOurs(final, "not a regular file");
    refuseHardLink(final, existing);
    if ((await hashFile(final)).sha256 === file.sha256) {
      run.log(`${local}: already here and verified`);
      return;
    }
    throw notOurs(final, `a file whose bytes ${SUMS_NAME} does not list`);
  }
  const copy = release.assets.find((a) => a.name === file.name);
  if (!copy) throw new ReleaseError(`${release.tag_name} lists ${file.name} but does not hold it`);
  // The checksum is in the name, so a part left by another release is never resumed.
  const part = `${final}.${file.sha256.slice(0, 16)}.part`;
  await removeStaleParts(dir, local, part);
  // Nothing past the size the server lists, nor past the one a signed manifest records.
  const limit = Math.min(copy.size, file.size ?? copy.size);
  const known = text === undefined ? undefined : new TextEncoder().encode(text);
  const tag = release.tag_name;
  const got = await downloadToPart(run, forgejo, copy, limit, part, tag, known, signal);
  if (got.sha256 !== file.sha256) {
    await fs.rm(part, { force: true });
    throw new ReleaseError(
      `${file.name} does not match ${SUMS_NAME} (expected ${file.sha256}, got ${got.sha256} for ${got.size} bytes); the download was deleted: rerun, and if it persists the release's file is damaged`,
    );
  }
  await renameNew(part, final);
  run.log(
    `${local}: ${formatBytes(got.size)}, sha256 verified${
      local === file.name ? "" : ` (${file.name} of the release)`
    }`,
  );
}

/** Renames only onto a name nothing holds: a file planted meanwhile is refused, not replaced. */
async function renameNew(from: string, to: string): Promise<void> {
  if (await lstatOrUndefined(to)) throw notOurs(to, "already there");
  await fs.rename(from, to);
}

/** Parts of `name` other than `keep`; never another file's, whose name may start like it. */
async function removeStaleParts(dir: string, name: string, keep: string): Promise<void> {
  for (const entry of await fs.readdir(dir)) {
    const file = path.join(dir, entry);
    const ofName = entry.startsWith(`${name}.`) &&
      /^[0-9a-f]{16}\.part$/.test(entry.slice(name.length + 1));
    if (ofName && file !== keep) {
      // openTagDirectory refused links: this unlinks a regular file release-boot named.
      await fs.rm(file, { force: true });
    }
  }
}

const { O_WRONLY, O_APPEND, O_RDONLY, O_NOFOLLOW } = fsConstants;

/**
 * One GET of an asset into `part`, from where an earlier run stopped (from the start when the
 * server will not resume there), hashed in the same pass that writes it (a resumed part's
 * bytes are hashed first). The part is opened never through a link: a new one exclusively, a
 * resumed one with O_NOFOLLOW and one name only. Nothing past `limit`, the size the release
 * lists, is read or kept. The client judges the server's range answer, follows redirects
 * (without the token off the Forgejo origin) and retries. `known`, the asset's bytes already
 * read, are written as if downloaded whole, and nothing is asked of the server.
 */
async function downloadToPart(
  run: Run,
  forgejo: Forgejo,
  copy: Attachment,
  limit: number,
  part: string,
  tag: string,
  known: Uint8Array | undefined,
  signal?: AbortSignal,
): Promise<{ sha256: string; size: number }> {
  const left = await lstatOrUndefined(part);
  if (left) refuseHardLink(part, left);
  // A part at or past the listed size is no download in progress: it goes, never resumed.
  const kept = left && left.size < limit ? left : undefined;
  if (left && !kept) await fs.rm(part);
  const have = kept?.size ?? 0;
  const answer = known
    ? { kind: "bytes" as const, from: 0, body: [known] }
    : await forgejo.assets.openFrom(copy, have, signal).catch((error: Error) => {
      if (error instanceof ReleaseError) throw error;
      throw new ReleaseError(
        `the download of ${copy.name} failed (${error.message}); rerun to resume`,
      );
    });
  const hash = createHash("sha256");
  if (answer.kind === "nothing past the offset") {
    return { sha256: await hashPart(part, hash), size: have }; // The part has every byte.
  }
  if (answer.kind === "elsewhere") {
    await fs.rm(part, { force: true });
    throw new ReleaseError(
      `the server resumed ${copy.name} at ${
        answer.range || "an unknown offset"
      }, not at ${have}; rerun to download it whole`,
    );
  }
  const resuming = answer.from > 0;
  if (resuming) {
    run.log(`${copy.name}: resuming after ${formatBytes(have)}`);
    await hashPart(part, hash);
  } else if (kept) {
    // Unlinked and made anew, never truncated: truncating writes to whatever the name holds.
    // An empty part, left by a fetch stopped before its first byte, goes the same way.
    await fs.rm(part);
  }
  const flags = resuming ? O_WRONLY | O_NOFOLLOW | O_APPEND : "wx";
  const handle = await fs.open(part, flags).catch((error: NodeJS.ErrnoException) => {
    throw error.code === "ELOOP" || error.code === "EEXIST"
      ? notOurs(part, "a symbolic link or a file planted meanwhile")
      : new ReleaseError(`cannot write ${part} (${error.code ?? error.message})`);
  });
  let size = resuming ? have : 0;
  // False while the part may hold bytes it must not keep: a write failed half-way, or the
  // server sent more than the release lists. Then the part is deleted, not left to resume.
  let resumable = true;
  try {
    refuseHardLink(part, await handle.stat());
    for await (const chunk of answer.body) {
      size += chunk.length;
      if (size > limit) {
        resumable = false;
        throw new ReleaseError(
          `${copy.name} is larger than the ${limit} bytes ${tag} lists: the server sent more, so the download was stopped and deleted; rerun, and if it persists the release's file is damaged`,
        );
      }
      hash.update(chunk);
      resumable = false;
      await handle.write(chunk);
      resumable = true;
    }
  } catch (error) {
    if (error instanceof ReleaseError) throw error;
    const failure = error as NodeJS.ErrnoException;
    throw new ReleaseError(
      resumable
        ? `the download of ${copy.name} stopped (${failure.message}); rerun to resume`
        : `cannot write ${part} (${
          failure.code ?? failure.message
        }): the download was deleted; make room under --out and rerun`,
    );
  } finally {
    await handle.close();
    if (!resumable) await fs.rm(part, { force: true });
  }
  return { sha256: hash.digest("hex"), size };
}

/** Feeds a part's bytes into `hash`, read never through a link; returns the digest's hex. */
async function hashPart(part: string, hash: ReturnType<typeof createHash>): Promise<string> {
  const handle = await fs.open(part, O_RDONLY | O_NOFOLLOW).catch(() => {
    throw notOurs(part, "a symbolic link");
  });
  try {
    for await (const chunk of handle.createReadStream({ highWaterMark: READ_SIZE })) {
      hash.update(chunk);
    }
  } finally {
    await handle.close();
  }
  return hash.copy().digest("hex");
}

/**
 * Makes the directory servable as it is: netboot.ipxe, the release's script rewritten so that
 * kernel and initrd load from beside it (or, signed for iPXE, the release's own boot-directory
 * script unchanged), and its own SHA256SUMS listing every file it serves.
 */
async function writeBootDirectory(run: Run, dir: string, boot: BootSet): Promise<void> {
  for (const script of boot.scripts) {
    await writeOwnFile(path.join(dir, script.name), script.text);
    run.log(
      script.signature
        ? `${script.name}: the release's signed script, unchanged, verified by iPXE against ${script.signature}`
        : `${script.name}: loads its kernel and initrd from the same directory`,
    );
  }
  const written = boot.files.map((file) => ({
    name: file.localName ?? file.name,
    sha256: file.sha256,
  }));
  const served = boot.scripts.map((script) => ({
    name: script.name,
    sha256: sha256Hex(new TextEncoder().encode(script.text)),
  }));
  await writeOwnFile(path.join(dir, SUMS_NAME), renderSums([...written, ...served]));
}

/**
 * Writes a file release-boot makes; one already there with other bytes is not ours. What is
 * there is read only as far as the bytes it should hold, never through a link or from a FIFO:
 * a larger file has other contents, however large.
 */
async function writeOwnFile(file: string, text: string): Promise<void> {
  const bytes = new TextEncoder().encode(text);
  const existing = await readSmallFile(file, bytes.length, { followLinks: false });
  if ("bytes" in existing) {
    refuseHardLink(file, existing);
    if (Buffer.from(existing.bytes).equals(bytes)) return;
    throw notOurs(file, "a file with other contents");
  }
  if (existing.problem !== "unreadable") {
    const larger = existing.problem === "too large";
    throw notOurs(file, larger ? "a file with other contents" : "not a regular file");
  }
  if (existing.code !== "ENOENT") throw cannotRead(file, existing.code);
  const part = `${file}.part`;
  await fs.rm(part, { force: true });
  await fs.writeFile(part, text, { flag: "wx" });
  await renameNew(part, file);
}

/** The tag directory a link in DIR names, if it is one release-boot made; else undefined. */
async function linkTarget(out: string, name: string): Promise<string | undefined> {
  const link = path.join(out, name);
  const stat = await lstatOrUndefined(link);
  if (!stat) return undefined;
  if (!stat.isSymbolicLink()) throw notOurs(link, "not a symbolic link");
  const target = await fs.readlink(link);
  if (target.includes("/") || target.startsWith(".")) {
    throw notOurs(link, `a link to ${target}`);
  }
  return target;
}

/** Replaces (or makes) the link DIR/<name> -> <target> in one rename: never half-pointed. */
async function pointLink(out: string, name: string, target: string): Promise<void> {
  const fresh = path.join(out, `.${name}.${process.pid}.new`);
  await fs.rm(fresh, { force: true });
  await fs.symlink(target, fresh);
  await fs.rename(fresh, path.join(out, name));
}

/** DIR/current -> the new tag; DIR/previous -> what current was, when that differs. */
async function pointCurrentAt(run: Run, out: string, directory: string): Promise<void> {
  const before = await linkTarget(out, CURRENT);
  await linkTarget(out, PREVIOUS);
  if (before === directory) return;
  if (before) await pointLink(out, PREVIOUS, before);
  await pointLink(out, CURRENT, directory);
  run.log(`${path.join(out, CURRENT)} -> ${directory}${before ? ` (previous: ${before})` : ""}`);
}

/** fetch --rollback: current and previous swap, so a second rollback rolls forward again. */
async function rollBack(run: Run, out: string): Promise<void> {
  const current = await linkTarget(out, CURRENT);
  const previous = await linkTarget(out, PREVIOUS);
  if (!previous) {
    throw new ReleaseError(
      `${out} has no previous release to roll back to: fetch at least two releases into it first`,
    );
  }
  const stat = await lstatOrUndefined(path.join(out, previous));
  if (!stat?.isDirectory()) {
    throw new ReleaseError(`${path.join(out, previous)} is gone: fetch that release again`);
  }
  const mark = await readMark(path.join(out, previous));
  if (mark?.tag !== previous) {
    throw new ReleaseError(
      `${
        path.join(out, PREVIOUS)
      } points at ${previous}, which is not a release directory release-boot made (${
        mark ? `its ${TAG_MARK} names ${mark.tag}` : `it has no ${TAG_MARK}`
      }): nothing was changed; fetch the release to roll back to with --tag instead`,
    );
  }
  if (current) await pointLink(out, PREVIOUS, current);
  await pointLink(out, CURRENT, previous);
  run.log(
    `Rolled back: ${path.join(out, CURRENT)} -> ${previous}${current ? ` (was ${current})` : ""}`,
  );
  run.result(path.join(out, previous));
}

/**
 * Keeps the `keep` most recently fetched tag directories, and always current and previous. A
 * directory counts as fetched only when its mark names it: a copy under another name is not.
 */
async function removeOldReleases(run: Run, out: string, keep: number): Promise<void> {
  const pinned = new Set([await linkTarget(out, CURRENT), await linkTarget(out, PREVIOUS)]);
  const fetched: { name: string; at: number }[] = [];
  for (const name of await fs.readdir(out)) {
    if (name.startsWith(".") || name === CURRENT || name === PREVIOUS) continue;
    const stat = await lstatOrUndefined(path.join(out, name));
    const mark = stat?.isDirectory() && await readMark(path.join(out, name));
    if (mark && mark.tag === name) fetched.push({ name, at: mark.at });
  }
  fetched.sort((a, b) => b.at - a.at);
  const kept = new Set([...pinned].filter((name) => name !== undefined));
  for (const { name } of fetched) {
    if (kept.size < keep) kept.add(name);
  }
  for (const { name } of fetched.filter(({ name }) => !kept.has(name))) {
    await fs.rm(path.join(out, name), { recursive: true }).catch((error: NodeJS.ErrnoException) => {
      // A recursive rm's failure names no path: it is this directory or something in it.
      error.path ??= path.join(out, name);
      throw error;
    });
    run.log(`Removed ${path.join(out, name)} (--keep ${keep})`);
  }
}

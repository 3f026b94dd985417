/**
 * A local stage: a release's files written to one directory (--out) that is always whole, an
 * earlier stage or the new one, never a mix, by one stage at a time. It must not touch anything
 * in --out's parent but its own `<out>.partial-*` directories and `<out>.lock` (with what a
 * killed run left making or taking over that lock), nor replace a directory it did not write.
 */
import * as fs from "node:fs/promises";
import * as path from "node:path";
import { ASSET_NAME, INDEX_NAMES, MANIFEST_NAME, SUMS_NAME } from "../../types/manifest.ts";
import { fileSystemFailure, ReleaseError, type Run, stoppable, UsageError } from "./run.ts";
import {
  type DirLock,
  refuseIfHeld,
  releaseLock,
  removeLeftoversOfKilledRuns,
  takeLock,
} from "./dir_lock.ts";
import { type BundleAsset, MAX_INDEX_FILE } from "./forgejo.ts";
import { parseSums } from "./release_index.ts";
import { readSmallFile } from "./small_file.ts";

/** The suffix of an earlier stage moved aside while the new one is renamed into its place. */
const ASIDE = ".replaced";

/** The suffix of the lock beside --out that a stage holds while it writes. */
const LOCK = ".lock";

/**
 * Refuses, before any build, an --out that another stage is writing, is a file, or holds
 * anything but an earlier stage. `out` names it as given; `dir` is where it is.
 */
export async function refuseUnusableOut(out: string, dir: string): Promise<void> {
  await refuseIfHeld(stageLock(dir));
  const stat = await fs.lstat(dir).catch(() => undefined);
  if (!stat) return;
  if (!stat.isDirectory()) {
    throw new UsageError(`--out ${out} is not a directory: choose a new or empty directory`);
  }
  const entries = await fs.readdir(dir);
  if (entries.length > 0 && !await isEarlierStage(dir, entries)) {
    throw new UsageError(
      `--out ${out} holds files that are not an earlier stage of release-boot, and a stage replaces it whole: choose a new or empty directory`,
    );
  }
}

/**
 * True when every entry of `dir` is a file an earlier stage wrote: manifest.json, SHA256SUMS
 * and the names SHA256SUMS lists. A stage replaces --out whole, so nothing else may be there.
 */
async function isEarlierStage(dir: string, entries: string[]): Promise<boolean> {
  if (!entries.includes(SUMS_NAME) || !entries.includes(MANIFEST_NAME)) return false;
  // A stage wrote a small regular file: a link, a FIFO or a huge file there is not one.
  const sums = await readSmallFile(path.join(dir, SUMS_NAME), MAX_INDEX_FILE, {
    followLinks: false,
  });
  if ("problem" in sums) return false;
  const listed = parseSums(new TextDecoder().decode(sums.bytes));
  return entries.every((entry) => INDEX_NAMES.has(entry) || listed.has(entry));
}

/**
 * Writes `assets` next to `out`, then renames them in: a failure, SIGTERM or Ctrl-C never
 * leaves a half-written `out`, and a rerun replaces the earlier stage whole.
 */
export async function writeStage(run: Run, out: string, assets: BundleAsset[]): Promise<void> {
  await refuseUnusableOut(out, out);
  const cannotWrite = (error: unknown) =>
    fileSystemFailure(
      error,
      `check that this user can write ${
        path.dirname(out)
      } (a directory, not read-only or full), then rerun`,
    );
  await fs.mkdir(path.dirname(out), { recursive: true }).catch((error) => {
    throw cannotWrite(error);
  });
  // Two stages into one --out at once would each take the other's partial copy for a killed
  // stage's and remove it.
  const lock = stageLock(out);
  await takeLock(run, lock);
  try {
    await writeLocked(run, out, assets, cannotWrite);
  } finally {
    await releaseLock(lock);
  }
}

function stageLock(out: string): DirLock {
  const file = `${out}${LOCK}`;
  return {
    file,
    taker: "stage",
    guards: out,
    notALock: (planted) =>
      new ReleaseError(
        `${planted} is not a lock file, which release-boot did not make: remove it, or stage into another --out`,
      ),
  };
}

async function writeLocked(
  run: Run,
  out: string,
  assets: BundleAsset[],
  cannotWrite: (error: unknown) => unknown,
): Promise<void> {
  const partial = await startStage(run, out).catch((error) => {
    throw cannotWrite(error);
  });
  // Stopped part-way (SIGTERM from CI, Ctrl-C), the partial copy goes at once and nothing
  // more is written; the copy of a file under way (fs.copyFile cannot be interrupted, and is
  // several times faster than a copy that could) ends first, and a second signal ends the
  // process at once.
  const removePartial = () => {
    try {
      Deno.removeSync(partial, { recursive: true });
    } catch {
      // Already renamed into place: nothing partial is left.
    }
  };
  // The stage it replaces is moved aside, not deleted, until the new one is in place: a run
  // that fails or is stopped in between puts it back, so `out` always holds a whole stage.
  const aside = `${partial}${ASIDE}`;
  let movedAside = false;
  await stoppable(async (stop) => {
    try {
      await fs.chmod(partial, 0o755);
      for (const asset of assets) {
        stop.throwIfAborted();
        const target = path.join(partial, asset.name);
        if (asset.path) await fs.copyFile(asset.path, target);
        else await fs.writeFile(target, asset.bytes ?? new Uint8Array());
        await fs.chmod(target, 0o644);
      }
      stop.throwIfAborted();
      movedAside = await fs.rename(out, aside).then(() => true, (error) => {
        if (error.code === "ENOENT") return false;
        throw error;
      });
      stop.throwIfAborted();
      await fs.rename(partial, out);
    } catch (error) {
      await fs.rm(partial, { recursive: true, force: true });
      const outGone = await fs.lstat(out).then(() => false, () => true);
      if (movedAside && outGone) await fs.rename(aside, out);
      throw cannotWrite(error);
    }
    await fs.rm(aside, { recursive: true, force: true });
  }, removePartial);
}

/** The directory a stage is written in beside `out`, once what killed stages left is gone. */
async function startStage(run: Run, out: string): Promise<string> {
  await cleanUpAfterKilledStages(run, out);
  return await fs.mkdtemp(`${out}.partial-`);
}

/**
 * What a killed stage left beside `out`: `<out>.partial-*` directories of plain files, and the
 * files it left making or taking over the lock (`<out>.lock.PID.new`, `<out>.lock.takeover`),
 * never anything else. A stage killed between moving the earlier one aside and renaming the new
 * one in left `out` missing: the earlier stage goes back in its place.
 */
async function cleanUpAfterKilledStages(run: Run, out: string): Promise<void> {
  const parent = path.dirname(out);
  await removeLeftoversOfKilledRuns(parent, `${path.basename(out)}${LOCK}`);
  const prefix = `${path.basename(out)}.partial-`;
  const entries = (await fs.readdir(parent)).filter((entry) => entry.startsWith(prefix)).sort();
  for (const entry of entries) {
    const movedAside = entry.endsWith(ASIDE);
    if (entry.length !== prefix.length + 6 + (movedAside ? ASIDE.length : 0)) continue;
    const dir = path.join(parent, entry);
    const stat = await fs.lstat(dir);
    if (!stat.isDirectory()) continue;
    const files = await fs.readdir(dir, { withFileTypes: true });
    if (!files.every((file) => file.isFile() && ASSET_NAME.test(file.name))) continue;
    const outGone = await fs.lstat(out).then(() => false, () => true);
    if (movedAside && outGone) {
      await fs.rename(dir, out);
      run.log(`Put back ${out}, which an interrupted stage had moved aside as ${dir}`);
    } else {
      await fs.rm(dir, { recursive: true, force: true });
      run.log(`Removed ${dir}, left by an interrupted stage`);
    }
  }
}

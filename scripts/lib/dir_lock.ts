/**
 * One writer at a time: a lock file holding its taker's pid, created exclusively, taken over
 * when that process is gone. It reads and writes only the lock file and its `.PID.stale`
 * aside, never what the lock guards.
 */
import process from "node:process";
import * as fs from "node:fs/promises";
import * as path from "node:path";
import { ReleaseError, type Run } from "./run.ts";
import { readSmallFile } from "./small_file.ts";

/** A lock holds a pid: a larger file is no lock, and is not read. */
const MAX_LOCK_SIZE = 1024;

export interface DirLock {
  /** The lock file. */
  file: string;
  /** Who takes it, as its messages name them: `fetch`, `stage`. */
  taker: string;
  /** What it guards, as its messages name it. */
  guards: string;
  /** The failure for a `file` that is there but is no lock: one line with the fix. */
  notALock: () => Error;
}

/**
 * Takes `lock`, or fails at once with one line naming the live process that holds it. A lock
 * whose process is gone (a run that was killed) is taken over, and the takeover is logged.
 */
export async function takeLock(run: Run, lock: DirLock): Promise<void> {
  for (let attempt = 1;; attempt++) {
    try {
      await fs.writeFile(lock.file, `${process.pid}\n`, { flag: "wx" });
      return;
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code !== "EEXIST") {
        throw new ReleaseError(
          `cannot lock ${lock.guards} (${
            (error as NodeJS.ErrnoException).code
          }): check that this user can write ${path.dirname(lock.file)}, then rerun`,
        );
      }
    }
    const pid = await lockHolder(lock.file);
    if (pid === undefined) throw lock.notALock();
    if (attempt > 2 || (pid > 0 && isRunning(pid))) {
      throw new ReleaseError(
        `another ${lock.taker} (pid ${
          pid || "unknown"
        }) is writing ${lock.guards}: let it finish and rerun; if no such process runs, remove ${lock.file}`,
      );
    }
    // Moved aside, not deleted: if another run took it over first, the moved file is that
    // run's live lock and goes straight back.
    const aside = staleName(lock.file, process.pid);
    if (!await fs.rename(lock.file, aside).then(() => true, () => false)) continue;
    const moved = await lockHolder(aside);
    if (moved !== pid) {
      await fs.link(aside, lock.file).catch(() => undefined);
      await fs.rm(aside, { force: true });
      if (moved === undefined) throw lock.notALock();
      throw new ReleaseError(
        `another ${lock.taker} (pid ${moved}) is writing ${lock.guards}: let it finish and rerun`,
      );
    }
    await fs.rm(aside, { force: true });
    run.log(`Taking over ${lock.file}: its ${lock.taker} (pid ${pid || "unknown"}) is gone`);
  }
}

/** Gives `lock` up; the run that took it calls this however it ends. */
export async function releaseLock(lock: DirLock): Promise<void> {
  await fs.rm(lock.file, { force: true });
}

/** The name a takeover moves a dead run's lock to; a run killed meanwhile leaves it behind. */
function staleName(file: string, pid: number): string {
  return `${file}.${pid}.stale`;
}

/** True for the name of what a takeover of lock file `lockName` left (`NAME.PID.stale`). */
export function isStaleLockName(entry: string, lockName: string): boolean {
  return entry.startsWith(`${lockName}.`) && /^\.\d+\.stale$/.test(entry.slice(lockName.length));
}

/**
 * The pid a lock file holds: 0 when it is gone, unreadable or empty (a lock whose run has not
 * yet written its pid); undefined when it is no lock at all: it holds anything but a pid, or is
 * not a regular file or larger than any lock, which is never read, so a FIFO or a huge file
 * there can neither block nor fill this process.
 */
async function lockHolder(file: string): Promise<number | undefined> {
  const read = await readSmallFile(file, MAX_LOCK_SIZE, { followLinks: false });
  if (!("bytes" in read)) return read.problem === "unreadable" ? 0 : undefined;
  const text = new TextDecoder().decode(read.bytes).trim();
  return /^\d{0,10}$/.test(text) ? Number(text) : undefined;
}

function isRunning(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (error) {
    return (error as NodeJS.ErrnoException).code === "EPERM";
  }
}

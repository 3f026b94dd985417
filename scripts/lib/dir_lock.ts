/**
 * One writer at a time: a lock file holding its taker's pid (with the boot and start time that
 * tell that process from a later one given the same pid), created exclusively, taken over when
 * that process is gone. It reads and writes only the lock file and its companions (`.PID.new`,
 * and `.takeover`, which the kernel locks while a dead run's lock is replaced), never what the
 * lock guards.
 */
import process from "node:process";
import * as fs from "node:fs/promises";
import * as path from "node:path";
import { ReleaseError, type Run } from "./run.ts";
import { readSmallFile } from "./small_file.ts";

/** A lock holds a pid and an identity: a larger file is no lock, and is not read. */
const MAX_LOCK_SIZE = 1024;

/** Looks at a lock another run is taking over, before saying it is held. */
const TAKEOVER_LOOKS = 5;

const TAKEOVER_WAIT_MS = 20;

export interface DirLock {
  /** The lock file. */
  file: string;
  /** Who takes it, as its messages name them: `fetch`, `stage`. */
  taker: string;
  /** What it guards, as its messages name it. */
  guards: string;
  /** The failure for `file` (the lock, or its `.takeover`) there but no lock: one line with the fix. */
  notALock: (file: string) => Error;
}

/**
 * Takes `lock`, or fails at once with one line naming the live process that holds it. A lock
 * whose process is gone (a run that was killed) is taken over, and the takeover is logged.
 */
export async function takeLock(run: Run, lock: DirLock): Promise<void> {
  for (let look = 1;; look++) {
    if (await createLock(lock)) return;
    const holder = await lockHolder(lock.file);
    if (holder === undefined) throw lock.notALock(lock.file);
    // Released since it was found there: make it again.
    if (holder === GONE && look <= TAKEOVER_LOOKS) continue;
    if (holder === GONE || holder.unreadable || await isRunning(holder)) {
      throw heldBy(lock, holder === GONE ? 0 : holder.pid);
    }
    if (look > TAKEOVER_LOOKS) {
      throw new ReleaseError(
        `another ${lock.taker} is taking over the lock of ${lock.guards} from a run that is gone: rerun`,
      );
    }
    await removeDeadLock(run, lock, holder).catch((error) => {
      throw error instanceof ReleaseError ? error : cannotLock(lock, error);
    });
  }
}

/**
 * Fails as takeLock would when a live run holds `lock`, without taking it: a look before long
 * work (a build), so that a run that would be refused at the end is refused at the start.
 */
export async function refuseIfHeld(lock: DirLock): Promise<void> {
  const holder = await lockHolder(lock.file);
  if (holder === undefined) throw lock.notALock(lock.file);
  if (holder !== GONE && (holder.unreadable || await isRunning(holder))) {
    throw heldBy(lock, holder.pid);
  }
}

function heldBy(lock: DirLock, pid: number): ReleaseError {
  return new ReleaseError(
    `another ${lock.taker} (pid ${
      pid || "unknown"
    }) is writing ${lock.guards}: let it finish and rerun; if no such process runs, remove ${lock.file}`,
  );
}

/**
 * Removes `lock` if it still names `dead`, a run that is gone. One run at a time does this,
 * the one holding the kernel's lock on `<lock>.takeover`: a run that removed a lock it had read
 * as dead could otherwise remove the live one another run made since. The kernel lock ends
 * with its process, so a run killed here blocks no one. A run that finds another taking the
 * lock over waits a moment and looks again.
 */
async function removeDeadLock(run: Run, lock: DirLock, dead: Holder): Promise<void> {
  const guard = takeoverName(lock.file);
  const planted = await fs.lstat(guard).catch(() => undefined);
  if (planted && !planted.isFile()) throw lock.notALock(guard);
  const held = await holdGuard(guard);
  if (!held) {
    await new Promise((resolve) => setTimeout(resolve, TAKEOVER_WAIT_MS));
    return;
  }
  try {
    const now = await lockHolder(lock.file);
    if (now === undefined || now === GONE) return;
    if (now.pid !== dead.pid || now.identity !== dead.identity) return;
    await fs.rm(lock.file, { force: true });
    run.log(`Taking over ${lock.file}: its ${lock.taker} (pid ${dead.pid || "unknown"}) is gone`);
  } finally {
    await dropGuard(guard, held);
  }
}

/**
 * The kernel's lock on `guard` (made if missing), or undefined while another run holds it, or
 * once the name has been removed and made again since it was opened (the lock held is then on
 * a file no one else will open).
 */
async function holdGuard(guard: string): Promise<Deno.FsFile | undefined> {
  const file = await Deno.open(guard, { read: true, write: true, create: true });
  const held = await file.tryLock(true) &&
    (await file.stat()).ino === (await fs.lstat(guard).catch(() => undefined))?.ino;
  if (held) return file;
  file.close();
  return undefined;
}

/**
 * Removes `guard` while still holding it, if the name is still the file held (a run that
 * opened it before then finds it gone, and looks again), then lets it go.
 */
async function dropGuard(guard: string, held: Deno.FsFile): Promise<void> {
  try {
    const [mine, named] = [await held.stat(), await fs.lstat(guard).catch(() => undefined)];
    if (named?.ino === mine.ino) await fs.rm(guard, { force: true });
  } finally {
    held.close();
  }
}

function cannotLock(lock: DirLock, error: unknown): ReleaseError {
  return new ReleaseError(
    `cannot lock ${lock.guards} (${
      (error as NodeJS.ErrnoException).code ?? (error as Error).name
    }): check that this user can write ${path.dirname(lock.file)}, then rerun`,
  );
}

/**
 * Creates the lock file holding this process's pid, or returns false when it is there. The pid is
 * written under a name of this run's own, then linked in: a lock is never seen empty, so a
 * run that reads it while it is being made never takes it for a dead run's.
 */
async function createLock(lock: DirLock): Promise<boolean> {
  const file = lock.file;
  const mine = newName(file, process.pid);
  const identity = await processIdentity(process.pid);
  try {
    // What a run with this pid left when it was killed.
    await fs.rm(mine, { force: true });
    await fs.writeFile(mine, `${[process.pid, identity].filter(Boolean).join(" ")}\n`, {
      flag: "wx",
    });
    try {
      return await fs.link(mine, file).then(() => true, (error: NodeJS.ErrnoException) => {
        if (error.code === "EEXIST") return false;
        throw error;
      });
    } finally {
      await fs.rm(mine, { force: true });
    }
  } catch (error) {
    throw cannotLock(lock, error);
  }
}

/**
 * Gives `lock` up; the run that took it calls this however it ends. A lock that cannot be
 * removed (its directory made read-only meanwhile) is left for the next run to take over: the
 * run's own outcome is what it reports.
 */
export async function releaseLock(lock: DirLock): Promise<void> {
  await fs.rm(lock.file, { force: true }).catch(() => undefined);
}

/** Where a run writes its pid before linking it in as `file`. */
function newName(file: string, pid: number): string {
  return `${file}.${pid}.new`;
}

/** The lock on taking over `file`. */
function takeoverName(file: string): string {
  return `${file}.takeover`;
}

/**
 * Removes what runs killed while making or taking over lock file `lockName` left in `dir`:
 * the regular files `NAME.PID.new` of a pid that runs no more, `NAME.takeover` when no run
 * holds it, and `NAME.PID.stale` of earlier versions. Anything that is not a file stays.
 */
export async function removeLeftoversOfKilledRuns(dir: string, lockName: string): Promise<void> {
  for (const entry of await fs.readdir(dir)) {
    if (!entry.startsWith(`${lockName}.`)) continue;
    const file = path.join(dir, entry);
    const stat = await fs.lstat(file).catch(() => undefined);
    if (!stat?.isFile()) continue;
    const suffix = entry.slice(lockName.length);
    const named = suffix.match(/^\.(\d{1,10})\.(new|stale)$/)?.[1];
    if (named !== undefined && !await isRunning({ pid: Number(named) })) {
      await fs.rm(file, { force: true });
    } else if (suffix === ".takeover") {
      // A run slow to finish its takeover still holds it: removed only from under no one.
      const held = await holdGuard(file);
      if (held) await dropGuard(file, held);
    }
  }
}

/** Who a lock names. */
interface Holder {
  /** 0 when the lock holds no pid (empty). */
  pid: number;
  /** The boot and start time of the process (processIdentity), when the lock recorded them. */
  identity?: string;
  /** It is there, but this user cannot read it: whose it is is not known. */
  unreadable?: boolean;
}

/** A lock file that is not there (any more). */
const GONE = "gone";

/**
 * Who a lock file names, or GONE; undefined when it is no lock at all: it holds anything but a
 * pid (and an identity), or is not a regular file or larger than any lock, which is never
 * read, so a FIFO or a huge file there can neither block nor fill this process.
 */
async function lockHolder(file: string): Promise<Holder | typeof GONE | undefined> {
  const read = await readSmallFile(file, MAX_LOCK_SIZE, { followLinks: false });
  if (!("bytes" in read)) {
    if (read.problem !== "unreadable") return undefined;
    // Not there (ENOENT, or a parent that is no directory), or there but not this user's to read.
    return read.code === "EACCES" || read.code === "EPERM" ? { pid: 0, unreadable: true } : GONE;
  }
  const text = new TextDecoder().decode(read.bytes).trim();
  const match = text.match(/^(\d{0,10})(?: ([0-9a-f-]{1,64}\/\d{1,20}))?$/);
  if (!match) return undefined;
  return match[2] ? { pid: Number(match[1]), identity: match[2] } : { pid: Number(match[1]) };
}

/**
 * The boot (the kernel's boot_id) and start time (in clock ticks since boot) of process `pid`:
 * a pid names one process only until it ends, and after a reboot or once pids wrap around
 * another process has it. Undefined where /proc does not tell.
 */
async function processIdentity(pid: number): Promise<string | undefined> {
  try {
    const boot = (await fs.readFile("/proc/sys/kernel/random/boot_id", "utf8")).trim();
    const stat = await fs.readFile(`/proc/${pid}/stat`, "utf8");
    // The fields after the command name, which is in parentheses and may hold anything.
    const started = stat.slice(stat.lastIndexOf(")") + 2).split(" ")[19];
    return /^[0-9a-f-]{1,64}$/.test(boot) && /^\d{1,20}$/.test(started ?? "")
      ? `${boot}/${started}`
      : undefined;
  } catch {
    return undefined;
  }
}

/**
 * True when the run `holder` names runs now: its pid is a process, and, when the lock recorded
 * one, the same process (a pid given to another since is not). A process whose identity cannot
 * be read is taken to be it.
 */
async function isRunning(holder: Holder): Promise<boolean> {
  if (holder.pid <= 0) return false;
  try {
    process.kill(holder.pid, 0);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code !== "EPERM") return false;
  }
  if (!holder.identity) return true;
  const identity = await processIdentity(holder.pid);
  return identity === undefined || identity === holder.identity;
}

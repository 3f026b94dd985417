/**
 * One writer at a time: a lock file holding its taker's pid (with the boot and start time that
 * tell that process from a later one given the same pid), created exclusively, taken over when
 * that process is gone. It reads and writes only the lock file and its companions (`.PID.new`,
 * `.takeover`), never what the lock guards.
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
  /** The failure for a `file` that is there but is no lock: one line with the fix. */
  notALock: () => Error;
}

/**
 * Takes `lock`, or fails at once with one line naming the live process that holds it. A lock
 * whose process is gone (a run that was killed) is taken over, and the takeover is logged.
 */
export async function takeLock(run: Run, lock: DirLock): Promise<void> {
  for (let look = 1;; look++) {
    if (await createLock(lock, lock.file)) return;
    const holder = await lockHolder(lock.file);
    if (holder === undefined) throw lock.notALock();
    if (await isRunning(holder) || look > TAKEOVER_LOOKS) throw heldBy(lock, holder.pid);
    await removeDeadLock(run, lock, holder);
  }
}

/**
 * Fails as takeLock would when a live run holds `lock`, without taking it: a look before long
 * work (a build), so that a run that would be refused at the end is refused at the start.
 */
export async function refuseIfHeld(lock: DirLock): Promise<void> {
  const holder = await lockHolder(lock.file);
  if (holder === undefined) throw lock.notALock();
  if (await isRunning(holder)) throw heldBy(lock, holder.pid);
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
 * the one that makes `<lock>.takeover`: a run that removed a lock it had read as dead could
 * otherwise remove the live one another run made since. A run that finds another taking it
 * over waits a moment and looks again.
 */
async function removeDeadLock(run: Run, lock: DirLock, dead: Holder): Promise<void> {
  const guard = takeoverName(lock.file);
  if (!await createLock(lock, guard)) {
    const holder = await lockHolder(guard);
    if (holder === undefined) throw lock.notALock();
    // Left by a run killed while taking the lock over: the next look makes it again.
    if (holder.pid > 0 && !await isRunning(holder)) await fs.rm(guard, { force: true });
    else await new Promise((resolve) => setTimeout(resolve, TAKEOVER_WAIT_MS));
    return;
  }
  try {
    const now = await lockHolder(lock.file);
    if (now?.pid !== dead.pid || now.identity !== dead.identity) return;
    await fs.rm(lock.file, { force: true });
    run.log(`Taking over ${lock.file}: its ${lock.taker} (pid ${dead.pid || "unknown"}) is gone`);
  } finally {
    await fs.rm(guard, { force: true });
  }
}

/**
 * Creates `file` holding this process's pid, or returns false when it is there. The pid is
 * written under a name of this run's own, then linked in: a lock is never seen empty, so a
 * run that reads it while it is being made never takes it for a dead run's.
 */
async function createLock(lock: DirLock, file: string): Promise<boolean> {
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
    throw new ReleaseError(
      `cannot lock ${lock.guards} (${
        (error as NodeJS.ErrnoException).code
      }): check that this user can write ${path.dirname(lock.file)}, then rerun`,
    );
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
 * the regular files `NAME.PID.new`, `NAME.takeover`, and `NAME.PID.stale` of earlier versions.
 * A live run's are its lock in the making, and stay; so does anything that is not a file.
 */
export async function removeLeftoversOfKilledRuns(dir: string, lockName: string): Promise<void> {
  for (const entry of await fs.readdir(dir)) {
    if (!entry.startsWith(`${lockName}.`)) continue;
    const file = path.join(dir, entry);
    const suffix = entry.slice(lockName.length);
    const named = suffix.match(/^\.(\d{1,10})\.(new|stale)$/)?.[1];
    const holder = named !== undefined
      ? { pid: Number(named) }
      : suffix === ".takeover"
      ? await lockHolder(file)
      : undefined;
    if (holder === undefined || await isRunning(holder)) continue;
    const stat = await fs.lstat(file).catch(() => undefined);
    if (stat?.isFile()) await fs.rm(file, { force: true });
  }
}

/** Who a lock names: `pid` 0 when the lock is gone, unreadable or empty. */
interface Holder {
  pid: number;
  /** The boot and start time of the process (processIdentity), when the lock recorded them. */
  identity?: string;
}

/**
 * Who a lock file names; undefined when it is no lock at all: it holds anything but a pid (and
 * an identity), or is not a regular file or larger than any lock, which is never read, so a
 * FIFO or a huge file there can neither block nor fill this process.
 */
async function lockHolder(file: string): Promise<Holder | undefined> {
  const read = await readSmallFile(file, MAX_LOCK_SIZE, { followLinks: false });
  if (!("bytes" in read)) return read.problem === "unreadable" ? { pid: 0 } : undefined;
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

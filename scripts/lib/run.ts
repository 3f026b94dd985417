/**
 * One run's context, made in main and passed down: where its output goes (progress on stderr,
 * results on stdout, its secrets redacted), the directory relative paths mean, the shell its
 * child processes start from (no secret in their environment), what to close when it ends,
 * the error classes that end a run, and SIGINT or SIGTERM made a run's own end. Nothing here
 * outlives a run; it knows nothing of releases, Forgejo or nix.
 */
import * as path from "node:path";
import { $, type Shell } from "zx";

/** Bad flags or environment: exit 2, and nothing was done. */
export class UsageError extends Error {}

/** The release could not be made as asked: exit 1, nothing half-done visible. */
export class ReleaseError extends Error {}

/** The exit status of a run a signal stopped, as a shell reports a process that signal ended. */
const STOP_STATUS = { SIGINT: 130, SIGTERM: 143 } as const;

type StopSignal = keyof typeof STOP_STATUS;

/** Stopped by SIGINT (Ctrl-C) or SIGTERM (a cancelled CI job): exit 130 or 143, nothing said. */
export class Stopped extends Error {
  readonly exitCode: number;

  constructor(readonly signal: StopSignal) {
    super(`stopped by ${signal}`);
    this.exitCode = STOP_STATUS[signal];
  }
}

/**
 * Runs `work` so that SIGINT or SIGTERM stops it as the run's own failure, never by ending the
 * process from inside main (a program running main in-process decides that for itself). On
 * the first signal, `cleanUp` runs at once, the listeners go (a second signal ends the process
 * as it would without them, and `cleanUp` has already run), and `work`'s `stop` aborts: it
 * must change nothing more. Once `work` has settled, this throws Stopped. Without a signal,
 * the listeners go as `work` settles, however it ends.
 */
export async function stoppable<T>(
  work: (stop: AbortSignal) => Promise<T>,
  cleanUp: () => void,
): Promise<T> {
  const stop = new AbortController();
  let stoppedBy: StopSignal | undefined;
  const listeners = (Object.keys(STOP_STATUS) as StopSignal[]).map((signal) => ({
    signal,
    listener: () => {
      stoppedBy = signal;
      removeListeners();
      cleanUp();
      stop.abort();
    },
  }));
  const removeListeners = () => {
    for (const { signal, listener } of listeners) Deno.removeSignalListener(signal, listener);
  };
  for (const { signal, listener } of listeners) Deno.addSignalListener(signal, listener);
  try {
    const done = await work(stop.signal).catch((error) => {
      // Once stopped, what `work` failed with is the stop's doing, not news.
      throw stoppedBy ? new Stopped(stoppedBy) : error;
    });
    // A signal that came after the last change stops the run all the same, as it asked.
    if (stoppedBy) throw new Stopped(stoppedBy);
    return done;
  } finally {
    removeListeners();
  }
}

/**
 * A failed file-system call (Node's ErrnoException) as one ReleaseError line: the call, its
 * path and error code, then `fix`. Any other error is returned as it is.
 */
export function fileSystemFailure(error: unknown, fix: string): unknown {
  // A rename or link names its destination too.
  const failure = error as NodeJS.ErrnoException & { dest?: string };
  if (
    !(error instanceof Error) || error instanceof ReleaseError || error instanceof UsageError ||
    !/^E[A-Z0-9]+$/.test(failure.code ?? "")
  ) {
    return error;
  }
  const what = failure.path
    ? `cannot ${failure.syscall ?? "use"} ${failure.path}${
      failure.dest ? ` -> ${failure.dest}` : ""
    } (${failure.code})`
    : `a file-system call failed (${failure.message.split("\n")[0]})`;
  return new ReleaseError(`${what}: ${fix}`);
}

export type Env = Record<string, string | undefined>;

/** Where a run's text goes: the process's own streams, or whatever a caller collects it in. */
export interface Io {
  stdout(text: string | Uint8Array): void;
  stderr(text: string | Uint8Array): void;
  /** A terminal gets progress bars; a log (CI, a pipe) gets a few lines instead. */
  stderrIsTerminal: boolean;
}

/** The process's stdout and stderr, written synchronously so lines never interleave. */
export function processIo(): Io {
  const encoder = new TextEncoder();
  const writeAll = (stream: typeof Deno.stdout, text: string | Uint8Array) => {
    const bytes = typeof text === "string" ? encoder.encode(text) : text;
    for (let at = 0; at < bytes.length;) at += stream.writeSync(bytes.subarray(at));
  };
  return {
    stdout: (text) => writeAll(Deno.stdout, text),
    stderr: (text) => writeAll(Deno.stderr, text),
    stderrIsTerminal: Deno.stderr.isTerminal(),
  };
}

/** What every step of a run reports through and starts child processes with. */
export interface Run {
  /** In a CI job: secrets are masked in its log and steps become collapsible groups. */
  ci: boolean;
  /** When main started this run, and an id it made for itself: what its records say of it. */
  startedOn: Date;
  id: string;
  io: Io;
  /** Progress and problems, for people: stderr. */
  log(message: string): void;
  /** The result a caller may capture (a URL, a directory, a plan): stdout. */
  result(line: string): void;
  /**
   * A terminal's progress bar for `name` at `percent`: one line per file under way, redrawn
   * in place below the log; at 100 its line stays, without a percent it goes.
   */
  drawProgress(name: string, percent?: number): void;
  step<T>(title: string, work: () => Promise<T>): Promise<T>;
  /** Registers a secret: masked by the CI log, and replaced by *** in everything printed. */
  mask(secret: string): void;
  /**
   * Registers a key's PEM or OpenSSH text, line by line: a log shows a key one line at a time.
   * Armor lines and short lines are public and would mask unrelated output.
   */
  maskKeyText(text: string | undefined): void;
  redact(text: string): string;
  /**
   * The directory the run was started in: relative paths given to it mean paths under this,
   * never under whatever directory the process is in now (tests run several runs at once).
   */
  cwd: string;
  /** `file` as given (relative to `cwd`, or absolute) as an absolute path. */
  resolve(file: string): string;
  /** zx's `$` for nix and git, started in `cwd`, whose environment holds no token or key. */
  $: Shell;
  /** Registers what to close when the run ends (an HTTP client's connections), however it ends. */
  atEnd(close: () => Promise<void>): void;
}

/** A run, and the one call that ends it: main's, once the run is over. */
export interface StartedRun extends Run {
  /** Closes what the run opened, newest first. */
  end(): Promise<void>;
}

export function startRun(env: Env, io: Io, cwd: string = Deno.cwd()): StartedRun {
  const ci = env.CI === "true" || env.GITHUB_ACTIONS === "true";
  const secrets: string[] = [];
  const closers: (() => Promise<void>)[] = [];
  const redact = (text: string) =>
    secrets.reduce((out, secret) => out.replaceAll(secret, "***"), text);
  // The progress bars on screen, by name: drawn below everything the run logs.
  const bars = new Map<string, number>();
  const barLine = (name: string, percent: number) =>
    `\r${redact(name)} [${
      "#".repeat(Math.floor(percent / 4)).padEnd(25, ".")
    }] ${percent}%\x1b[K\n`;
  /** Clears the `shown` bar lines, writes `text` in their place, then the bars as they are now. */
  const repaint = (shown: number, text: string) =>
    io.stderr(
      `${shown > 0 ? `\x1b[${shown}A\r\x1b[J` : ""}${text}${
        [...bars].map(([name, percent]) => barLine(name, percent)).join("")
      }`,
    );
  const log = (message: string) => repaint(bars.size, `${redact(message)}\n`);
  const mask = (secret: string) => {
    // The mask command is the one line that must carry the secret itself.
    if (ci) io.stderr(`::add-mask::${secret}\n`);
    secrets.push(secret);
  };
  return {
    ci,
    startedOn: new Date(),
    id: crypto.randomUUID(),
    io,
    log,
    result: (line) => io.stdout(`${redact(line)}\n`),
    drawProgress(name, percent) {
      if (percent === bars.get(name)) return;
      const shown = bars.size;
      if (percent === undefined || percent >= 100) {
        bars.delete(name);
        return repaint(shown, percent === undefined ? "" : barLine(name, 100));
      }
      bars.set(name, percent);
      repaint(shown, "");
    },
    async step(title, work) {
      log(ci ? `::group::${title}` : `==> ${title}`);
      try {
        return await work();
      } finally {
        if (ci) log("::endgroup::");
      }
    },
    maskKeyText(text) {
      for (const line of text?.split("\n") ?? []) {
        if (line.trim().length >= 16 && !line.includes("-----")) mask(line.trim());
      }
    },
    mask,
    redact,
    cwd,
    resolve: (file) => path.resolve(cwd, file),
    $: childShell(env, cwd),
    atEnd: (close) => void closers.push(close),
    async end() {
      for (const close of closers.splice(0).reverse()) await close();
    },
  };
}

/**
 * A shell whose child processes (nix, git) start in `cwd` and never see a token or key: it
 * hands them `env` without any variable named like a secret, never the whole environment zx
 * would pass.
 */
export function childShell(env: Env, cwd: string = Deno.cwd()): Shell {
  return $({
    cwd,
    env: Object.fromEntries(
      Object.entries(env).filter(([name]) => !/TOKEN|SECRET|PASSWORD|KEY/i.test(name)),
    ),
  });
}

/**
 * Step outputs as GITHUB_OUTPUT takes them, each a `name<<delimiter` block: a value holding a
 * newline (a server's URL) stays one value and adds no output. Each delimiter is random, as
 * GitHub's own toolkit makes it, so no value can close its block early.
 */
export function stepOutputs(outputs: Record<string, string>): string {
  return Object.entries(outputs).map(([name, value]) => {
    const delimiter = `ghadelimiter_${crypto.randomUUID()}`;
    return `${name}<<${delimiter}\n${value}\n${delimiter}\n`;
  }).join("");
}

export function formatBytes(bytes: number): string {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit++;
  }
  return unit === 0 ? `${bytes} B` : `${value.toFixed(1)} ${units[unit]}`;
}

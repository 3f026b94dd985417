/**
 * The bench's child processes and the page cache they read through: every measured program
 * runs under bench/counted.sh, timed from spawn to exit, its peak memory watched and its
 * final read and write counters taken; files can be read into, or evicted from, the page
 * cache, and their resident bytes counted. This module runs and observes; it judges nothing.
 */
import * as fs from "node:fs/promises";
import * as path from "node:path";
import * as v from "valibot";

const COUNTED = path.join(import.meta.dirname!, "counted.sh");
const KiB = 1024;
const MiB = 1024 * KiB;

/** The bench could not measure (a tool failed, a release came out wrong): exit 1. */
export class BenchError extends Error {}

/** Progress goes to stderr; stdout carries the table. */
export function log(message: string): void {
  console.error(message);
}

export function tail(text: string, lines = 15): string {
  return text.trimEnd().split("\n").slice(-lines).join("\n");
}

export function seconds(since: number): number {
  return (performance.now() - since) / 1000;
}

/** The lines of a byte stream, without their newlines. */
export async function* readLines(stream: ReadableStream<Uint8Array>): AsyncGenerator<string> {
  let pending = "";
  for await (const chunk of stream.pipeThrough(new TextDecoderStream())) {
    pending += chunk;
    let end;
    while ((end = pending.indexOf("\n")) >= 0) {
      yield pending.slice(0, end);
      pending = pending.slice(end + 1);
    }
  }
  if (pending) yield pending;
}

const TOOLS = [
  { name: "nix", install: "apt-get install -y nix-bin" },
  { name: "sha256sum", install: "apt-get install -y coreutils" },
  { name: "dd", install: "apt-get install -y coreutils" },
  { name: "sync", install: "apt-get install -y coreutils" },
  { name: "df", install: "apt-get install -y coreutils" },
  { name: "openssl", install: "apt-get install -y openssl" },
  { name: "curl", install: "apt-get install -y curl" },
  { name: "bash", install: "apt-get install -y bash" },
  { name: "fincore", install: "apt-get install -y util-linux-extra" },
];

export async function requireTools(): Promise<void> {
  const missing = [];
  for (const tool of TOOLS) {
    const found = await new Deno.Command("bash", {
      args: ["-c", 'command -v "$1"', "-", tool.name],
      stdout: "null",
      stderr: "null",
    }).output().catch(() => ({ success: false }));
    if (!found.success) missing.push(tool);
  }
  if (missing.length > 0) {
    throw new BenchError(
      `the bench needs ${missing.map((t) => t.name).join(", ")}: ${
        [...new Set(missing.map((t) => t.install))].join("; ")
      }`,
    );
  }
}

/** Runs a program to the end and returns its stdout; a failure is a BenchError with its stderr. */
export async function capture(
  program: string,
  args: string[],
  options: { env?: Record<string, string>; stderr?: "inherit" | "piped" } = {},
): Promise<string> {
  const output = await new Deno.Command(program, {
    args,
    env: options.env,
    stdin: "null",
    stdout: "piped",
    stderr: options.stderr ?? "piped",
  }).output();
  if (!output.success) {
    const stderr = options.stderr === "inherit" ? "" : new TextDecoder().decode(output.stderr);
    throw new BenchError(
      `${program} ${args.slice(0, 3).join(" ")} failed (exit ${output.code})${
        stderr ? `:\n${tail(stderr)}` : ""
      }`,
    );
  }
  return new TextDecoder().decode(output.stdout);
}

/** A child's final /proc/<pid>/io counters, its own children's included. */
export interface IoCounters {
  /** Bytes it asked read() and its kin for: files, pipes and sockets, page cache or not. */
  rchar: number;
  wchar: number;
  /** Bytes the kernel fetched from storage for it: reads the page cache could not answer. */
  readBytes: number;
  writeBytes: number;
}

const ProcIoSchema = v.object({
  rchar: v.number(),
  wchar: v.number(),
  read_bytes: v.number(),
  write_bytes: v.number(),
});

export interface ChildResult {
  code: number;
  seconds: number;
  stdout: string;
  stderr: string;
  /** The highest VmHWM seen in /proc/<pid>/status, polled every 50 ms. */
  peakRssBytes: number;
  io: IoCounters;
  /** release-boot's "==> Step" lines, with the seconds since start at which each arrived. */
  marks: { title: string; at: number }[];
}

/**
 * Runs a program with exactly `env`, under bench/counted.sh: timed from spawn to exit (the
 * wrapper's few milliseconds included, the same for every side), its memory watched.
 */
export async function runChild(
  program: string,
  args: string[],
  env: Record<string, string>,
  cwd: string,
): Promise<ChildResult> {
  const report = await Deno.makeTempFile({ dir: cwd, prefix: "counted-" });
  try {
    const start = performance.now();
    const child = new Deno.Command("bash", {
      args: [COUNTED, report, program, ...args],
      env,
      clearEnv: true,
      cwd,
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    const marks: ChildResult["marks"] = [];
    const stdout = new Response(child.stdout).text();
    const stderr = collectLines(child.stderr, (line) => {
      if (line.startsWith("==> ")) marks.push({ title: line.slice(4), at: seconds(start) });
    });
    let exited = false;
    const peak = pollPeakRss(report, () => exited);
    const { code } = await child.status;
    const elapsed = seconds(start);
    exited = true;
    return {
      code,
      seconds: elapsed,
      stdout: await stdout,
      stderr: await stderr,
      peakRssBytes: await peak,
      io: await readCounters(report),
      marks,
    };
  } finally {
    await fs.rm(report, { force: true });
  }
}

async function collectLines(
  stream: ReadableStream<Uint8Array>,
  onLine: (line: string) => void,
): Promise<string> {
  let text = "";
  for await (const line of readLines(stream)) {
    text += `${line}\n`;
    onLine(line);
  }
  return text;
}

/** The program's pid is the report's first line, written as it starts. */
async function pollPeakRss(report: string, exited: () => boolean): Promise<number> {
  let peak = 0;
  let pid: string | undefined;
  while (!exited()) {
    pid ??= (await fs.readFile(report, "utf8")).match(/^(\d+)\n/)?.[1];
    if (pid) {
      const status = await fs.readFile(`/proc/${pid}/status`, "utf8").catch(() => "");
      const kib = status.match(/^VmHWM:\s+(\d+) kB$/m)?.[1];
      if (kib) peak = Math.max(peak, Number(kib) * KiB);
    }
    await new Promise((resolve) => setTimeout(resolve, pid ? 50 : 5));
  }
  return peak;
}

async function readCounters(report: string): Promise<IoCounters> {
  const text = await fs.readFile(report, "utf8");
  const fields = Object.fromEntries(
    [...text.matchAll(/^(\w+): (\d+)$/gm)].map(([, name, value]) => [name, Number(value)]),
  );
  const parsed = v.safeParse(ProcIoSchema, fields);
  if (!parsed.success) {
    throw new BenchError(`bench/counted.sh reported no io counters: ${JSON.stringify(text)}`);
  }
  const { rchar, wchar, read_bytes, write_bytes } = parsed.output;
  return { rchar, wchar, readBytes: read_bytes, writeBytes: write_bytes };
}

// ---------------------------------------------------------------------------------------------
// The page cache and the disk
// ---------------------------------------------------------------------------------------------

/** Each timed run starts with no dirty pages left by the previous one. */
export async function flushToDisk(): Promise<void> {
  await capture("sync", []);
}

/** Reads files to the end, so that whoever reads them next finds them in the page cache. */
export async function readThrough(files: string[]): Promise<void> {
  const buffer = new Uint8Array(MiB);
  for (const file of files) {
    using handle = await Deno.open(file);
    while (await handle.read(buffer) !== null) {
      // reading is the point
    }
  }
}

/**
 * Drops the files' pages from the page cache (dd's nocache asks the kernel to with
 * posix_fadvise), so that any later read of them shows in fincore; checks that it worked.
 */
export async function evictFromPageCache(files: string[]): Promise<void> {
  await flushToDisk();
  for (const file of files) {
    await capture("dd", [`if=${file}`, "iflag=nocache", "count=0", "status=none"]);
  }
  const left = await residentBytes(files);
  if (left > 0) {
    throw new BenchError(
      `${left} bytes of ${
        files.join(", ")
      } stayed in the page cache after eviction; is another process reading them?`,
    );
  }
}

/** How many bytes of the files are in the page cache now (fincore). */
export async function residentBytes(files: string[]): Promise<number> {
  const output = await capture("fincore", ["--bytes", "--noheadings", "--output", "RES", ...files]);
  return output.trim().split("\n").reduce((sum, line) => sum + Number(line.trim()), 0);
}

/** Free bytes on the file system holding `dir`, and where that file system is mounted. */
export async function freeSpace(dir: string): Promise<{ bytes: number; mount: string }> {
  const output = await capture("df", ["--block-size=1", "--output=avail,target", dir]);
  const [bytes, mount] = output.trim().split("\n")[1].trim().split(/\s+/);
  return { bytes: Number(bytes), mount };
}

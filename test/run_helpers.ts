/**
 * Runs release-boot as operators do (a child process with its own flags and environment), or
 * its main in this process with the same answer, for tests that check what main decides.
 */
import assert from "node:assert/strict";
import * as fs from "node:fs/promises";
import * as os from "node:os";
import * as path from "node:path";
import { main } from "../scripts/release-boot.ts";
import { type Io, type Run as RunContext, startRun } from "../scripts/lib/run.ts";

export const repoRoot = path.resolve(import.meta.dirname!, "..");
export const script = path.join(repoRoot, "scripts", "release-boot.ts");
export const fixtureDir = path.join(repoRoot, "test", "fixture");

export interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

/**
 * A minimal environment: nothing from the caller's CI leaks in, and nix never waits on the
 * public binary cache, which these machines cannot reach.
 */
export function baseEnv(extra: Record<string, string> = {}): Record<string, string> {
  const env: Record<string, string> = {
    PATH: Deno.env.get("PATH") ?? "/usr/bin:/bin",
    HOME: Deno.env.get("HOME") ?? "/root",
    NIX_CONFIG: "substituters =\nexperimental-features = nix-command flakes",
    NO_COLOR: "1",
    // Real backoff and polling are seconds of sleep; the behaviour is the same at milliseconds.
    RELEASE_BOOT_RETRY_DELAY_MS: "20",
    RELEASE_BOOT_POLL_MS: "50",
    RELEASE_BOOT_INDEX_WAIT_MS: "5",
  };
  const denoDir = Deno.env.get("DENO_DIR");
  if (denoDir) env.DENO_DIR = denoDir;
  return { ...env, ...extra };
}

/** Output kept in memory, as a test reads it. */
export interface MemoryIo extends Io {
  readonly out: string;
  readonly err: string;
}

export function memoryIo(): MemoryIo {
  const decoder = new TextDecoder();
  const text = (chunk: string | Uint8Array) =>
    typeof chunk === "string" ? chunk : decoder.decode(chunk);
  const kept = { out: "", err: "" };
  return {
    stdout: (chunk) => void (kept.out += text(chunk)),
    stderr: (chunk) => void (kept.err += text(chunk)),
    stderrIsTerminal: false,
    get out() {
      return kept.out;
    },
    get err() {
      return kept.err;
    },
  };
}

/** A run's context for calling release-boot's steps in this process, its output kept. */
export function startTestRun(env: Record<string, string | undefined> = baseEnv()): RunContext {
  return startRun(env, memoryIo());
}

export interface RunOptions {
  env?: Record<string, string>;
  cwd?: string;
  /** Stops the child process (runRelease only: an in-process main cannot be killed). */
  signal?: AbortSignal;
  /**
   * Limits the network to these hosts (as --allow-net takes them): a request anywhere else
   * fails at once, before any name is looked up, so a test may run code that would leave
   * the machine. runRelease only: permissions belong to a process.
   */
  allowNet?: string;
}

/** runRelease or runMain: a test says which by naming one. */
export type Runner = (args: string[], options?: RunOptions) => Promise<Run>;

/** The permissions of the script's shebang, the network limited to `hosts` when given. */
function permissions(hosts: string | undefined): string[] {
  if (hosts === undefined) return ["--allow-all"];
  return ["--allow-read", "--allow-write", "--allow-run", "--allow-env", "--allow-sys"]
    .concat(`--allow-net=${hosts}`);
}

export async function runRelease(args: string[], options: RunOptions = {}): Promise<Run> {
  const output = await releaseCommand(script, args, options).output();
  const decoder = new TextDecoder();
  return {
    code: output.code,
    stdout: decoder.decode(output.stdout),
    stderr: decoder.decode(output.stderr),
  };
}

/**
 * Starts `program` (release-boot, or a program that runs its main) as runRelease runs it, for
 * a test that acts on it while it runs: sends it a signal, reads its output as it comes.
 */
export function startRelease(
  args: string[],
  options: RunOptions = {},
  program = script,
): Deno.ChildProcess {
  return releaseCommand(program, args, options).spawn();
}

function releaseCommand(program: string, args: string[], options: RunOptions): Deno.Command {
  const config = ["--config", path.join(repoRoot, "deno.json")];
  return new Deno.Command(Deno.execPath(), {
    args: ["run", ...permissions(options.allowNet), ...config, program, ...args],
    cwd: options.cwd ?? repoRoot,
    env: options.env ?? baseEnv(),
    clearEnv: true,
    stdout: "piped",
    stderr: "piped",
    stdin: "null",
    signal: options.signal,
  });
}

/**
 * Waits until a stage of `out` (a name in `dir`) is being written: its `<out>.partial-*` copy
 * holds a file, so the stage is past the point where it starts listening for signals. False
 * when `running` (the run) ends first.
 */
export async function stageUnderWay(
  dir: string,
  out: string,
  running: Promise<unknown>,
): Promise<boolean> {
  let ended = false;
  const end = () => void (ended = true);
  running.then(end, end);
  while (!ended) {
    for (const entry of await fs.readdir(dir)) {
      if (!entry.startsWith(`${out}.partial-`)) continue;
      const written = await fs.readdir(path.join(dir, entry)).catch(() => []);
      if (written.length > 0) return true;
    }
    await new Promise((resolve) => setTimeout(resolve, 1));
  }
  return false;
}

/**
 * Runs release-boot's main in this process, its output kept: the same answer as runRelease
 * without a process start-up. For what main decides (usage errors, how it talks to Forgejo);
 * what only a real process shows (signals, a terminal, its exit) needs runRelease.
 */
export async function runMain(args: string[], options: RunOptions = {}): Promise<Run> {
  if (options.signal) throw new Error("an in-process run cannot be signalled: use runRelease");
  if (options.allowNet !== undefined) {
    throw new Error("an in-process run has the test's permissions: use runRelease");
  }
  const io = memoryIo();
  const code = await main(args, options.env ?? baseEnv(), io, options.cwd ?? repoRoot);
  return { code, stdout: io.out, stderr: io.err };
}

/** Runs a program with optional standard input and collects its output, as a shell would. */
export async function runCommand(
  program: string,
  args: string[],
  stdin?: Uint8Array,
): Promise<Run> {
  const child = new Deno.Command(program, {
    args,
    stdin: stdin ? "piped" : "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  if (stdin) {
    const writer = child.stdin.getWriter();
    await writer.write(stdin);
    await writer.close();
  }
  const { code, stdout, stderr } = await child.output();
  const text = new TextDecoder();
  return { code, stdout: text.decode(stdout), stderr: text.decode(stderr) };
}

/** A copy of the fixture flake whose files carry `salt`, so its bytes differ per salt. */
export async function makeFixture(salt: string): Promise<{ dir: string; ref: string }> {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), "release-boot-fixture-"));
  await fs.copyFile(path.join(fixtureDir, "flake.nix"), path.join(dir, "flake.nix"));
  await fs.writeFile(path.join(dir, "salt.nix"), `${JSON.stringify(salt)}\n`);
  return { dir, ref: `path:${dir}` };
}

/**
 * A scratch git checkout to run from, so the default commit comes from git rev-parse HEAD.
 * Each is a copy of one checkout that git makes once per test worker: three git processes a
 * world would otherwise start. Every world so runs at the same commit, in a directory of its
 * own.
 */
export async function makeWorkdir(): Promise<{ dir: string; commit: string }> {
  checkout ??= makeCheckout();
  const { dir: original, commit } = await checkout;
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), "release-boot-work-"));
  await fs.cp(original, dir, { recursive: true });
  return { dir, commit };
}

/** The worker's checkout, made at its first world. */
let checkout: Promise<{ dir: string; commit: string }> | undefined;

async function makeCheckout(): Promise<{ dir: string; commit: string }> {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), "release-boot-checkout-"));
  // Gone with the worker, whose tests all finished with it.
  globalThis.addEventListener("unload", () => Deno.removeSync(dir, { recursive: true }));
  const git = (...args: string[]) =>
    new Deno.Command("git", {
      args: ["-c", "user.name=t", "-c", "user.email=t@example.org", ...args],
      cwd: dir,
      stdout: "piped",
      stderr: "null",
    }).output();
  await git("init", "-q");
  await git("commit", "-q", "--allow-empty", "-m", "release");
  const head = await git("rev-parse", "HEAD");
  return { dir, commit: new TextDecoder().decode(head.stdout).trim() };
}

export async function exists(file: string): Promise<boolean> {
  return await fs.stat(file).then(() => true, () => false);
}

/** `sha256sum -c SHA256SUMS` in `dir`, as an operator checks a download. */
export async function sha256sumCheck(dir: string): Promise<{ code: number; stdout: string }> {
  const output = await new Deno.Command("sha256sum", {
    args: ["-c", "SHA256SUMS"],
    cwd: dir,
    stdout: "piped",
    stderr: "piped",
  }).output();
  return { code: output.code, stdout: new TextDecoder().decode(output.stdout) };
}

/** What a stage of the netboot and iso targets holds, by the documented naming scheme. */
export const STAGED_NETBOOT_ISO = [
  "SHA256SUMS",
  "iso-x86_64-linux.iso",
  "manifest.json",
  "netboot-x86_64-linux.built.ipxe",
  "netboot-x86_64-linux.bzImage",
  "netboot-x86_64-linux.initrd",
  "netboot-x86_64-linux.ipxe",
  "provenance.intoto.json",
];

/** GITHUB_OUTPUT as the runner reads it: `name=value` lines and `name<<DELIMITER` blocks. */
export function parseStepOutputs(text: string): Map<string, string> {
  const outputs = new Map<string, string>();
  const all = text.split("\n");
  for (let at = 0; at < all.length; at++) {
    const line = all[at];
    if (line === "") continue;
    const equals = line.indexOf("=");
    const heredoc = line.indexOf("<<");
    if (equals >= 0 && (heredoc < 0 || equals < heredoc)) {
      outputs.set(line.slice(0, equals), line.slice(equals + 1));
      continue;
    }
    assert.ok(heredoc > 0, `not an output line: ${JSON.stringify(line)}`);
    const delimiter = line.slice(heredoc + 2);
    const value: string[] = [];
    for (at++; all[at] !== delimiter; at++) {
      assert.ok(at < all.length, `${delimiter} never closes ${line.slice(0, heredoc)}`);
      value.push(all[at]);
    }
    outputs.set(line.slice(0, heredoc), value.join("\n"));
  }
  return outputs;
}

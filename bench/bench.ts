#!/usr/bin/env -S deno run --allow-all
/**
 * deno task bench: release-boot against the shell way it replaces (sha256sum, then one curl
 * per file), both publishing the same nix-built files to the Forgejo emulator on loopback.
 *
 * Prints the figures as a markdown table on stdout (progress goes to stderr) and writes them,
 * with every sample and the machine, as JSON. bench/README.md says what each figure measures
 * and how; --help lists the flags.
 */
import * as fs from "node:fs/promises";
import * as os from "node:os";
import * as path from "node:path";
import { parseArgs } from "node:util";
import * as v from "valibot";
import { assetName } from "../scripts/lib/nix.ts";
import { hashFiles } from "../scripts/lib/hash.ts";
import { type Emulator, startForgejo } from "../test/forgejo/emulator.ts";
import { ReleaseSchema } from "../types/forgejo.ts";
import { BuildResultsSchema } from "../types/nix.ts";

const REPO_ROOT = path.resolve(import.meta.dirname!, "..");
const DENO_CONFIG = path.join(REPO_ROOT, "deno.json");
const SCRIPT = path.join(REPO_ROOT, "scripts", "release-boot.ts");
const BASELINE = path.join(REPO_ROOT, "bench", "baseline.sh");
const FETCH_BASELINE = path.join(REPO_ROOT, "bench", "fetch_baseline.sh");
const FLAKE_TEMPLATE = path.join(REPO_ROOT, "bench", "flake", "flake.nix");
const DEFAULT_JSON = path.join(REPO_ROOT, "bench", "results.json");

const SYSTEM = "x86_64-linux";
const REPO = "ops/runners";
const TOKEN = "bench-token";
const COMMIT = "5eb1d1e5b0f0a8c4c1b0b9e5f4d3c2b1a0f9e8d7";
// No binary cache is reachable here; nix must never wait for one.
const NIX_CONFIG = "substituters =\nexperimental-features = nix-command flakes";

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;
const RSS_LIMIT = 200 * MiB;
/** "Flat": the peaks differ by less than this share of the difference in file size. */
const RSS_FLAT_SHARE = 0.01;

// ---------------------------------------------------------------------------------------------
// The benchmark, figure by figure
// ---------------------------------------------------------------------------------------------

async function main(): Promise<void> {
  const options = readOptions(Deno.args);
  if (options.help) return console.log(HELP);
  await requireTools();
  const cleanup = new Cleanup();
  try {
    const bench = await step("Build the bench flake, start the emulator", () => {
      return setUp(options, cleanup);
    });
    const hashing = await step("Hash throughput", () => measureHashing(bench));
    const publishing = await step("Full publish, then rerun", () => measurePublishing(bench));
    const fetching = await step("Fetch for booting", () => measureFetching(bench));
    const memory = await step("Peak RSS while publishing", () => measurePeakRss(bench));
    const nixBuilds = countNixBuilds(bench);

    const results = await summarize(bench, [
      ...hashing,
      ...publishing,
      fetching,
      memory,
      nixBuilds,
    ]);
    const table = renderTable(results.figures);
    console.log(table);
    const json = options.json ?? path.join(bench.dir, "results.json");
    await writeJson(json, results);
    if (options.smoke) reportSmokeChecks(await checkSmoke(table, json));
  } finally {
    await cleanup.run();
  }
}

// ---------------------------------------------------------------------------------------------
// Errors and logging: progress on stderr, the table on stdout
// ---------------------------------------------------------------------------------------------

/** Bad flags: exit 2. */
class UsageError extends Error {}
/** The bench could not measure (a tool failed, a release came out wrong): exit 1. */
class BenchError extends Error {}

function log(message: string): void {
  console.error(message);
}

async function step<T>(title: string, work: () => Promise<T>): Promise<T> {
  log(`\n### ${title}`);
  const start = performance.now();
  const result = await work();
  log(`    (${seconds(start).toFixed(1)} s)`);
  return result;
}

function seconds(since: number): number {
  return (performance.now() - since) / 1000;
}

function tail(text: string, lines = 15): string {
  return text.trimEnd().split("\n").slice(-lines).join("\n");
}

/** Undo steps, run last-registered first, each allowed to fail; also on Ctrl-C. */
class Cleanup {
  private steps: { what: string; undo: () => Promise<unknown> }[] = [];
  private running?: Promise<void>;
  private readonly onSignal = async () => {
    await this.run();
    Deno.exit(130);
  };

  constructor() {
    Deno.addSignalListener("SIGINT", this.onSignal);
    Deno.addSignalListener("SIGTERM", this.onSignal);
  }

  add(what: string, undo: () => Promise<unknown>): void {
    this.steps.push({ what, undo });
  }

  /** Every caller (the signal, main's finally) waits for the same single pass. */
  run(): Promise<void> {
    this.running ??= this.undoAll();
    return this.running;
  }

  private async undoAll(): Promise<void> {
    Deno.removeSignalListener("SIGINT", this.onSignal);
    Deno.removeSignalListener("SIGTERM", this.onSignal);
    for (const { what, undo } of this.steps.reverse()) {
      try {
        await undo();
      } catch (error) {
        log(`cleanup: could not ${what}: ${(error as Error).message}`);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Flags
// ---------------------------------------------------------------------------------------------

interface Options {
  help: boolean;
  smoke: boolean;
  rounds: number;
  files: number;
  fileSize: number;
  rssSizes: number[];
  /** Undefined in --smoke mode without --json: a temp file, removed at the end. */
  json?: string;
}

const HELP =
  `deno task bench [flags]: release-boot against the shell way it replaces (sha256sum, then
curl per file), both publishing to the Forgejo emulator on loopback. Prints a table, writes
the same figures as JSON. Needs nix, sha256sum, openssl, curl and bash.

The shell baseline is bench/baseline.sh, run twice per round: uploading with
curl --data-binary @file (the issue's baseline) and with curl -T file (streaming).

Flags:
  --rounds N         rounds of each comparison, the sides alternating (default 3)
  --files N          files in a full publish, also hashed for the N-file figure (default 4)
  --file-size SIZE   size of each of those files (default 512MiB); under 1GiB, because the
                     baseline's curl --data-binary @file refuses larger files
  --rss-sizes LIST   comma-separated sizes of the single-file publishes whose peak RSS is
                     measured (default 1,2,4 = 1, 2 and 4 GiB)
  --json PATH        where the figures go as JSON (default bench/results.json)
  --smoke            a seconds-long run for CI: 2 files of 1MiB, RSS sizes 1MiB,2MiB,4MiB,
                     1 round, JSON to a temp file unless --json; checks only that the output
                     is complete and correct (not the timing targets), exits 1 if not
  --help             this text

SIZE: a number with an optional unit KiB, MiB or GiB; without a unit it is GiB (0.5 = 512MiB).

The default run builds about 9 GiB of pseudo-random files into the nix store (deleted at the
end) and takes about 5.5 minutes on 2 cores.`;

const DEFAULTS = { rounds: "3", files: "4", fileSize: "512MiB", rssSizes: "1,2,4" };
const SMOKE_DEFAULTS = { rounds: "1", files: "2", fileSize: "1MiB", rssSizes: "1MiB,2MiB,4MiB" };

const UNITS: Record<string, number> = { KiB, MiB, GiB, "": GiB };

const SizeSchema = v.pipe(
  v.string(),
  v.regex(
    /^\d+(\.\d+)?(KiB|MiB|GiB)?$/,
    "a size is a number with an optional unit KiB, MiB or GiB, e.g. 512MiB or 2",
  ),
  v.transform((text) => {
    const [, number, , unit = ""] = text.match(/^(\d+(\.\d+)?)(KiB|MiB|GiB)?$/)!;
    return Math.round(Number(number) * UNITS[unit]);
  }),
  v.minValue(1, "a size must be at least 1 byte"),
);
const FileSizeSchema = v.pipe(
  SizeSchema,
  v.maxValue(
    GiB - 1,
    "the baseline's curl --data-binary @file reads the file into memory and refuses 1GiB or more; publish more --files instead",
  ),
);
const SizeListSchema = v.pipe(
  v.string(),
  v.transform((list) => list.split(",")),
  v.array(SizeSchema),
  v.check((sizes) => new Set(sizes).size === sizes.length, "a size is listed twice"),
);
const countSchema = (min: number, max: number) =>
  v.pipe(
    v.string(),
    v.regex(/^\d+$/, "it is not a whole number"),
    v.transform(Number),
    v.minValue(min, `it must be at least ${min}`),
    v.maxValue(max, `it must be at most ${max}`),
  );

function parseFlag<T>(flag: string, schema: v.GenericSchema<string, T>, value: string): T {
  const result = v.safeParse(schema, value);
  if (result.success) return result.output;
  throw new UsageError(`bad --${flag} ${JSON.stringify(value)}: ${result.issues[0].message}`);
}

function readOptions(args: string[]): Options {
  let values;
  try {
    values = parseArgs({
      args,
      options: {
        rounds: { type: "string" },
        files: { type: "string" },
        "file-size": { type: "string" },
        "rss-sizes": { type: "string" },
        json: { type: "string" },
        smoke: { type: "boolean" },
        help: { type: "boolean" },
      },
      strict: true,
      allowPositionals: false,
    }).values;
  } catch (error) {
    throw new UsageError(`${(error as Error).message}; see --help`);
  }
  const smoke = values.smoke ?? false;
  const defaults = smoke ? SMOKE_DEFAULTS : DEFAULTS;
  return {
    help: values.help ?? false,
    smoke,
    rounds: parseFlag("rounds", countSchema(1, 50), values.rounds ?? defaults.rounds),
    // Several files: "faster than both on several files" needs at least two.
    files: parseFlag("files", countSchema(2, 64), values.files ?? defaults.files),
    fileSize: parseFlag("file-size", FileSizeSchema, values["file-size"] ?? defaults.fileSize),
    rssSizes: parseFlag("rss-sizes", SizeListSchema, values["rss-sizes"] ?? defaults.rssSizes),
    json: values.json === undefined
      ? (smoke ? undefined : DEFAULT_JSON)
      : path.resolve(values.json),
  };
}

// ---------------------------------------------------------------------------------------------
// Child processes
// ---------------------------------------------------------------------------------------------

const TOOLS = [
  { name: "nix", install: "apt-get install -y nix-bin" },
  { name: "sha256sum", install: "apt-get install -y coreutils" },
  { name: "openssl", install: "apt-get install -y openssl" },
  { name: "curl", install: "apt-get install -y curl" },
  { name: "bash", install: "apt-get install -y bash" },
  { name: "sync", install: "apt-get install -y coreutils" },
];

async function requireTools(): Promise<void> {
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
async function capture(
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

function nixEnv(): Record<string, string> {
  return { NIX_CONFIG };
}

interface ChildResult {
  code: number;
  seconds: number;
  stdout: string;
  stderr: string;
  /** The highest VmHWM seen in /proc/<pid>/status, polled every 50 ms. */
  peakRssBytes: number;
  /** release-boot's "==> Step" lines, with the seconds since start at which each arrived. */
  marks: { title: string; at: number }[];
}

/** Runs a program with exactly `env`, timing it from spawn to exit and watching its memory. */
async function runChild(
  program: string,
  args: string[],
  env: Record<string, string>,
  cwd: string,
): Promise<ChildResult> {
  const start = performance.now();
  const child = new Deno.Command(program, {
    args,
    env,
    clearEnv: true,
    cwd,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const marks: ChildResult["marks"] = [];
  const stdout = new Response(child.stdout).text();
  const stderr = readLines(child.stderr, (line) => {
    if (line.startsWith("==> ")) marks.push({ title: line.slice(4), at: seconds(start) });
  });
  let exited = false;
  const peak = pollPeakRss(child.pid, () => exited);
  const { code } = await child.status;
  const elapsed = seconds(start);
  exited = true;
  return {
    code,
    seconds: elapsed,
    stdout: await stdout,
    stderr: await stderr,
    peakRssBytes: await peak,
    marks,
  };
}

async function readLines(
  stream: ReadableStream<Uint8Array>,
  onLine: (line: string) => void,
): Promise<string> {
  let text = "";
  let pending = "";
  for await (const chunk of stream.pipeThrough(new TextDecoderStream())) {
    text += chunk;
    const lines = (pending + chunk).split("\n");
    pending = lines.pop()!;
    lines.forEach(onLine);
  }
  if (pending) onLine(pending);
  return text;
}

async function pollPeakRss(pid: number, exited: () => boolean): Promise<number> {
  let peak = 0;
  while (!exited()) {
    const status = await Deno.readTextFile(`/proc/${pid}/status`).catch(() => "");
    const kib = status.match(/^VmHWM:\s+(\d+) kB$/m)?.[1];
    if (kib) peak = Math.max(peak, Number(kib) * KiB);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  return peak;
}

// ---------------------------------------------------------------------------------------------
// Setup: the bench flake, built once; the emulator; the nix shim; asset links for the shell
// ---------------------------------------------------------------------------------------------

interface Target {
  name: string;
  bytes: number;
  /** The store file the target builds. */
  file: string;
  /** Its release asset name, as release-boot names it. */
  asset: string;
  /** Set once the hash figure has checked that every hasher agrees on it. */
  sha256?: string;
}

interface Bench {
  options: Options;
  /** Temp root: flake copy, emulator storage, nix shim and logs. Removed at the end. */
  dir: string;
  flakeRef: string;
  publishTargets: Target[];
  rssTargets: Target[];
  /** Links named like the assets, pointing at the store files: the shell side's input. */
  assetDir: string;
  forgejo: Emulator;
  shimDir: string;
  runs: Run[];
}

async function setUp(options: Options, cleanup: Cleanup): Promise<Bench> {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), "release-boot-bench-"));
  cleanup.add(`remove ${dir}`, () => fs.rm(dir, { recursive: true, force: true }));

  const sizes = new Map<string, number>();
  for (let i = 1; i <= options.files; i++) sizes.set(`publish-${i}`, options.fileSize);
  for (const bytes of options.rssSizes) sizes.set(`rss-${sizeName(bytes)}`, bytes);
  const flakeRef = await writeFlake(dir, sizes);
  const targets = await buildFlake(flakeRef, sizes, cleanup);

  const forgejo = await startForgejo({
    storageDir: path.join(dir, "forgejo"),
    tokens: { [TOKEN]: "write" },
  });
  cleanup.add("stop the Forgejo emulator", () => forgejo.close());
  forgejo.addCommit(COMMIT);

  const publishTargets = targets.filter((t) => t.name.startsWith("publish-"));
  return {
    options,
    dir,
    flakeRef,
    publishTargets,
    rssTargets: targets.filter((t) => t.name.startsWith("rss-")),
    assetDir: await linkAssets(dir, publishTargets),
    forgejo,
    shimDir: await writeNixShim(dir),
    runs: [],
  };
}

/** A copy of bench/flake with sizes.nix beside it: the sizes are part of the flake. */
async function writeFlake(dir: string, sizes: Map<string, number>): Promise<string> {
  const flakeDir = path.join(dir, "flake");
  await fs.mkdir(flakeDir);
  await fs.copyFile(FLAKE_TEMPLATE, path.join(flakeDir, "flake.nix"));
  const entries = [...sizes].map(([name, bytes]) => `  ${name} = ${bytes};`);
  await fs.writeFile(path.join(flakeDir, "sizes.nix"), `{\n${entries.join("\n")}\n}\n`);
  return `path:${flakeDir}`;
}

/** Builds every target once, so that release-boot's own nix build finds them cached. */
async function buildFlake(
  flakeRef: string,
  sizes: Map<string, number>,
  cleanup: Cleanup,
): Promise<Target[]> {
  const names = [...sizes.keys()];
  const total = [...sizes.values()].reduce((sum, bytes) => sum + bytes, 0);
  log(`Building ${names.length} targets, ${formatSize(total)} of pseudo-random files`);
  const source = v.parse(
    v.object({ path: v.string() }),
    JSON.parse(
      await capture("nix", ["flake", "metadata", "--json", "--no-write-lock-file", flakeRef], {
        env: nixEnv(),
      }),
    ),
  ).path;
  const built = v.parse(
    BuildResultsSchema,
    JSON.parse(
      await capture(
        "nix",
        [
          "build",
          "--no-write-lock-file",
          "--json",
          "--no-link",
          ...names.map((name) => `${flakeRef}#packages.${SYSTEM}.${name}`),
        ],
        { env: nixEnv(), stderr: "inherit" },
      ),
    ),
  );
  const outputs = [source, ...built.map((result) => result.outputs.out)];
  const derivations = built.map((result) => result.drvPath);
  cleanup.add("delete the bench's nix store paths", async () => {
    await deleteStorePaths(outputs, "outputs");
    // Given a .drv, nix store delete deletes its outputs; --derivation means the file itself.
    await deleteStorePaths(["--derivation", ...derivations], "derivations");
  });
  return names.map((name, index) => {
    const file = path.join(built[index].outputs.out, "iso", "x.iso");
    return { name, bytes: sizes.get(name)!, file, asset: assetName(name, SYSTEM, file) };
  });
}

async function deleteStorePaths(args: string[], what: string): Promise<void> {
  const result = await new Deno.Command("nix", {
    args: ["store", "delete", ...args],
    env: nixEnv(),
    stdout: "piped",
    stderr: "piped",
  }).output();
  const decoder = new TextDecoder();
  const stdout = decoder.decode(result.stdout);
  const stderr = decoder.decode(result.stderr);
  if (result.success) {
    const count = stdout.match(/\d+ store paths deleted.*/)?.[0] ?? "done";
    log(`Deleted the bench's ${what} from the nix store: ${count}`);
  } else {
    log(`Could not delete the bench's ${what} from the nix store (nix-collect-garbage will):
${tail(stderr, 3)}`);
  }
}

async function linkAssets(dir: string, targets: Target[]): Promise<string> {
  const assetDir = path.join(dir, "assets");
  await fs.mkdir(assetDir);
  for (const target of targets) await fs.symlink(target.file, path.join(assetDir, target.asset));
  return assetDir;
}

/**
 * A `nix` first on release-boot's PATH: it logs each invocation's start, end and argv to
 * $BENCH_NIX_LOG around the real nix (run as a child rather than exec'd, to time it).
 */
async function writeNixShim(dir: string): Promise<string> {
  const realNix = (await capture("bash", ["-c", "command -v nix"])).trim();
  const shimDir = path.join(dir, "shim");
  await fs.mkdir(shimDir);
  const shim = `#!/usr/bin/env bash
start=$EPOCHREALTIME
${JSON.stringify(realNix)} "$@"
code=$?
(IFS=$'\\x1f'; printf '%s\\t%s\\t%s\\n' "$start" "$EPOCHREALTIME" "$*") >>"\${BENCH_NIX_LOG:-/dev/null}"
exit $code
`;
  await fs.writeFile(path.join(shimDir, "nix"), shim, { mode: 0o755 });
  return shimDir;
}

function sizeName(bytes: number): string {
  for (const [unit, size] of [["GiB", GiB], ["MiB", MiB], ["KiB", KiB]] as const) {
    if (bytes % size === 0) return `${bytes / size}${unit}`;
  }
  return `${bytes}B`;
}

function formatSize(bytes: number): string {
  for (const [unit, size] of [["GiB", GiB], ["MiB", MiB], ["KiB", KiB]] as const) {
    if (bytes >= size) return `${+(bytes / size).toFixed(2)} ${unit}`;
  }
  return `${bytes} B`;
}

// ---------------------------------------------------------------------------------------------
// Runs: release-boot and the shell baseline, each checked against what the emulator stored
// ---------------------------------------------------------------------------------------------

interface NixCall {
  /** The nix subcommand and its arguments, without the experimental-features option. */
  command: string;
  seconds: number;
}

interface Run {
  side: "release-boot" | "shell" | "shell --stream";
  kind: "warm-up" | "publish" | "rerun" | "rss";
  tag: string;
  seconds: number;
  /** Request body bytes the emulator read during the run. */
  uploadedBytes: number;
  peakRssBytes: number;
  /** release-boot only: every nix invocation, from the shim's log. */
  nix?: { calls: number; builds: number; seconds: number; commands: NixCall[] };
  /** release-boot only: seconds from each "==> Step" line to the next (or to exit). */
  steps?: Record<string, number>;
}

async function runReleaseBoot(
  bench: Bench,
  kind: Run["kind"],
  targets: Target[],
  tag: string,
): Promise<Run> {
  const nixLog = path.join(bench.dir, `nix-calls-${bench.runs.length + 1}.log`);
  const firstRequest = bench.forgejo.requests.length;
  const env: Record<string, string> = {
    PATH: `${bench.shimDir}:${Deno.env.get("PATH") ?? "/usr/bin:/bin"}`,
    HOME: Deno.env.get("HOME") ?? "/root",
    NIX_CONFIG,
    NO_COLOR: "1",
    FORGEJO_TOKEN: TOKEN,
    BENCH_NIX_LOG: nixLog,
  };
  const denoDir = Deno.env.get("DENO_DIR");
  if (denoDir) env.DENO_DIR = denoDir;
  const child = await runChild(
    Deno.execPath(),
    [
      "run",
      "--allow-all",
      "--config",
      DENO_CONFIG,
      SCRIPT,
      ...["--server", bench.forgejo.url, "--repo", REPO, "--flake", bench.flakeRef],
      ...["--targets", targets.map((t) => t.name).join(","), "--tag", tag, "--commit", COMMIT],
      // The bench flake is a generated path: flake, not a git checkout of COMMIT.
      "--allow-dirty",
    ],
    env,
    bench.dir,
  );
  if (child.code !== 0) {
    throw new BenchError(
      `release-boot failed on ${tag} (exit ${child.code}):\n${tail(child.stderr)}`,
    );
  }
  verifyRelease(bench, tag, targets, ["SHA256SUMS", "manifest.json"]);
  const run: Run = {
    side: "release-boot",
    kind,
    tag,
    seconds: child.seconds,
    uploadedBytes: uploadedSince(bench.forgejo, firstRequest),
    peakRssBytes: child.peakRssBytes,
    nix: await readNixLog(nixLog),
    steps: stepDurations(child),
  };
  bench.runs.push(run);
  log(describeRun(run));
  return run;
}

async function runShell(
  bench: Bench,
  kind: Run["kind"],
  tag: string,
  stream: boolean,
): Promise<Run> {
  const firstRequest = bench.forgejo.requests.length;
  const child = await runChild(
    "bash",
    [
      BASELINE,
      ...(stream ? ["--stream"] : []),
      ...[bench.forgejo.url, REPO, tag, COMMIT, bench.assetDir],
    ],
    {
      PATH: Deno.env.get("PATH") ?? "/usr/bin:/bin",
      HOME: Deno.env.get("HOME") ?? "/root",
      TMPDIR: bench.dir,
      FORGEJO_TOKEN: TOKEN,
    },
    bench.dir,
  );
  if (child.code !== 0) {
    throw new BenchError(
      `the shell baseline failed on ${tag} (exit ${child.code}):\n${tail(child.stderr)}`,
    );
  }
  verifyRelease(bench, tag, bench.publishTargets, ["SHA256SUMS"]);
  const run: Run = {
    side: stream ? "shell --stream" : "shell",
    kind,
    tag,
    seconds: child.seconds,
    uploadedBytes: uploadedSince(bench.forgejo, firstRequest),
    peakRssBytes: child.peakRssBytes,
  };
  bench.runs.push(run);
  log(describeRun(run));
  return run;
}

function describeRun(run: Run): string {
  const nix = run.nix ? `, ${run.nix.builds} nix build of ${run.nix.calls} nix calls` : "";
  return `  ${run.side} ${run.kind} ${run.tag}: ${run.seconds.toFixed(2)} s, ${
    formatSize(run.uploadedBytes)
  } uploaded${nix}`;
}

function uploadedSince(forgejo: Emulator, firstRequest: number): number {
  return forgejo.requests.slice(firstRequest).reduce((sum, r) => sum + r.bodyBytes, 0);
}

/** Both sides must leave the same published release: every file, and the same SHA256SUMS. */
function verifyRelease(bench: Bench, tag: string, targets: Target[], indexNames: string[]): void {
  const release = bench.forgejo.releases()
    .map((data) => v.parse(ReleaseSchema, data))
    .find((r) => r.tag_name === tag);
  const problems: string[] = [];
  if (!release) problems.push("there is no release");
  else {
    if (release.draft) problems.push("it is still a draft");
    const names = release.assets.map((a) => a.name).sort();
    const wanted = [...targets.map((t) => t.asset), ...indexNames].sort();
    if (names.join() !== wanted.join()) problems.push(`its assets are ${names.join(", ")}`);
    for (const target of targets) {
      const stored = release.assets.find((a) => a.name === target.asset);
      if (stored && stored.size !== target.bytes) {
        problems.push(`${target.asset} has ${stored.size} bytes, not ${target.bytes}`);
      }
    }
  }
  if (problems.length > 0) {
    throw new BenchError(`release ${tag} came out wrong: ${problems.join("; ")}`);
  }
}

/** Checks a release's SHA256SUMS against the sums all three hashers agreed on. */
async function verifySums(bench: Bench, tag: string): Promise<void> {
  const release = bench.forgejo.releases()
    .map((data) => v.parse(ReleaseSchema, data))
    .find((r) => r.tag_name === tag)!;
  const [stored] = await bench.forgejo.assetBytes(release.id, "SHA256SUMS");
  // SHA256SUMS also lists manifest.json, whose bytes the bench does not predict.
  const images = new TextDecoder().decode(stored).split("\n")
    .filter((line) => line && !line.endsWith("  manifest.json"))
    .map((line) => `${line}\n`)
    .join("");
  const wanted = [...bench.publishTargets]
    .sort((a, b) => a.asset < b.asset ? -1 : 1)
    .map((t) => `${t.sha256}  ${t.asset}\n`)
    .join("");
  if (images !== wanted) {
    throw new BenchError(`SHA256SUMS of ${tag} differs from the checked sums:\n${wanted}`);
  }
}

async function readNixLog(file: string): Promise<Run["nix"]> {
  const text = await fs.readFile(file, "utf8").catch(() => "");
  const commands = text.split("\n").filter(Boolean).map((line): NixCall & { args: string[] } => {
    const [start, end, argv] = line.split("\t");
    const args = argv.split("\x1f");
    const features = args.indexOf("--extra-experimental-features");
    const shown = features >= 0 ? args.toSpliced(features, 2) : args;
    return { command: shown.join(" "), seconds: Number(end) - Number(start), args };
  });
  return {
    calls: commands.length,
    builds: commands.filter((call) => call.args.includes("build")).length,
    seconds: commands.reduce((sum, call) => sum + call.seconds, 0),
    commands: commands.map(({ command, seconds }) => ({ command, seconds })),
  };
}

function stepDurations(child: ChildResult): Record<string, number> {
  const steps: Record<string, number> = { "start-up": child.marks[0]?.at ?? child.seconds };
  child.marks.forEach((mark, index) => {
    const end = child.marks[index + 1]?.at ?? child.seconds;
    steps[mark.title] = +(end - mark.at).toFixed(3);
  });
  return steps;
}

/**
 * Deletes every release (its stored files go too, so the next run writes into pages just
 * freed) and flushes dirty pages to disk: each timed run starts from the same state.
 */
async function settle(bench: Bench): Promise<void> {
  for (const data of bench.forgejo.releases()) {
    const { id, tag_name } = v.parse(ReleaseSchema, data);
    const response = await fetch(`${bench.forgejo.url}/api/v1/repos/${REPO}/releases/${id}`, {
      method: "DELETE",
      headers: { authorization: `token ${TOKEN}` },
    });
    await response.body?.cancel();
    if (response.status !== 204) {
      throw new BenchError(`the emulator answered ${response.status} to deleting ${tag_name}`);
    }
  }
  await flushToDisk();
}

/** Each timed run starts with no dirty pages left by the previous one. */
async function flushToDisk(): Promise<void> {
  await capture("sync", []);
}

// ---------------------------------------------------------------------------------------------
// Figures
// ---------------------------------------------------------------------------------------------

interface Figure {
  id: string;
  figure: string;
  unit: string;
  releaseBoot: number;
  baseline?: number;
  baselineName?: string;
  /** release-boot ÷ baseline, in the figure's unit. */
  ratio?: number;
  target: string;
  met: boolean;
  /** The table cell for release-boot when one number does not say it all. */
  shown?: string;
  /** Every measurement behind the figure, by side, in round order. */
  samples: Record<string, number[]>;
}

function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const middle = Math.floor(sorted.length / 2);
  return sorted.length % 2 ? sorted[middle] : (sorted[middle - 1] + sorted[middle]) / 2;
}

// --- Hash throughput -------------------------------------------------------------------------

type Hasher = "release-boot" | "sha256sum" | "openssl";

/** Each hasher returns one hex digest per file, in order. */
const HASHERS: Record<Hasher, (files: string[]) => Promise<string[]>> = {
  "release-boot": async (files) => (await hashFiles(files)).map((result) => result.sha256),
  sha256sum: async (files) => parseDigests(await capture("sha256sum", ["--", ...files])),
  openssl: async (files) => parseDigests(await capture("openssl", ["dgst", "-sha256", ...files])),
};

/** `HEX  file` (sha256sum) or `SHA2-256(file)= HEX` (openssl), one line per file. */
function parseDigests(output: string): string[] {
  return output.trim().split("\n").map((line) => {
    const digest = line.match(/^([0-9a-f]{64}) /)?.[1] ?? line.match(/= ([0-9a-f]{64})$/)?.[1];
    if (!digest) throw new BenchError(`cannot read a sha256 digest from ${JSON.stringify(line)}`);
    return digest;
  });
}

async function measureHashing(bench: Bench): Promise<Figure[]> {
  const targets = bench.publishTargets;
  const files = targets.map((t) => t.file);
  log(`Reading the ${files.length} files once, so every hasher starts from a warm page cache`);
  await readThrough(files);
  const one = await compareHashers(files.slice(0, 1), bench.options.rounds);
  const all = await compareHashers(files, bench.options.rounds);
  targets.forEach((target, index) => target.sha256 = all.digests[index]);

  const size = formatSize(bench.options.fileSize);
  const oneLabel = `SHA-256, 1 file of ${size}`;
  const allLabel = `SHA-256, ${files.length} files of ${size}`;
  return [
    throughputFigure("hash-1-file-vs-sha256sum", oneLabel, one, "sha256sum", ">="),
    throughputFigure("hash-1-file-vs-openssl", oneLabel, one, "openssl", ">="),
    throughputFigure("hash-n-files-vs-sha256sum", allLabel, all, "sha256sum", ">"),
    throughputFigure("hash-n-files-vs-openssl", allLabel, all, "openssl", ">"),
  ];
}

async function readThrough(files: string[]): Promise<void> {
  const buffer = new Uint8Array(MiB);
  for (const file of files) {
    using handle = await Deno.open(file);
    while (await handle.read(buffer) !== null) {
      // reading is the point
    }
  }
}

interface HashComparison {
  bytes: number;
  seconds: Record<Hasher, number[]>;
  digests: string[];
}

/** Every round runs all three hashers, in an order that rotates from round to round. */
async function compareHashers(files: string[], rounds: number): Promise<HashComparison> {
  const bytes = (await Promise.all(files.map((file) => fs.stat(file))))
    .reduce((sum, stat) => sum + stat.size, 0);
  const hashers = Object.keys(HASHERS) as Hasher[];
  const times: HashComparison["seconds"] = { "release-boot": [], sha256sum: [], openssl: [] };
  let digests: string[] | undefined;
  for (let round = 0; round < rounds; round++) {
    const order = [...hashers.slice(round % 3), ...hashers.slice(0, round % 3)];
    for (const hasher of order) {
      const start = performance.now();
      const found = await HASHERS[hasher](files);
      times[hasher].push(seconds(start));
      digests ??= found;
      if (found.join() !== digests.join()) {
        throw new BenchError(`${hasher} disagrees on the sha256 of ${files.join(", ")}`);
      }
    }
  }
  const mibs = (hasher: Hasher) => (bytes / MiB / median(times[hasher])).toFixed(0);
  log(`  ${files.length} file(s): ${hashers.map((h) => `${h} ${mibs(h)} MiB/s`).join(", ")}`);
  return { bytes, seconds: times, digests: digests! };
}

function throughputFigure(
  id: string,
  figure: string,
  comparison: HashComparison,
  baseline: Exclude<Hasher, "release-boot">,
  direction: ">=" | ">",
): Figure {
  const throughput = (hasher: Hasher) =>
    comparison.bytes / MiB / median(comparison.seconds[hasher]);
  const ratio = throughput("release-boot") / throughput(baseline);
  return {
    id,
    figure,
    unit: "MiB/s",
    releaseBoot: throughput("release-boot"),
    baseline: throughput(baseline),
    baselineName: baseline,
    ratio,
    target: `${direction === ">=" ? "≥" : ">"} 1.00x`,
    met: direction === ">=" ? ratio >= 1 : ratio > 1,
    samples: {
      "release-boot": comparison.seconds["release-boot"],
      [baseline]: comparison.seconds[baseline],
    },
  };
}

// --- Full publish and rerun ------------------------------------------------------------------

type Side = "shell" | "streamingShell" | "releaseBoot";

interface Round {
  shell: Run;
  streamingShell: Run;
  releaseBoot: Run;
  rerun: Run;
}

const SHELL_NAMES = {
  shell: "sha256sum + curl --data-binary",
  streamingShell: "sha256sum + curl -T",
};

async function measurePublishing(bench: Bench): Promise<Figure[]> {
  const { files, fileSize, rounds } = bench.options;
  log("Warm-up round, not counted: deno's module cache, nix's evaluation, the emulator's disk");
  await publishRound(bench, "warm-up", 0);
  const measured: Round[] = [];
  for (let round = 1; round <= rounds; round++) {
    measured.push(await publishRound(bench, `round-${round}`, round - 1));
  }
  await settle(bench);

  const times = (side: keyof Round) => measured.map((round) => round[side].seconds);
  const rerunBytes = measured.map((r) => r.rerun.uploadedBytes);
  const publish = `full publish of ${files} files of ${formatSize(fileSize)}`;
  const rerun = "rerun on a complete release (vs a first run)";
  return [
    timeFigure("publish", publish, times("releaseBoot"), times("shell"), "shell", 0.7),
    timeFigure(
      "publish-vs-streaming-curl",
      publish,
      times("releaseBoot"),
      times("streamingShell"),
      "streamingShell",
      0.7,
    ),
    timeFigure("rerun", rerun, times("rerun"), times("shell"), "shell", 0.2),
    timeFigure(
      "rerun-vs-streaming-curl",
      rerun,
      times("rerun"),
      times("streamingShell"),
      "streamingShell",
      0.2,
    ),
    {
      id: "rerun-uploaded-bytes",
      figure: "bytes uploaded by the rerun",
      unit: "bytes",
      releaseBoot: Math.max(...rerunBytes),
      target: "0",
      met: rerunBytes.every((bytes) => bytes === 0),
      samples: { "release-boot": rerunBytes },
    },
  ];
}

/**
 * One release per side, each under a fresh tag, in an order that rotates from round to
 * round; release-boot's is published a second time (the rerun) right after. Every timed run
 * starts from the same state: no other release stored, no dirty pages (see settle).
 */
async function publishRound(bench: Bench, label: string, rotation: number): Promise<Round> {
  const kind = label === "warm-up" ? "warm-up" : "publish";
  const tag = (side: Side) => `bench-${label}-${side}`;
  const sides: Record<Side, () => Promise<Run[]>> = {
    shell: async () => [await runShell(bench, kind, tag("shell"), false)],
    streamingShell: async () => [await runShell(bench, kind, tag("streamingShell"), true)],
    releaseBoot: async () => {
      const first = await runReleaseBoot(bench, kind, bench.publishTargets, tag("releaseBoot"));
      await flushToDisk();
      const again = kind === "warm-up" ? "warm-up" : "rerun";
      return [first, await runReleaseBoot(bench, again, bench.publishTargets, first.tag)];
    },
  };
  const names = Object.keys(sides) as Side[];
  const order = [...names.slice(rotation % 3), ...names.slice(0, rotation % 3)];
  const runs: Partial<Record<Side, Run[]>> = {};
  for (const side of order) {
    await settle(bench);
    runs[side] = await sides[side]();
    await verifySums(bench, tag(side));
  }
  return {
    shell: runs.shell![0],
    streamingShell: runs.streamingShell![0],
    releaseBoot: runs.releaseBoot![0],
    rerun: runs.releaseBoot![1],
  };
}

function timeFigure(
  id: string,
  figure: string,
  releaseBoot: number[],
  baseline: number[],
  side: keyof typeof SHELL_NAMES,
  targetRatio: number,
): Figure {
  const ratio = median(releaseBoot) / median(baseline);
  return {
    id,
    figure,
    unit: "s",
    releaseBoot: median(releaseBoot),
    baseline: median(baseline),
    baselineName: SHELL_NAMES[side],
    ratio,
    target: `≤ ${targetRatio.toFixed(2)}x`,
    met: ratio <= targetRatio,
    samples: { "release-boot": releaseBoot, [SHELL_NAMES[side]]: baseline },
  };
}

// --- Fetch for booting -----------------------------------------------------------------------

const FETCH_BASELINE_NAME = "curl -O + sha256sum -c";

/**
 * release-boot fetch (hashing while it downloads, then the atomic switch of DIR/current)
 * against curl -O per file then sha256sum -c, from one release release-boot published, each
 * round into fresh directories, the order alternating; a warm-up pair is not counted.
 */
async function measureFetching(bench: Bench): Promise<Figure> {
  await settle(bench);
  const tag = "bench-fetch";
  await runReleaseBoot(bench, "warm-up", bench.publishTargets, tag);
  await verifySums(bench, tag);
  const sides = {
    releaseBoot: (dir: string) => runFetch(bench, tag, dir),
    baseline: (dir: string) => runFetchBaseline(bench, tag, dir),
  };
  const times = { releaseBoot: [] as number[], baseline: [] as number[] };
  for (let round = 0; round <= bench.options.rounds; round++) {
    const order = round % 2
      ? ["baseline", "releaseBoot"] as const
      : ["releaseBoot", "baseline"] as const;
    for (const side of order) {
      const dir = await fs.mkdtemp(path.join(bench.dir, `fetch-${side}-`));
      await flushToDisk();
      const seconds = await sides[side](dir);
      await fs.rm(dir, { recursive: true, force: true });
      if (round > 0) times[side].push(seconds);
      log(`  ${round === 0 ? "warm-up " : ""}${side}: ${seconds.toFixed(2)} s`);
    }
  }
  await settle(bench);
  const ratio = median(times.releaseBoot) / median(times.baseline);
  return {
    id: "fetch",
    figure: `fetch of ${bench.publishTargets.length} files of ${
      formatSize(bench.options.fileSize)
    }, verified`,
    unit: "s",
    releaseBoot: median(times.releaseBoot),
    baseline: median(times.baseline),
    baselineName: FETCH_BASELINE_NAME,
    ratio,
    // One pass over the bytes (hashed as they arrive) against two (curl, then sha256sum -c).
    target: "≤ 0.70x",
    met: ratio <= 0.7,
    samples: { "release-boot": times.releaseBoot, [FETCH_BASELINE_NAME]: times.baseline },
  };
}

/** release-boot fetch into DIR; its files must be exactly the release's, checked. */
async function runFetch(bench: Bench, tag: string, dir: string): Promise<number> {
  const env: Record<string, string> = {
    PATH: Deno.env.get("PATH") ?? "/usr/bin:/bin",
    HOME: Deno.env.get("HOME") ?? "/root",
    NO_COLOR: "1",
  };
  const denoDir = Deno.env.get("DENO_DIR");
  if (denoDir) env.DENO_DIR = denoDir;
  const child = await runChild(
    Deno.execPath(),
    [
      ...["run", "--allow-all", "--config", DENO_CONFIG, SCRIPT, "fetch"],
      ...["--server", bench.forgejo.url, "--repo", REPO, "--tag", tag, "--out", dir],
      ...["--targets", bench.publishTargets.map((t) => t.name).join(",")],
    ],
    env,
    bench.dir,
  );
  if (child.code !== 0) {
    throw new BenchError(`release-boot fetch failed (exit ${child.code}):\n${tail(child.stderr)}`);
  }
  await checkFetched(path.join(dir, "current"), bench.publishTargets, "release-boot fetch");
  return child.seconds;
}

async function runFetchBaseline(bench: Bench, tag: string, dir: string): Promise<number> {
  const child = await runChild(
    "bash",
    [
      FETCH_BASELINE,
      ...[bench.forgejo.url, REPO, tag, dir],
      ...bench.publishTargets.map((t) => t.asset),
    ],
    { PATH: Deno.env.get("PATH") ?? "/usr/bin:/bin", HOME: Deno.env.get("HOME") ?? "/root" },
    bench.dir,
  );
  if (child.code !== 0) {
    throw new BenchError(
      `the fetch baseline failed (exit ${child.code}):\n${tail(child.stderr)}`,
    );
  }
  await checkFetched(dir, bench.publishTargets, "the fetch baseline");
  return child.seconds;
}

/** Every target's file is in `dir` with the size the build gave it. */
async function checkFetched(dir: string, targets: Target[], side: string): Promise<void> {
  for (const target of targets) {
    const stat = await fs.stat(path.join(dir, target.asset)).catch(() => undefined);
    if (stat?.size !== target.bytes) {
      throw new BenchError(`${side} left ${target.asset} with ${stat?.size ?? "no"} bytes`);
    }
  }
}

// --- Peak RSS --------------------------------------------------------------------------------

async function measurePeakRss(bench: Bench): Promise<Figure> {
  const peaks: number[] = [];
  for (const target of bench.rssTargets) {
    await settle(bench);
    const run = await runReleaseBoot(bench, "rss", [target], `bench-${target.name}`);
    log(`  peak RSS publishing ${formatSize(target.bytes)}: ${formatSize(run.peakRssBytes)}`);
    peaks.push(run.peakRssBytes);
  }
  await settle(bench);

  const sizes = bench.rssTargets.map((t) => t.bytes);
  const smallest = sizes.indexOf(Math.min(...sizes));
  const largest = sizes.indexOf(Math.max(...sizes));
  const highest = Math.max(...peaks);
  const spread = highest - Math.min(...peaks);
  const flat = sizes.length === 1 || spread < RSS_FLAT_SHARE * (sizes[largest] - sizes[smallest]);
  return {
    id: "peak-rss",
    figure: `peak RSS publishing one file of ${sizes.map(formatSize).join(", ")}`,
    unit: "MiB",
    releaseBoot: highest / MiB,
    shown: peaks.map((peak) => (peak / MiB).toFixed(0)).join(" / ") + " MiB",
    target: `< ${RSS_LIMIT / MiB} MiB, flat`,
    met: highest < RSS_LIMIT && flat,
    samples: Object.fromEntries(
      bench.rssTargets.map((t, i) => [`release-boot ${formatSize(t.bytes)}`, [peaks[i] / MiB]]),
    ),
  };
}

// --- nix invocations -------------------------------------------------------------------------

function countNixBuilds(bench: Bench): Figure {
  const releaseBoot = bench.runs.filter((run) => run.nix);
  const publishes = releaseBoot.filter((run) => run.kind === "publish");
  const builds = publishes.map((run) => run.nix!.builds);
  const calls = publishes.map((run) => run.nix!.calls);
  return {
    id: "nix-builds",
    figure: `nix build invocations for ${bench.publishTargets.length} targets`,
    unit: "invocations",
    releaseBoot: Math.max(...builds),
    shown: `${Math.max(...builds)} (of ${Math.max(...calls)} nix calls)`,
    target: "1",
    // Every release-boot run, reruns and single-target runs included, must build once.
    met: releaseBoot.every((run) => run.nix!.builds === 1),
    samples: { "release-boot": builds },
  };
}

// ---------------------------------------------------------------------------------------------
// Report: the table, the JSON, and --smoke's checks of both
// ---------------------------------------------------------------------------------------------

interface Results {
  date: string;
  machine: Record<string, string | number>;
  settings: {
    smoke: boolean;
    rounds: number;
    files: number;
    fileSizeBytes: number;
    rssSizesBytes: number[];
    pageCache: string;
  };
  figures: Figure[];
  runs: Run[];
}

async function summarize(bench: Bench, figures: Figure[]): Promise<Results> {
  const { smoke, rounds, files, fileSize, rssSizes } = bench.options;
  return {
    date: new Date().toISOString(),
    machine: await describeMachine(),
    settings: {
      smoke,
      rounds,
      files,
      fileSizeBytes: fileSize,
      rssSizesBytes: rssSizes,
      pageCache:
        "warm: the files are read once before the hash rounds; every publish reads the same store files",
    },
    figures,
    runs: bench.runs,
  };
}

async function describeMachine(): Promise<Results["machine"]> {
  const cpuinfo = await fs.readFile("/proc/cpuinfo", "utf8").catch(() => "");
  const firstLine = (text: string) => text.trim().split("\n")[0];
  return {
    cpu: cpuinfo.match(/^model name\s*:\s*(.+)$/m)?.[1] ?? "unknown",
    cores: navigator.hardwareConcurrency,
    memory: formatSize(os.totalmem()),
    kernel: os.release(),
    deno: Deno.version.deno,
    nix: firstLine(await capture("nix", ["--version"])),
    sha256sum: firstLine(await capture("sha256sum", ["--version"])),
    openssl: firstLine(await capture("openssl", ["version"])),
    curl: firstLine(await capture("curl", ["--version"])),
  };
}

const NUMBER_FORMATS: Record<string, (value: number) => string> = {
  "MiB/s": (value) => `${value.toFixed(0)} MiB/s`,
  s: (value) => `${value.toFixed(2)} s`,
  bytes: (value) => `${value} B`,
};

function formatValue(value: number, unit: string): string {
  return NUMBER_FORMATS[unit]?.(value) ?? `${+value.toFixed(2)} ${unit}`;
}

/** A markdown table, so that bench/README.md can carry it as printed. */
function renderTable(figures: Figure[]): string {
  const rows = figures.map((f) => [
    f.figure,
    f.shown ?? formatValue(f.releaseBoot, f.unit),
    f.baseline === undefined ? "—" : `${f.baselineName} ${formatValue(f.baseline, f.unit)}`,
    f.ratio === undefined ? "—" : `${f.ratio.toFixed(2)}x`,
    f.target,
    f.met ? "yes" : "**no**",
  ]);
  const header = ["figure", "release-boot", "baseline", "ratio", "target", "met?"];
  const widths = header.map((title, column) =>
    Math.max(title.length, ...rows.map((row) => row[column].length))
  );
  const line = (cells: string[]) => `| ${cells.map((c, i) => c.padEnd(widths[i])).join(" | ")} |`;
  return [line(header), line(widths.map((w) => "-".repeat(w))), ...rows.map(line)].join("\n");
}

async function writeJson(file: string, results: Results): Promise<void> {
  await fs.mkdir(path.dirname(file), { recursive: true });
  await fs.writeFile(file, `${JSON.stringify(results, null, 2)}\n`);
  log(`Wrote ${file}`);
}

const FIGURE_IDS = [
  "hash-1-file-vs-sha256sum",
  "hash-1-file-vs-openssl",
  "hash-n-files-vs-sha256sum",
  "hash-n-files-vs-openssl",
  "publish",
  "publish-vs-streaming-curl",
  "rerun",
  "rerun-vs-streaming-curl",
  "rerun-uploaded-bytes",
  "fetch",
  "peak-rss",
  "nix-builds",
];

/** Only what --smoke checks is modelled. */
const WrittenResultsSchema = v.object({
  date: v.string(),
  machine: v.object({ cpu: v.string(), cores: v.number(), nix: v.string(), deno: v.string() }),
  figures: v.array(
    v.object({
      id: v.string(),
      figure: v.string(),
      baselineName: v.optional(v.string()),
      releaseBoot: v.number(),
      met: v.boolean(),
    }),
  ),
  runs: v.array(v.object({
    side: v.string(),
    kind: v.string(),
    uploadedBytes: v.number(),
    nix: v.optional(v.object({ builds: v.number() })),
  })),
});

/** The output's correctness, not its timing: every figure there, reruns upload nothing, one build. */
async function checkSmoke(table: string, jsonFile: string): Promise<string[]> {
  const parsed = v.safeParse(
    WrittenResultsSchema,
    JSON.parse(await fs.readFile(jsonFile, "utf8")),
  );
  if (!parsed.success) return [`the JSON does not parse: ${v.summarize(parsed.issues)}`];
  const { figures, runs } = parsed.output;
  const problems: string[] = [];
  const rows = table.split("\n");
  for (const id of FIGURE_IDS) {
    const figure = figures.find((f) => f.id === id);
    if (!figure) problems.push(`the JSON has no figure ${id}`);
    else if (
      !rows.some((row) =>
        row.startsWith(`| ${figure.figure} `) && row.includes(figure.baselineName ?? "")
      )
    ) {
      problems.push(`the table has no row ${id}`);
    }
  }
  const reruns = runs.filter((run) => run.kind === "rerun");
  if (reruns.length === 0) problems.push("no rerun was recorded");
  for (const run of reruns.filter((run) => run.uploadedBytes !== 0)) {
    problems.push(`a rerun uploaded ${run.uploadedBytes} bytes`);
  }
  const releaseBoot = runs.filter((run) => run.side === "release-boot");
  for (const run of releaseBoot.filter((run) => run.nix?.builds !== 1)) {
    problems.push(`a release-boot ${run.kind} ran nix build ${run.nix?.builds ?? "?"} times`);
  }
  return problems;
}

function reportSmokeChecks(problems: string[]): void {
  if (problems.length === 0) {
    log(
      "Smoke checks passed: every figure in the table and the JSON, reruns uploaded 0 bytes, one nix build per run",
    );
    return;
  }
  for (const problem of problems) log(`smoke check failed: ${problem}`);
  Deno.exitCode = 1;
}

// ---------------------------------------------------------------------------------------------

try {
  await main();
} catch (error) {
  const known = error instanceof UsageError || error instanceof BenchError;
  log(`bench: ${known ? (error as Error).message : (error as Error)?.stack ?? error}`);
  Deno.exit(error instanceof UsageError ? 2 : 1);
}

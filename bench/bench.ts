#!/usr/bin/env -S deno run --allow-all
/**
 * deno task bench: release-boot against the shell ways it replaces (sha256sum, then one curl
 * per file) and against the floors no client beats (the same uploads and downloads, nothing
 * hashed), every side talking over loopback to the Forgejo emulator in a process of its own.
 *
 * Prints each figure with its target and whether it was met, as a markdown table on stdout
 * (progress goes to stderr), and writes them, with every sample and the machine, as JSON.
 * bench/README.md says what each figure measures and how; --help lists the flags.
 */
import * as fs from "node:fs/promises";
import * as os from "node:os";
import * as path from "node:path";
import { parseArgs } from "node:util";
import * as v from "valibot";
import { assetName } from "../scripts/lib/nix.ts";
import { hashFiles } from "../scripts/lib/hash.ts";
import { ReleaseSchema } from "../types/forgejo.ts";
import { BuildResultsSchema } from "../types/nix.ts";
import {
  BenchError,
  capture,
  type ChildResult,
  evictFromPageCache,
  flushToDisk,
  freeSpace,
  type IoCounters,
  log,
  readThrough,
  requireTools,
  residentBytes,
  runChild,
  seconds,
  tail,
} from "./children.ts";
import { ForgejoProcess, type RequestRecord } from "./forgejo_process.ts";
import {
  checkSmoke,
  type Figure,
  formatSize,
  median,
  renderTable,
  reportSmokeChecks,
  writeJson,
} from "./report.ts";

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
/** How many uploads release-boot runs at once, where it reads it. */
const UPLOAD_CONCURRENCY_ENV = "RELEASE_BOOT_UPLOAD_CONCURRENCY";

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;
const RSS_LIMIT = 200 * MiB;
/** "Flat": the peaks differ by less than this share of the difference in file size. */
const RSS_FLAT_SHARE = 0.01;
/** The single-file publish --big adds to the peak RSS figure. */
const BIG_RSS_SIZE = 8 * GiB;
/** Free disk a run keeps beyond what its files take: nix's database, logs, the JSON. */
const DISK_MARGIN = GiB;

// ---------------------------------------------------------------------------------------------
// The benchmark, figure by figure
// ---------------------------------------------------------------------------------------------

async function main(): Promise<void> {
  const options = readOptions(Deno.args);
  if (options.help) return console.log(HELP);
  await requireTools();
  await checkDiskSpace(options);
  const cleanup = new Cleanup();
  try {
    const bench = await step("Build the bench flake, start the Forgejo emulator", () => {
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
      ...fetching,
      memory,
      nixBuilds,
    ]);
    const table = renderTable(results.figures);
    console.log(`${describeForgejo(bench)}\n\n${table}`);
    const json = options.json ?? path.join(bench.dir, "results.json");
    await writeJson(json, results);
    if (options.smoke) reportSmokeChecks(await checkSmoke(table, json));
  } finally {
    await cleanup.run();
  }
}

// ---------------------------------------------------------------------------------------------
// Errors and steps
// ---------------------------------------------------------------------------------------------

/** Bad flags: exit 2. */
class UsageError extends Error {}

async function step<T>(title: string, work: () => Promise<T>): Promise<T> {
  log(`\n### ${title}`);
  const start = performance.now();
  const result = await work();
  log(`    (${seconds(start).toFixed(1)} s)`);
  return result;
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
  /** With --big, BIG_RSS_SIZE is among them. */
  rssSizes: number[];
  /** Undefined in --smoke mode without --json: a temp file, removed at the end. */
  json?: string;
}

const HELP =
  `deno task bench [flags]: release-boot against the shell ways it replaces (sha256sum, then
curl per file) and against the floors no client beats (the same transfers, nothing hashed).
Every side talks to the Forgejo emulator, which runs in a process of its own
(bench/forgejo_server.ts). Prints each figure with its target and whether it was met, and
writes the same figures, with every sample, as JSON. Needs nix, sha256sum, openssl, curl,
bash and fincore.

Publishing is compared with bench/baseline.sh: curl --data-binary @file (the first issue's
baseline), curl -T file (streaming), and --upload-only (curl -T, nothing hashed: the floor).
Fetching is compared with bench/fetch_baseline.sh: curl -O then sha256sum -c, and
--parallel (curl --parallel, nothing checked: the floor).

Flags:
  --rounds N         rounds of each comparison, the sides taking turns first (default 3)
  --files N          files in a full publish and a fetch, also hashed for the N-file figure
                     (default 4)
  --file-size SIZE   size of each of those files (default 512MiB); under 1GiB, because the
                     baseline's curl --data-binary @file refuses larger files
  --rss-sizes LIST   comma-separated sizes of the single-file publishes whose peak RSS is
                     measured (default 1,2,4 = 1, 2 and 4 GiB)
  --big              also measure peak RSS publishing one file of 8 GiB (about 16 GiB more
                     disk: the store file and the emulator's copy); not with --smoke
  --json PATH        where the figures go as JSON (default bench/results.json)
  --smoke            a seconds-long run for CI: 2 files of 1MiB, RSS sizes 1MiB,2MiB,4MiB,
                     1 round, JSON to a temp file unless --json; checks only that the output
                     is complete and sane (not the timing targets), exits 1 if not
  --help             this text

SIZE: a number with an optional unit KiB, MiB or GiB; without a unit it is GiB (0.5 = 512MiB).

Before it builds anything the bench checks that the disk has room, and refuses if not. The
default run builds about 9 GiB of pseudo-random files into the nix store (deleted at the end).`;

const DEFAULTS = { rounds: "3", files: "4", fileSize: "512MiB", rssSizes: "1,2,4" };
const SMOKE_DEFAULTS = { rounds: "1", files: "2", fileSize: "16MiB", rssSizes: "1MiB,2MiB,4MiB" };

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
        big: { type: "boolean" },
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
  if (smoke && values.big) {
    throw new UsageError("--big publishes 8 GiB and --smoke must take seconds: give one of them");
  }
  const defaults = smoke ? SMOKE_DEFAULTS : DEFAULTS;
  const rssSizes = parseFlag(
    "rss-sizes",
    SizeListSchema,
    values["rss-sizes"] ?? defaults.rssSizes,
  );
  return {
    help: values.help ?? false,
    smoke,
    rounds: parseFlag("rounds", countSchema(1, 50), values.rounds ?? defaults.rounds),
    // Several files: "faster than both on several files" needs at least two.
    files: parseFlag("files", countSchema(2, 64), values.files ?? defaults.files),
    fileSize: parseFlag("file-size", FileSizeSchema, values["file-size"] ?? defaults.fileSize),
    rssSizes: values.big && !rssSizes.includes(BIG_RSS_SIZE)
      ? [...rssSizes, BIG_RSS_SIZE]
      : rssSizes,
    json: values.json === undefined
      ? (smoke ? undefined : DEFAULT_JSON)
      : path.resolve(values.json),
  };
}

/**
 * Refuses a run the disk cannot hold, before anything is built: the nix store keeps every
 * target's file; the temp dir holds the emulator's copy of one release at a time, and while
 * fetching a fetched copy beside it.
 */
async function checkDiskSpace(options: Options): Promise<void> {
  const images = options.files * options.fileSize;
  const needs = [
    {
      dir: await existingAncestor("/nix/store"),
      bytes: images + options.rssSizes.reduce((sum, bytes) => sum + bytes, 0),
      what: "the nix store's files",
    },
    {
      dir: os.tmpdir(),
      bytes: Math.max(2 * images, ...options.rssSizes),
      what: "the emulator's copies and the fetched files",
    },
  ];
  const byMount = new Map<string, { free: number; bytes: number; what: string[] }>();
  for (const need of needs) {
    const { bytes: free, mount } = await freeSpace(need.dir);
    const entry = byMount.get(mount) ?? { free, bytes: DISK_MARGIN, what: [] };
    entry.bytes += need.bytes;
    entry.what.push(need.what);
    byMount.set(mount, entry);
  }
  for (const [mount, need] of byMount) {
    if (need.bytes > need.free) {
      throw new BenchError(
        `not enough disk: this run needs ${formatSize(need.bytes)} free on ${mount} (${
          need.what.join(" and ")
        }, and ${formatSize(DISK_MARGIN)} to spare), which has ${
          formatSize(need.free)
        }; free some, or leave out --big, or give smaller --files, --file-size or --rss-sizes`,
      );
    }
  }
}

async function existingAncestor(dir: string): Promise<string> {
  const found = await fs.stat(dir).then(() => true, () => false);
  return found || dir === path.dirname(dir) ? dir : existingAncestor(path.dirname(dir));
}

// ---------------------------------------------------------------------------------------------
// Setup: the bench flake, built once; the emulator's process; the nix shim; asset links
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
  forgejo: ForgejoProcess;
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

  const storageDir = path.join(dir, "forgejo");
  await fs.mkdir(storageDir);
  const forgejo = await ForgejoProcess.start({ storageDir, token: TOKEN, commit: COMMIT });
  cleanup.add("stop the Forgejo emulator", () => forgejo.close());
  log(`The Forgejo emulator runs in its own process (pid ${forgejo.pid}) at ${forgejo.url}`);

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

function describeForgejo(bench: Bench): string {
  return `Forgejo: the emulator (test/forgejo/emulator.ts) in a process of its own ` +
    `(bench/forgejo_server.ts, pid ${bench.forgejo.pid}, bench pid ${Deno.pid}); ` +
    `release-boot and the shell baselines both talk to it at ${bench.forgejo.url}.`;
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
        env: { NIX_CONFIG },
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
        { env: { NIX_CONFIG }, stderr: "inherit" },
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
    env: { NIX_CONFIG },
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

function totalBytes(targets: Target[]): number {
  return targets.reduce((sum, target) => sum + target.bytes, 0);
}

// ---------------------------------------------------------------------------------------------
// Runs: release-boot and the shell baselines, each checked against what the emulator stored
// ---------------------------------------------------------------------------------------------

interface NixCall {
  /** The nix subcommand and its arguments, without the experimental-features option. */
  command: string;
  seconds: number;
}

/** Who ran: release-boot, or the shell way it is compared with. */
type SideName =
  | "release-boot"
  | "sha256sum + curl --data-binary"
  | "sha256sum + curl -T"
  | "curl -T, nothing hashed"
  | "curl -O + sha256sum -c"
  | "curl --parallel, unchecked";

interface Run {
  side: SideName;
  kind: "warm-up" | "publish" | "rerun" | "cold-rerun" | "fetch" | "rss";
  tag: string;
  seconds: number;
  /** Request body bytes the emulator read during the run. */
  uploadedBytes: number;
  /** The most uploads the emulator had open at one time during the run. */
  uploadsAtOnce: number;
  peakRssBytes: number;
  /** Its /proc/<pid>/io at exit, its children's included. */
  io: IoCounters;
  /** release-boot only: RELEASE_BOOT_UPLOAD_CONCURRENCY, when the bench set it. */
  uploadConcurrency?: number;
  /**
   * cold-rerun only: bytes of the image files in the page cache after the run, which held
   * none of them before it. 0 means it did not read one byte of them; anything else is what
   * it read, rounded up to whole pages and readahead.
   */
  imageBytesRead?: number;
  /** release-boot publishes only: every nix invocation, from the shim's log. */
  nix?: { calls: number; builds: number; seconds: number; commands: NixCall[] };
  /** release-boot publishes only: seconds from each "==> Step" line to the next (or to exit). */
  steps?: Record<string, number>;
}

/** PATH, HOME and DENO_DIR: what every child gets from the bench's own environment. */
function baseEnv(): Record<string, string> {
  const env: Record<string, string> = {
    PATH: Deno.env.get("PATH") ?? "/usr/bin:/bin",
    HOME: Deno.env.get("HOME") ?? "/root",
  };
  const denoDir = Deno.env.get("DENO_DIR");
  if (denoDir) env.DENO_DIR = denoDir;
  return env;
}

interface ReleaseBootRun {
  kind: Run["kind"];
  targets: Target[];
  tag: string;
  uploadConcurrency?: number;
  /** The targets' files were evicted from the page cache just before: count what it reads. */
  imagesEvicted?: boolean;
}

async function runReleaseBoot(bench: Bench, how: ReleaseBootRun): Promise<Run> {
  const nixLog = path.join(bench.dir, `nix-calls-${bench.runs.length + 1}.log`);
  const mark = await bench.forgejo.requestCount();
  const env: Record<string, string> = {
    ...baseEnv(),
    PATH: `${bench.shimDir}:${Deno.env.get("PATH") ?? "/usr/bin:/bin"}`,
    NIX_CONFIG,
    NO_COLOR: "1",
    FORGEJO_TOKEN: TOKEN,
    BENCH_NIX_LOG: nixLog,
  };
  if (how.uploadConcurrency) env[UPLOAD_CONCURRENCY_ENV] = String(how.uploadConcurrency);
  const child = await runChild(
    Deno.execPath(),
    [
      ...["run", "--allow-all", "--config", DENO_CONFIG, SCRIPT],
      ...["--server", bench.forgejo.url, "--repo", REPO, "--flake", bench.flakeRef],
      ...["--targets", how.targets.map((t) => t.name).join(","), "--tag", how.tag],
      ...["--commit", COMMIT],
      // The bench flake is a generated path: flake, not a git checkout of COMMIT.
      "--allow-dirty",
    ],
    env,
    bench.dir,
  );
  if (child.code !== 0) {
    throw new BenchError(
      `release-boot failed on ${how.tag} (exit ${child.code}):\n${tail(child.stderr)}`,
    );
  }
  // Read before anything else can touch the files.
  const imageBytesRead = how.imagesEvicted
    ? await residentBytes(how.targets.map((t) => t.file))
    : undefined;
  await verifyRelease(bench, how.tag, how.targets, [
    "SHA256SUMS",
    "manifest.json",
    "provenance.intoto.json",
  ]);
  return recordRun(bench, mark, child, {
    side: "release-boot",
    kind: how.kind,
    tag: how.tag,
    uploadConcurrency: how.uploadConcurrency,
    imageBytesRead,
    nix: await readNixLog(nixLog),
    steps: stepDurations(child),
  });
}

const SHELLS = {
  "data-binary": { flags: [], side: "sha256sum + curl --data-binary", index: ["SHA256SUMS"] },
  stream: { flags: ["--stream"], side: "sha256sum + curl -T", index: ["SHA256SUMS"] },
  "upload-only": { flags: ["--upload-only"], side: "curl -T, nothing hashed", index: [] },
} as const;

async function runShell(
  bench: Bench,
  kind: Run["kind"],
  tag: string,
  shell: keyof typeof SHELLS,
): Promise<Run> {
  const { flags, side, index } = SHELLS[shell];
  const mark = await bench.forgejo.requestCount();
  const child = await runChild(
    "bash",
    [BASELINE, ...flags, ...[bench.forgejo.url, REPO, tag, COMMIT, bench.assetDir]],
    { ...baseEnv(), TMPDIR: bench.dir, FORGEJO_TOKEN: TOKEN },
    bench.dir,
  );
  if (child.code !== 0) {
    throw new BenchError(
      `the shell baseline (${side}) failed on ${tag} (exit ${child.code}):\n${tail(child.stderr)}`,
    );
  }
  await verifyRelease(bench, tag, bench.publishTargets, [...index]);
  return recordRun(bench, mark, child, { side, kind, tag });
}

/** What the emulator saw of the run, joined to what the child's counters say; kept and logged. */
async function recordRun(
  bench: Bench,
  mark: number,
  child: ChildResult,
  fields: Pick<Run, "side" | "kind" | "tag"> & Partial<Run>,
): Promise<Run> {
  const requests = await bench.forgejo.requestsFrom(mark);
  const run: Run = {
    ...fields,
    seconds: child.seconds,
    uploadedBytes: requests.reduce((sum, request) => sum + request.bodyBytes, 0),
    uploadsAtOnce: mostAtOnce(requests.filter(isUpload)),
    peakRssBytes: child.peakRssBytes,
    io: child.io,
  };
  bench.runs.push(run);
  log(describeRun(run));
  return run;
}

function isUpload(request: RequestRecord): boolean {
  return request.method === "POST" && /\/releases\/\d+\/assets$/.test(request.path);
}

/** The most requests open at one instant; one never closed stays open. */
function mostAtOnce(requests: RequestRecord[]): number {
  // At equal times a close comes before an open: one request following another is not two.
  const events = requests
    .flatMap((r) => [[r.receivedAt, 1], [r.closedAt ?? Infinity, -1]])
    .sort(([a, openA], [b, openB]) => a - b || openA - openB);
  let open = 0;
  let most = 0;
  for (const [, change] of events) {
    open += change;
    most = Math.max(most, open);
  }
  return most;
}

function describeRun(run: Run): string {
  const nix = run.nix ? `, ${run.nix.builds} nix build of ${run.nix.calls} nix calls` : "";
  const setting = run.uploadConcurrency
    ? ` (${UPLOAD_CONCURRENCY_ENV}=${run.uploadConcurrency})`
    : "";
  const images = run.imageBytesRead === undefined
    ? ""
    : `, ${formatSize(run.imageBytesRead)} of the evicted images read`;
  return `  ${run.side}${setting} ${run.kind} ${run.tag}: ${run.seconds.toFixed(2)} s, ${
    formatSize(run.uploadedBytes)
  } uploaded (${run.uploadsAtOnce} at once at most), ${
    formatSize(run.io.rchar)
  } read${images}${nix}`;
}

/** Both sides must leave the same published release: every file, and the same SHA256SUMS. */
async function verifyRelease(
  bench: Bench,
  tag: string,
  targets: Target[],
  indexNames: string[],
): Promise<void> {
  const release = await findRelease(bench, tag);
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

async function findRelease(bench: Bench, tag: string) {
  return (await bench.forgejo.releases())
    .map((data) => v.parse(ReleaseSchema, data))
    .find((r) => r.tag_name === tag);
}

/** Checks a release's SHA256SUMS against the sums all three hashers agreed on. */
async function verifySums(bench: Bench, tag: string): Promise<void> {
  const release = await findRelease(bench, tag);
  if (!release) throw new BenchError(`there is no release ${tag} to check the sums of`);
  const [stored] = await bench.forgejo.assetBytes(release.id, "SHA256SUMS");
  // SHA256SUMS also lists manifest.json and the provenance, whose bytes the bench cannot predict.
  const images = new TextDecoder().decode(stored).split("\n")
    .filter((line) => line && !/ {2}(manifest\.json|provenance\.intoto\.json)$/.test(line))
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
  for (const data of await bench.forgejo.releases()) {
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

/** The items starting at `by` (modulo their count), then the ones before it. */
function rotate<T>(items: readonly T[], by: number): T[] {
  const start = by % items.length;
  return [...items.slice(start), ...items.slice(0, start)];
}

function timeFigure(
  id: string,
  figure: string,
  releaseBoot: number[],
  baseline: number[],
  baselineName: SideName,
  targetRatio: number,
): Figure {
  const ratio = median(releaseBoot) / median(baseline);
  return {
    id,
    figure,
    unit: "s",
    releaseBoot: median(releaseBoot),
    baseline: median(baseline),
    baselineName,
    ratio,
    target: `≤ ${targetRatio.toFixed(2)}x`,
    met: ratio <= targetRatio,
    samples: { "release-boot": releaseBoot, [baselineName]: baseline },
  };
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
    for (const hasher of rotate(hashers, round)) {
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

/**
 * The sides of a publish round: the three shells, release-boot as it ships (then its rerun,
 * warm, and its rerun with the images evicted), and release-boot told to upload one file at a
 * time and two at a time.
 */
type PublishSide =
  | "shell"
  | "streamingShell"
  | "uploadFloor"
  | "releaseBoot"
  | "oneUpload"
  | "twoUploads";
type Round = Partial<Record<PublishSide | "rerun" | "coldRerun", Run>>;

const SHIPPED_SIDES: PublishSide[] = ["shell", "streamingShell", "uploadFloor", "releaseBoot"];
const CONCURRENCY_SIDES: PublishSide[] = ["oneUpload", "twoUploads"];

/** Whether release-boot heeds RELEASE_BOOT_UPLOAD_CONCURRENCY, judged by what the emulator saw. */
type UploadKnob = { available: true } | { available: false; reason: string };

async function measurePublishing(bench: Bench): Promise<Figure[]> {
  const { files, fileSize, rounds } = bench.options;
  log(
    `Warm-up round, not counted: deno's module cache, nix's evaluation, the emulator's disk; it also tries ${UPLOAD_CONCURRENCY_ENV}=1 and =2`,
  );
  const warmUp = await publishRound(bench, "warm-up", 0, [
    ...SHIPPED_SIDES,
    ...CONCURRENCY_SIDES,
  ]);
  const knob = judgeUploadKnob(warmUp);
  if (!knob.available) log(`  Uploads two at a time vs one: not available: ${knob.reason}`);
  const sides = knob.available ? [...SHIPPED_SIDES, ...CONCURRENCY_SIDES] : SHIPPED_SIDES;
  const measured: Round[] = [];
  for (let round = 1; round <= rounds; round++) {
    measured.push(await publishRound(bench, `round-${round}`, round - 1, sides));
  }
  await settle(bench);

  const times = (side: keyof Round) => measured.map((round) => round[side]!.seconds);
  const rerunBytes = measured.flatMap((r) => [r.rerun!.uploadedBytes, r.coldRerun!.uploadedBytes]);
  const publish = `full publish of ${files} files of ${formatSize(fileSize)}`;
  const rerun = "rerun on a complete release (vs a first run)";
  const shell = SHELLS["data-binary"].side;
  const streamingShell = SHELLS.stream.side;
  return [
    timeFigure("publish", publish, times("releaseBoot"), times("shell"), shell, 0.7),
    timeFigure(
      "publish-vs-streaming-curl",
      publish,
      times("releaseBoot"),
      times("streamingShell"),
      streamingShell,
      0.7,
    ),
    timeFigure(
      "publish-vs-upload-floor",
      publish,
      times("releaseBoot"),
      times("uploadFloor"),
      SHELLS["upload-only"].side,
      1.15,
    ),
    uploadConcurrencyFigure(measured, knob),
    timeFigure("rerun", rerun, times("rerun"), times("shell"), shell, 0.2),
    timeFigure(
      "rerun-vs-streaming-curl",
      rerun,
      times("rerun"),
      times("streamingShell"),
      streamingShell,
      0.05,
    ),
    {
      id: "rerun-uploaded-bytes",
      figure: "bytes uploaded by the rerun",
      unit: "bytes",
      releaseBoot: Math.max(...rerunBytes),
      target: "0 B",
      met: rerunBytes.every((bytes) => bytes === 0),
      samples: { "release-boot": rerunBytes },
    },
    imageReadsFigure(bench, measured),
  ];
}

/**
 * One release per side, each under a fresh tag, in an order that rotates from round to
 * round. Every run starts from the same state: no other release stored, no dirty pages.
 */
async function publishRound(
  bench: Bench,
  label: string,
  rotation: number,
  sides: PublishSide[],
): Promise<Round> {
  const kind = label === "warm-up" ? "warm-up" : "publish";
  const targets = bench.publishTargets;
  const runners: Record<PublishSide, (tag: string) => Promise<Round>> = {
    shell: async (tag) => ({ shell: await runShell(bench, kind, tag, "data-binary") }),
    streamingShell: async (tag) => ({ streamingShell: await runShell(bench, kind, tag, "stream") }),
    uploadFloor: async (tag) => ({ uploadFloor: await runShell(bench, kind, tag, "upload-only") }),
    releaseBoot: (tag) => publishAndRerun(bench, kind, tag),
    oneUpload: async (tag) => ({
      oneUpload: await runReleaseBoot(bench, { kind, targets, tag, uploadConcurrency: 1 }),
    }),
    twoUploads: async (tag) => ({
      twoUploads: await runReleaseBoot(bench, { kind, targets, tag, uploadConcurrency: 2 }),
    }),
  };
  let round: Round = {};
  for (const side of rotate(sides, rotation)) {
    const tag = `bench-${label}-${side}`;
    await settle(bench);
    round = { ...round, ...await runners[side](tag) };
    // The upload floor hashes nothing, so it has no SHA256SUMS to check.
    if (side !== "uploadFloor") await verifySums(bench, tag);
  }
  return round;
}

/**
 * release-boot's first run, then its rerun on the now complete release (timed, the images
 * still in the page cache, as after a build), then one more with the images evicted from
 * the page cache, which shows whether a rerun reads any image byte at all.
 */
async function publishAndRerun(bench: Bench, kind: Run["kind"], tag: string): Promise<Round> {
  const targets = bench.publishTargets;
  const releaseBoot = await runReleaseBoot(bench, { kind, targets, tag });
  await flushToDisk();
  const again = kind === "warm-up" ? "warm-up" : "rerun";
  const rerun = await runReleaseBoot(bench, { kind: again, targets, tag });
  if (kind === "warm-up") return { releaseBoot, rerun };
  const files = targets.map((t) => t.file);
  await evictFromPageCache(files);
  const coldRerun = await runReleaseBoot(bench, {
    kind: "cold-rerun",
    targets,
    tag,
    imagesEvicted: true,
  });
  await readThrough(files);
  return { releaseBoot, rerun, coldRerun };
}

/** Available only if one setting gave one upload at a time and the other two, as asked. */
function judgeUploadKnob(warmUp: Round): UploadKnob {
  const one = warmUp.oneUpload!.uploadsAtOnce;
  const two = warmUp.twoUploads!.uploadsAtOnce;
  if (one === 1 && two === 2) return { available: true };
  return {
    available: false,
    reason:
      `release-boot had ${one} upload(s) open at once with ${UPLOAD_CONCURRENCY_ENV}=1 and ${two} with =2, so it does not read the setting`,
  };
}

function uploadConcurrencyFigure(measured: Round[], knob: UploadKnob): Figure {
  const base = {
    id: "upload-concurrency",
    figure: `full publish, uploads 2 at a time vs 1 (${UPLOAD_CONCURRENCY_ENV})`,
    unit: "s",
    target: "default = the faster",
  };
  if (!knob.available) return { ...base, shown: "not available", note: knob.reason, samples: {} };
  const one = measured.map((round) => round.oneUpload!.seconds);
  const two = measured.map((round) => round.twoUploads!.seconds);
  const ratio = median(two) / median(one);
  const faster = ratio < 1 ? 2 : 1;
  const byDefault = Math.max(...measured.map((round) => round.releaseBoot!.uploadsAtOnce));
  return {
    ...base,
    releaseBoot: median(two),
    shown: `2 at a time ${median(two).toFixed(2)} s; default ${byDefault} at a time`,
    baseline: median(one),
    baselineName: "1 at a time",
    ratio,
    met: byDefault === faster,
    samples: { "2 at a time": two, "1 at a time": one },
  };
}

function imageReadsFigure(bench: Bench, measured: Round[]): Figure {
  const cold = measured.map((round) => round.coldRerun!);
  const read = cold.map((run) => run.imageBytesRead!);
  const fromDisk = cold.map((run) => run.io.readBytes);
  return {
    id: "rerun-image-reads",
    figure: "image bytes read by a rerun (images evicted from the page cache first)",
    unit: "bytes",
    releaseBoot: Math.max(...read),
    shown: `${formatSize(Math.max(...read))} of ${formatSize(totalBytes(bench.publishTargets))}; ${
      formatSize(Math.max(...fromDisk))
    } from disk in all`,
    target: "0 B",
    met: read.every((bytes) => bytes === 0),
    samples: {
      "image bytes read": read,
      "bytes read from disk (read_bytes)": fromDisk,
      "bytes read by any read() (rchar)": cold.map((run) => run.io.rchar),
      "rerun seconds": cold.map((run) => run.seconds),
    },
  };
}

// --- Fetch for booting -----------------------------------------------------------------------

type FetchSide = "releaseBoot" | "verifiedShell" | "parallelFloor";

const FETCH_SHELLS = {
  verifiedShell: { flags: [], side: "curl -O + sha256sum -c" },
  parallelFloor: { flags: ["--parallel"], side: "curl --parallel, unchecked" },
} as const;

/**
 * release-boot fetch (hashing while it downloads, then the atomic switch of DIR/current)
 * against curl -O per file then sha256sum -c, and against the floor: the same files with
 * curl --parallel, unchecked. All fetch one release release-boot published, each round into
 * fresh directories, the order rotating; a warm-up round is not counted.
 */
async function measureFetching(bench: Bench): Promise<Figure[]> {
  await settle(bench);
  const tag = "bench-fetch";
  await runReleaseBoot(bench, { kind: "warm-up", targets: bench.publishTargets, tag });
  await verifySums(bench, tag);
  const runners: Record<FetchSide, (kind: Run["kind"], dir: string) => Promise<Run>> = {
    releaseBoot: (kind, dir) => runFetch(bench, kind, tag, dir),
    verifiedShell: (kind, dir) => runFetchShell(bench, kind, tag, dir, "verifiedShell"),
    parallelFloor: (kind, dir) => runFetchShell(bench, kind, tag, dir, "parallelFloor"),
  };
  const sides = Object.keys(runners) as FetchSide[];
  const times: Record<FetchSide, number[]> = {
    releaseBoot: [],
    verifiedShell: [],
    parallelFloor: [],
  };
  for (let round = 0; round <= bench.options.rounds; round++) {
    for (const side of rotate(sides, round)) {
      const dir = await fs.mkdtemp(path.join(bench.dir, `fetch-${side}-`));
      await flushToDisk();
      const run = await runners[side](round === 0 ? "warm-up" : "fetch", dir);
      await fs.rm(dir, { recursive: true, force: true });
      if (round > 0) times[side].push(run.seconds);
    }
  }
  await settle(bench);
  const figure = `fetch of ${bench.publishTargets.length} files of ${
    formatSize(bench.options.fileSize)
  }, verified`;
  return [
    // One pass over the bytes (hashed as they arrive) against two (curl, then sha256sum -c).
    timeFigure(
      "fetch",
      figure,
      times.releaseBoot,
      times.verifiedShell,
      FETCH_SHELLS.verifiedShell.side,
      0.6,
    ),
    timeFigure(
      "fetch-vs-parallel-curl",
      figure,
      times.releaseBoot,
      times.parallelFloor,
      FETCH_SHELLS.parallelFloor.side,
      1.15,
    ),
  ];
}

/** release-boot fetch into DIR; its files must be exactly the release's, checked. */
async function runFetch(bench: Bench, kind: Run["kind"], tag: string, dir: string): Promise<Run> {
  const mark = await bench.forgejo.requestCount();
  const child = await runChild(
    Deno.execPath(),
    [
      ...["run", "--allow-all", "--config", DENO_CONFIG, SCRIPT, "fetch"],
      ...["--server", bench.forgejo.url, "--repo", REPO, "--tag", tag, "--out", dir],
      ...["--targets", bench.publishTargets.map((t) => t.name).join(",")],
    ],
    { ...baseEnv(), NO_COLOR: "1" },
    bench.dir,
  );
  if (child.code !== 0) {
    throw new BenchError(`release-boot fetch failed (exit ${child.code}):\n${tail(child.stderr)}`);
  }
  await checkFetched(path.join(dir, "current"), bench.publishTargets, "release-boot fetch");
  return recordRun(bench, mark, child, { side: "release-boot", kind, tag });
}

async function runFetchShell(
  bench: Bench,
  kind: Run["kind"],
  tag: string,
  dir: string,
  shell: keyof typeof FETCH_SHELLS,
): Promise<Run> {
  const { flags, side } = FETCH_SHELLS[shell];
  const mark = await bench.forgejo.requestCount();
  const child = await runChild(
    "bash",
    [
      ...[FETCH_BASELINE, ...flags, bench.forgejo.url, REPO, tag, dir],
      ...bench.publishTargets.map((t) => t.asset),
    ],
    baseEnv(),
    bench.dir,
  );
  if (child.code !== 0) {
    throw new BenchError(
      `the fetch baseline (${side}) failed (exit ${child.code}):\n${tail(child.stderr)}`,
    );
  }
  await checkFetched(dir, bench.publishTargets, `the fetch baseline (${side})`);
  return recordRun(bench, mark, child, { side, kind, tag });
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
    const run = await runReleaseBoot(bench, {
      kind: "rss",
      targets: [target],
      tag: `bench-${target.name}`,
    });
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
    // Every release-boot publish, reruns and single-target runs included, must build once.
    met: releaseBoot.every((run) => run.nix!.builds === 1),
    samples: { "release-boot": builds },
  };
}

// ---------------------------------------------------------------------------------------------
// The JSON
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
    forgejo: { server: string; pid: number; benchPid: number; url: string };
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
        "warm: the files are read once before the hash rounds; every publish reads the same store files; the cold-rerun runs alone find the images evicted, and they are read back in after it",
      forgejo: {
        server: "bench/forgejo_server.ts",
        pid: bench.forgejo.pid,
        benchPid: Deno.pid,
        url: bench.forgejo.url,
      },
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

// ---------------------------------------------------------------------------------------------

try {
  await main();
} catch (error) {
  const known = error instanceof UsageError || error instanceof BenchError;
  log(`bench: ${known ? (error as Error).message : (error as Error)?.stack ?? error}`);
  Deno.exit(error instanceof UsageError ? 2 : 1);
}

#!/usr/bin/env -S deno run --allow-read --allow-write --allow-run --allow-env --allow-net --allow-sys
/**
 * release-boot: build a flake's NixOS boot images and publish them as a verified Forgejo
 * release (or stage the same bundle locally when no server is configured).
 *
 * The runbook this replaces, in order (see main()):
 *   1. read flags and environment; refuse bad input before any work
 *   2. check the Forgejo server, repository and token (when publishing)
 *   3. read the flake: its targets and locked inputs
 *   4. nix build every target in one call
 *   5. collect the build products and name them as release assets
 *   6. hash them; write SHA256SUMS and manifest.json
 *   7. stage locally, or: draft release -> upload what is missing -> checksums -> publish
 *
 * `release-boot fetch` is the way back: a published release, verified, laid out for PXE.
 */
import { Buffer } from "node:buffer";
import { createHash } from "node:crypto";
import { createReadStream, createWriteStream } from "node:fs";
import * as fs from "node:fs/promises";
import * as path from "node:path";
import process from "node:process";
import { Readable } from "node:stream";
import { pipeline } from "node:stream/promises";
import { Worker } from "node:worker_threads";
import { Agent, request } from "undici";
import * as v from "valibot";
import { $, minimist } from "zx";
import {
  APIErrorSchema,
  type Attachment,
  AttachmentListSchema,
  AttachmentSchema,
  type CreateReleaseOption,
  type EditReleaseOption,
  type Release,
  ReleaseListSchema,
  ReleaseSchema,
  type Repository,
  RepositorySchema,
  ServerVersionSchema,
  type Tag,
  TagSchema,
} from "../types/forgejo.ts";
import {
  ASSET_NAME,
  type FlakeInput,
  type Manifest,
  type ManifestAsset,
  ManifestSchema,
} from "../types/manifest.ts";
import {
  AttrNamesSchema,
  type BuildResult,
  BuildResultsSchema,
  type FlakeMetadata,
  FlakeMetadataSchema,
  OutPathsSchema,
} from "../types/nix.ts";

const NIX_FEATURES = ["--extra-experimental-features", "nix-command flakes"];
// Never change the operator's flake: an unlocked input is locked in memory, not on disk.
// (Nix takes this flag only after the subcommand.)
const KEEP_LOCK = "--no-write-lock-file";
const SUMS_NAME = "SHA256SUMS";
const MANIFEST_NAME = "manifest.json";
const INDEX_NAMES = new Set([SUMS_NAME, MANIFEST_NAME]);
const DEFAULT_MIRRORS = "https://codeberg.org";
const READ_SIZE = 1 << 20;
const MAX_HASH_WORKERS = 4;

// ---------------------------------------------------------------------------------------------
// The runbook
// ---------------------------------------------------------------------------------------------

async function main(argv: string[], env: Env): Promise<void> {
  if (argv.includes("--help") || argv.includes("-h")) return printHelp();
  hideSecretsFromChildren(env);
  const options = await readOptions(argv, env);

  if (options.command === "fetch") {
    // A mirror serves public files; the primary server's token has no business there.
    const token = mirrorOf(options.server!, options.mirrors) ? undefined : readToken(env);
    return await fetchForBoot(connectForgejo(options, token), options);
  }
  const forgejo = options.publish && !options.dryRun
    ? connectForgejo(refuseMirror(options), requireToken(options, env))
    : undefined;
  const site = forgejo && await step("Check Forgejo", () => checkForgejo(forgejo));
  if (forgejo && options.finalize) return await finalizeRelease(forgejo, options);

  const flake = await step("Read the flake", () => readFlake(options));
  if (forgejo) refuseUntrustedFlake(flake, options);
  const builds = await step("Build", () => buildTargets(options));
  const products = await collectProducts(builds);
  const hashed = await step("Hash", () => hashProducts(products));
  const assets = await pointIpxeAtRelease(hashed, downloadBase(options, site));
  const bundle = bundleRelease(assets, describeRelease(options, flake, assets));

  if (options.dryRun) return printPlan(bundle, options);
  if (!forgejo) return await stageLocally(bundle, options);

  await step("Check the tag", () => refuseTagOnOtherCommit(forgejo, options));
  const draft = await step(
    "Find or create the release",
    () => findOrCreateRelease(forgejo, options, bundle),
  );
  const recorded = await readRecordedSums(forgejo, draft);
  const plan = planUploads(bundle.files, draft.assets, recorded, draft.draft, options.replace);
  refuseConflicts(plan, draft, options);
  await step("Upload", () => uploadPlanned(forgejo, draft, plan));
  const indexed = await step(
    "Write checksums",
    () => writeIndex(forgejo, draft.id, bundle, options),
  );
  const release = await step("Publish", () => publishWhenComplete(forgejo, indexed, options));
  await reportRelease(release, bundle, env);
}

// ---------------------------------------------------------------------------------------------
// Errors: one failure model. Every message is one sentence that names the thing and the fix.
// ---------------------------------------------------------------------------------------------

/** Bad flags or environment: exit 2. */
export class UsageError extends Error {}
/** The release could not be made as asked: exit 1, nothing half-done visible. */
export class ReleaseError extends Error {}

// ---------------------------------------------------------------------------------------------
// 1. Flags and environment
// ---------------------------------------------------------------------------------------------

type Env = Record<string, string | undefined>;

export interface Options {
  /** "release" builds and publishes (or stages); "fetch" downloads a release for booting. */
  command: "release" | "fetch";
  flake: string;
  targets: string[];
  system: string;
  tag: string;
  commit: string;
  server?: string;
  repo?: string;
  out: string;
  dryRun: boolean;
  draft: boolean;
  prerelease: boolean;
  replace: boolean;
  finalize: boolean;
  allowDirty: boolean;
  timeoutSeconds: number;
  mirrors: string[];
  /** True when a server is configured: the bundle goes to Forgejo instead of --out. */
  publish: boolean;
  ciRun?: string;
}

const STRING_FLAGS = [
  "flake",
  "targets",
  "system",
  "tag",
  "commit",
  "server",
  "repo",
  "out",
  "timeout",
  "mirrors",
] as const;
const BOOLEAN_FLAGS = [
  "dry-run",
  "draft",
  "prerelease",
  "replace",
  "finalize",
  "allow-dirty",
] as const;

const HELP = `release-boot: build a flake's NixOS boot images and publish them as a Forgejo release.

Usage:
  deno task release [flags]            (same as ./scripts/release-boot.ts [flags])
  deno task release fetch --server URL --repo OWNER/NAME --tag TAG|latest --out DIR
                    [--targets netboot] [--system x86_64-linux]

With no server configured (no --server, no GITHUB_SERVER_URL) the release is staged in
--out: every asset, SHA256SUMS and manifest.json, exactly as it would be published.

Flags:
  --flake REF        flake to build (default "."); target N builds REF#packages.<system>.N
  --targets LIST     comma-separated target names (default "netboot,iso")
  --system SYSTEM    nix system of the targets (default "x86_64-linux")
  --tag TAG          release tag; default GITHUB_REF_NAME when GITHUB_REF_TYPE=tag, else
                     "boot-dev-<first 12 hex of the commit>" (always a pre-release)
  --commit SHA       full commit SHA the tag must point at; default GITHUB_SHA, else the
                     output of git rev-parse HEAD
  --server URL       Forgejo base URL (https; http only for localhost); default
                     GITHUB_SERVER_URL; with no server: stage locally
  --repo OWNER/NAME  repository to publish to; default GITHUB_REPOSITORY
  --out DIR          where a local stage goes (default dist/<tag>)
  --dry-run          build and hash, print the plan, write nothing anywhere
  --draft            upload everything but leave the release a draft (multi-job releases)
  --prerelease       mark the release a pre-release (boot-dev-* tags always are)
  --replace          when an asset differs from the one already in the release, store the
                     new bytes, then delete the old asset (never the other way round)
  --finalize         build nothing: check that every asset of the draft for the tag is
                     covered by its SHA256SUMS, then publish it (the last job of a matrix)
  --allow-dirty      publish even from a git checkout with uncommitted changes or a flake
                     whose inputs are not locked (recorded in manifest.json)
  --timeout SECONDS  give up on a request that makes no progress for this long (default 600)
  --mirrors LIST     comma-separated server URLs never published to and never sent the
                     token (default "${DEFAULT_MIRRORS}": the mirror only distributes)
  --help             this text

fetch downloads a published release's files for the targets (default netboot), checks
each against the release's SHA256SUMS before it gets its final name (a mismatch is deleted),
resumes an interrupted download, and writes netboot.ipxe to load kernel and initrd from the
same directory, so any HTTP server can serve DIR as it is. "latest" is the newest published
boot-v* release. A token is optional for a public repository.

Environment:
  FORGEJO_TOKEN      token with write access to the repository's releases
  GITHUB_TOKEN       used when FORGEJO_TOKEN is unset (the workflow token)
  GITHUB_SERVER_URL, GITHUB_REPOSITORY, GITHUB_SHA, GITHUB_REF_TYPE, GITHUB_REF_NAME,
  GITHUB_RUN_ID      defaults for the flags above, set by Forgejo Actions
  GITHUB_OUTPUT      receives release-url, tag and release-id
  GITHUB_STEP_SUMMARY receives a table of the assets

Examples:
  deno task release --flake path:./test/fixture --targets netboot,iso
  deno task release --dry-run --targets netboot
  FORGEJO_TOKEN=... deno task release --server https://git.example.org --repo ops/runners \\
      --tag boot-v1.2.0
  deno task release --targets netboot --draft --tag boot-v1.2.0   # one job of a matrix
  deno task release --finalize --tag boot-v1.2.0                   # the job after it
  deno task release fetch --server https://git.example.org --repo ops/runners \\
      --tag latest --out /srv/pxe

Reruns are safe: assets already in the release with the same size and checksum are skipped,
an interrupted run leaves a draft that the next run completes, and a finished release is
left untouched. stdout carries only the release URL (or, staged, the directory).

Exit status: 0 done, 1 failed (nothing half-done is visible), 2 bad usage.`;

export function printHelp(): void {
  console.log(HELP);
}

/** Git's check-ref-format rules, as they apply to a tag name. */
export function tagProblem(tag: string): string | undefined {
  if (tag === "") return "it is empty";
  // deno-lint-ignore no-control-regex
  if (/[\x00-\x20\x7f]/.test(tag)) return "it contains a space or a control character";
  if (/[~^:?*[\\]/.test(tag)) return "it contains one of ~ ^ : ? * [ \\";
  if (tag.includes("..")) return 'it contains ".."';
  if (tag.includes("@{")) return 'it contains "@{"';
  if (tag === "@") return 'it is "@"';
  if (tag.startsWith("-")) return 'it starts with "-"';
  if (tag.startsWith("/") || tag.endsWith("/") || tag.includes("//")) {
    return "it has an empty path component";
  }
  if (tag.endsWith(".")) return 'it ends with "."';
  for (const part of tag.split("/")) {
    if (part.startsWith(".")) return 'a component starts with "."';
    if (part.endsWith(".lock")) return 'a component ends with ".lock"';
  }
  return undefined;
}

const TagFlagSchema = v.pipe(
  v.string(),
  v.rawCheck(({ dataset, addIssue }) => {
    if (!dataset.typed) return;
    const problem = tagProblem(dataset.value);
    if (problem) addIssue({ message: `${problem} (git's tag rules); use e.g. boot-v1.2.0` });
  }),
);
const TargetsFlagSchema = v.pipe(
  v.string(),
  v.transform((list) => list.split(",").map((name) => name.trim())),
  v.check(
    (names) => names.every((name) => /^[A-Za-z_][A-Za-z0-9_'-]*$/.test(name)),
    "target names are nix attribute names separated by commas, e.g. netboot,iso",
  ),
  v.check(
    (names) => new Set(names).size === names.length,
    "a target is named twice",
  ),
);
const SystemFlagSchema = v.pipe(
  v.string(),
  v.regex(/^[a-z0-9_]+-[a-z0-9_]+$/, "a nix system looks like x86_64-linux or aarch64-linux"),
);
const CommitFlagSchema = v.pipe(
  v.string(),
  v.transform((sha) => sha.toLowerCase()),
  v.regex(/^([0-9a-f]{40}|[0-9a-f]{64})$/, "a commit is the full 40 (or 64) hex digit SHA"),
);
const RepoFlagSchema = v.pipe(
  v.string(),
  v.regex(/^[A-Za-z0-9_.-]+\/[A-Za-z0-9_.-]+$/, "a repository is written OWNER/NAME"),
);
const ServerFlagSchema = v.pipe(
  v.string(),
  v.rawTransform(({ dataset, addIssue, NEVER }) => {
    const problem = serverProblem(dataset.value);
    if (problem) {
      addIssue({ message: problem });
      return NEVER;
    }
    return dataset.value.replace(/\/+$/, "");
  }),
);
const FlakeFlagSchema = v.pipe(
  v.string(),
  v.minLength(1, "it is empty"),
  v.check((ref) => !ref.includes("#"), "give the flake without #: targets are chosen by --targets"),
);
const TimeoutFlagSchema = v.pipe(
  v.string(),
  v.transform(Number),
  v.number("it is not a number of seconds"),
  v.integer("it is not a whole number of seconds"),
  v.minValue(1, "it must be at least 1 second"),
);

export function serverProblem(text: string): string | undefined {
  let url: URL;
  try {
    url = new URL(text);
  } catch {
    return "it is not a URL; give the Forgejo base URL, e.g. https://git.example.org";
  }
  const local = ["localhost", "127.0.0.1", "[::1]"].includes(url.hostname);
  if (url.protocol !== "https:" && !(url.protocol === "http:" && local)) {
    return "use https (plain http only for localhost)";
  }
  if (url.username || url.password) return "it must not carry credentials; use FORGEJO_TOKEN";
  if (url.search || url.hash) return "it must not have a query or fragment";
  return undefined;
}

/** Reads one flag through its schema; a failure is a UsageError naming the flag. */
function parseFlag<T>(
  flag: string,
  schema: v.GenericSchema<string, T>,
  value: string,
  origin = `--${flag}`,
): T {
  const result = v.safeParse(schema, value);
  if (result.success) return result.output;
  throw new UsageError(`bad ${origin} ${JSON.stringify(value)}: ${result.issues[0].message}`);
}

/** Flags and environment become Options, or a UsageError before any work is done. */
export async function readOptions(argv: string[], env: Env): Promise<Options> {
  const command = argv[0] === "fetch" ? "fetch" : "release";
  const args = minimist(command === "fetch" ? argv.slice(1) : argv, {
    string: [...STRING_FLAGS],
    boolean: [...BOOLEAN_FLAGS],
    unknown: (arg: string) => {
      throw new UsageError(
        arg.startsWith("-")
          ? `unknown flag ${arg}; see --help for the flags release-boot takes`
          : `unexpected argument ${JSON.stringify(arg)}; flags only, see --help`,
      );
    },
  });
  const flag = (name: string): string | undefined => {
    const value = args[name];
    if (Array.isArray(value)) throw new UsageError(`--${name} is given more than once`);
    if (value === "") throw new UsageError(`--${name} needs a value; see --help`);
    return value;
  };
  const server = flag("server") ?? (env.GITHUB_SERVER_URL || undefined);
  const commit = flag("commit") ?? (env.GITHUB_SHA || undefined);
  const options: Options = {
    command,
    flake: parseFlag("flake", FlakeFlagSchema, flag("flake") ?? "."),
    targets: parseFlag(
      "targets",
      TargetsFlagSchema,
      flag("targets") ?? (command === "fetch" ? "netboot" : "netboot,iso"),
    ),
    system: parseFlag("system", SystemFlagSchema, flag("system") ?? "x86_64-linux"),
    server: server === undefined ? undefined : parseFlag(
      "server",
      ServerFlagSchema,
      server,
      flag("server") ? "--server" : "GITHUB_SERVER_URL",
    ),
    repo: undefined,
    commit: "",
    tag: "",
    out: "",
    dryRun: Boolean(args["dry-run"]),
    draft: Boolean(args.draft),
    prerelease: Boolean(args.prerelease),
    replace: Boolean(args.replace),
    finalize: Boolean(args.finalize),
    allowDirty: Boolean(args["allow-dirty"]),
    timeoutSeconds: parseFlag("timeout", TimeoutFlagSchema, flag("timeout") ?? "600"),
    mirrors: (flag("mirrors") ?? DEFAULT_MIRRORS).split(",").map((url) =>
      url.trim().replace(/\/+$/, "")
    ),
    publish: false,
  };
  const repo = flag("repo") ?? (env.GITHUB_REPOSITORY || undefined);
  if (repo !== undefined) {
    options.repo = parseFlag(
      "repo",
      RepoFlagSchema,
      repo,
      flag("repo") ? "--repo" : "GITHUB_REPOSITORY",
    );
  }
  const tagFlag = flag("tag") ??
    (env.GITHUB_REF_TYPE === "tag" && env.GITHUB_REF_NAME ? env.GITHUB_REF_NAME : undefined);
  const outFlag = flag("out");
  if (command === "fetch") return fetchOptions(options, args, tagFlag, outFlag);

  options.publish = options.server !== undefined;
  if (options.publish && !options.repo) {
    throw new UsageError(
      "no repository to publish to: pass --repo OWNER/NAME (or set GITHUB_REPOSITORY)",
    );
  }
  if (options.finalize && !options.publish) {
    throw new UsageError(
      "--finalize publishes a draft on Forgejo: pass --server (or set GITHUB_SERVER_URL)",
    );
  }
  if (options.finalize && options.draft) {
    throw new UsageError("--finalize publishes the draft; it cannot be combined with --draft");
  }
  options.commit = parseFlag(
    "commit",
    CommitFlagSchema,
    commit ?? await gitHead(),
    commit ? "--commit" : "commit",
  );
  options.tag = tagFlag === undefined
    ? `boot-dev-${options.commit.slice(0, 12)}`
    : parseFlag("tag", TagFlagSchema, tagFlag, flag("tag") ? "--tag" : "GITHUB_REF_NAME");
  options.out = outFlag ?? path.join("dist", options.tag);
  if (options.tag.startsWith("boot-dev-")) options.prerelease = true;
  if (env.GITHUB_SERVER_URL && env.GITHUB_REPOSITORY && env.GITHUB_RUN_ID) {
    options.ciRun = `${
      env.GITHUB_SERVER_URL.replace(/\/+$/, "")
    }/${env.GITHUB_REPOSITORY}/actions/runs/${env.GITHUB_RUN_ID}`;
  }
  return options;
}

/** Flags that shape a release; fetch only reads one. */
const RELEASE_ONLY_FLAGS = [
  "flake",
  "commit",
  ...BOOLEAN_FLAGS,
];

/** `fetch` reads a published release: it needs where, which tag, and where to put it. */
function fetchOptions(
  options: Options,
  args: Record<string, unknown>,
  tag: string | undefined,
  out: string | undefined,
): Options {
  const misplaced = RELEASE_ONLY_FLAGS.find((name) =>
    args[name] !== undefined && args[name] !== false
  );
  if (misplaced) {
    throw new UsageError(`--${misplaced} is for making a release, not for fetch; see --help`);
  }
  if (!options.server) throw new UsageError("fetch needs --server URL (or GITHUB_SERVER_URL)");
  if (!options.repo) throw new UsageError("fetch needs --repo OWNER/NAME (or GITHUB_REPOSITORY)");
  if (!tag) {
    throw new UsageError("fetch needs --tag TAG, or --tag latest for the newest boot-v* release");
  }
  if (!out) {
    throw new UsageError("fetch needs --out DIR: the directory to lay the boot files out in");
  }
  options.tag = tag === "latest" ? tag : parseFlag("tag", TagFlagSchema, tag);
  options.out = out;
  return options;
}

async function gitHead(): Promise<string> {
  const head = await $`git rev-parse HEAD`.quiet().nothrow();
  if (head.exitCode !== 0) {
    throw new UsageError(
      "no commit to release: this is not a git checkout and GITHUB_SHA is unset; pass --commit SHA",
    );
  }
  return head.stdout.trim();
}

/** Child processes (nix, git) never see a token: zx passes $.env to them. */
function hideSecretsFromChildren(env: Env): void {
  $.env = Object.fromEntries(
    Object.entries(env).filter(([name]) => !/TOKEN|SECRET|PASSWORD/i.test(name)),
  );
}

// ---------------------------------------------------------------------------------------------
// Logging: progress on stderr, results on stdout, CI sections when in CI.
// ---------------------------------------------------------------------------------------------

const inCI = Deno.env.get("CI") === "true" || Deno.env.get("GITHUB_ACTIONS") === "true";
let secrets: string[] = [];

function redact(text: string): string {
  return secrets.reduce((out, secret) => out.replaceAll(secret, "***"), text);
}

function log(message: string): void {
  console.error(redact(message));
}

async function step<T>(title: string, work: () => Promise<T>): Promise<T> {
  log(inCI ? `::group::${title}` : `==> ${title}`);
  try {
    return await work();
  } finally {
    if (inCI) log("::endgroup::");
  }
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

// ---------------------------------------------------------------------------------------------
// 3. The flake: targets, inputs, provenance
// ---------------------------------------------------------------------------------------------

export interface FlakeInfo {
  metadata: FlakeMetadata;
  /** False when flake.lock is missing or stale (nix would have to lock inputs). */
  locked: boolean;
  dirty: boolean;
  nixVersion: string;
}

function installable(options: Pick<Options, "flake" | "system">, target?: string): string {
  const attr = `packages.${options.system}`;
  return `${options.flake}#${target ? `${attr}.${target}` : attr}`;
}

async function nixJson<T>(
  schema: v.GenericSchema<unknown, T>,
  args: string[],
  what: string,
): Promise<T> {
  const result = await $`nix ${NIX_FEATURES} ${args}`.quiet().nothrow();
  if (result.exitCode !== 0) {
    throw new ReleaseError(`${what} failed: ${nixErrorTail(result.stderr, 1)}`);
  }
  return parseJson(schema, result.stdout, `nix ${args[0]} ${args[1] ?? ""}`.trim());
}

function parseJson<T>(schema: v.GenericSchema<unknown, T>, text: string, source: string): T {
  let data: unknown;
  try {
    data = JSON.parse(text);
  } catch {
    throw new ReleaseError(
      `${source}: not JSON: ${JSON.stringify(text.slice(0, 120))}`,
    );
  }
  const result = v.safeParse(schema, data);
  if (!result.success) {
    throw new ReleaseError(
      `${source}: unexpected JSON (${v.summarize(result.issues).split("\n")[0]})`,
    );
  }
  return result.output;
}

/** The last error lines nix printed, without its progress noise. */
export function nixErrorTail(stderr: string, lines = 12): string {
  const all = stderr.split("\n").map((line) => line.trimEnd()).filter(Boolean);
  const start = all.findLastIndex((line) => line.startsWith("error:"));
  const tail = start >= 0 ? all.slice(start) : all;
  return tail.slice(0, lines).join("\n").replace(/^error: /, "");
}

async function readFlake(options: Options): Promise<FlakeInfo> {
  const available = await listTargets(options);
  const unknown = options.targets.filter((target) => !available.includes(target));
  if (unknown.length > 0) {
    throw new UsageError(
      `unknown target ${unknown.join(", ")} in --targets: the flake ${options.flake} has ${
        available.length ? available.join(", ") : "no packages"
      } for ${options.system}`,
    );
  }
  const version = await $`nix --version`.quiet();
  const nixVersion = version.stdout.trim().match(/(\d+\.\d+\S*)/)?.[1] ?? version.stdout.trim();
  // Without KEEP_LOCK: nix then fails, instead of warning, when flake.lock is not complete.
  const strict =
    await $`nix ${NIX_FEATURES} flake metadata --json --no-update-lock-file ${options.flake}`
      .quiet().nothrow();
  const locked = strict.exitCode === 0;
  if (!locked && !/requires lock file changes/.test(strict.stderr)) {
    throw new ReleaseError(`cannot read the flake's metadata: ${nixErrorTail(strict.stderr, 1)}`);
  }
  const metadata = locked
    ? parseJson(FlakeMetadataSchema, strict.stdout, "nix flake metadata")
    : await nixJson(
      FlakeMetadataSchema,
      ["flake", "metadata", KEEP_LOCK, "--json", options.flake],
      "reading the flake's metadata",
    );
  const dirty = metadata.locked.type === "git" && !metadata.revision;
  return { metadata, locked, dirty, nixVersion };
}

async function listTargets(options: Options): Promise<string[]> {
  const result = await $`nix ${NIX_FEATURES} eval ${KEEP_LOCK} --json ${
    installable(options)
  } --apply builtins.attrNames`
    .quiet().nothrow();
  if (result.exitCode === 0) return parseJson(AttrNamesSchema, result.stdout, "nix eval");
  if (/does not provide attribute/.test(result.stderr)) return [];
  throw new UsageError(`cannot read the flake ${options.flake}: ${nixErrorTail(result.stderr, 1)}`);
}

/** Publishing trusts only what can be rebuilt: locked inputs and a committed tree. */
function refuseUntrustedFlake(flake: FlakeInfo, options: Options): void {
  const revision = flake.metadata.revision;
  if (revision && revision !== options.commit) {
    throw new ReleaseError(
      `the flake is at commit ${revision} but the release is for ${options.commit}: check out ${options.commit} or pass --commit ${revision}`,
    );
  }
  if (options.allowDirty) return;
  if (!flake.locked) {
    throw new ReleaseError(
      `the flake ${options.flake} has inputs that flake.lock does not pin: run nix flake lock, commit flake.lock, and rerun (or pass --allow-dirty)`,
    );
  }
  if (flake.dirty) {
    throw new ReleaseError(
      `the flake ${options.flake} is a git checkout with uncommitted changes: commit them and rerun (or pass --allow-dirty)`,
    );
  }
  if (!flake.metadata.revision) {
    throw new ReleaseError(
      `the flake ${options.flake} is not a git checkout or a pinned revision, so nothing ties its files to commit ${options.commit}: publish from the repository (--flake .), or pass --allow-dirty`,
    );
  }
}

// ---------------------------------------------------------------------------------------------
// 4. Build
// ---------------------------------------------------------------------------------------------

export interface TargetBuild {
  target: string;
  system: string;
  drvPath: string;
  outPath: string;
}

/** What a build needs to know: `release` and `verify` both build this way. */
type BuildRequest = Pick<Options, "flake" | "system" | "targets">;

/** One nix build for every target: one evaluation, and nix builds them in parallel. */
async function buildTargets(options: BuildRequest): Promise<TargetBuild[]> {
  const installables = options.targets.map((target) => installable(options, target));
  const build = $`nix ${NIX_FEATURES} build ${KEEP_LOCK} --json --no-link ${installables}`.quiet()
    .nothrow();
  build.stderr.on("data", (chunk: Buffer) => process.stderr.write(chunk));
  const result = await build;
  if (result.exitCode !== 0) {
    const failed = await failedTargets(options, result.stderr);
    throw new ReleaseError(
      `nix build failed for target ${
        failed.join(", ")
      } (${options.system}); nothing was published:\n${nixErrorTail(result.stderr)}`,
    );
  }
  const results: BuildResult[] = parseJson(BuildResultsSchema, result.stdout, "nix build --json");
  return options.targets.map((target, index) => ({
    target,
    system: options.system,
    drvPath: results[index].drvPath,
    outPath: results[index].outputs.out,
  }));
}

/** Names the targets whose output is still missing after a failed build. */
async function failedTargets(options: BuildRequest, stderr: string): Promise<string[]> {
  const apply = `ps: builtins.mapAttrs (name: _: ps.\${name}.drvPath) (builtins.fromJSON ''${
    JSON.stringify(Object.fromEntries(options.targets.map((t) => [t, null])))
  }'')`;
  const drvs = await $`nix ${NIX_FEATURES} eval ${KEEP_LOCK} --json ${
    installable(options)
  } --apply ${apply}`
    .quiet().nothrow();
  if (drvs.exitCode !== 0) return options.targets;
  const byTarget = parseJson(OutPathsSchema, drvs.stdout, "nix eval");
  const named = options.targets.filter((target) => stderr.includes(byTarget[target]));
  return named.length > 0 ? named : options.targets;
}

// ---------------------------------------------------------------------------------------------
// 5. Build products and asset names
// ---------------------------------------------------------------------------------------------

export interface Product {
  name: string;
  path: string;
  target: string;
  system: string;
  drvPath: string;
}

/** `file <type> <path>` lines of nix-support/hydra-build-products; other kinds are reports. */
export function parseHydraBuildProducts(text: string): string[] {
  return text.split("\n")
    .map((line) => line.trim().match(/^file\s+\S+\s+("?)(\/\S.*?)\1$/))
    .filter((match): match is RegExpMatchArray => match !== null)
    .map((match) => match[2]);
}

const KNOWN_EXTENSIONS = [
  "img.zst",
  "img.xz",
  "img.gz",
  "tar.zst",
  "tar.xz",
  "tar.gz",
  "iso",
  "img",
  "ipxe",
  "efi",
  "qcow2",
  "raw",
  "vhd",
  "vhdx",
  "tar",
  "zst",
  "xz",
  "gz",
];

/**
 * `<target>-<system>.<suffix>`: suffix is the file's known extension (an ISO's name carries
 * the NixOS version, which must not leak into a stable asset name), else the file's name.
 */
export function assetName(target: string, system: string, file: string): string {
  const base = path.basename(file);
  const extension = KNOWN_EXTENSIONS.find((ext) => base.toLowerCase().endsWith(`.${ext}`));
  const suffix = extension ? base.slice(base.length - extension.length) : base;
  return `${target}-${system}.${suffix}`;
}

async function collectProducts(builds: TargetBuild[]): Promise<Product[]> {
  const products: Product[] = [];
  for (const build of builds) {
    for (const file of await productFiles(build.outPath)) {
      const name = assetName(build.target, build.system, file);
      products.push({
        // The plain .ipxe name goes to the script that boots from the release.
        name: name.endsWith(".ipxe") ? builtScriptName(name) : name,
        path: file,
        target: build.target,
        system: build.system,
        drvPath: build.drvPath,
      });
    }
  }
  refuseBadNames(products);
  return products;
}

/** The files a build output publishes, with links resolved to the real store files. */
async function productFiles(outPath: string): Promise<string[]> {
  const listing = await fs.readFile(
    path.join(outPath, "nix-support", "hydra-build-products"),
    "utf8",
  )
    .catch(() => undefined);
  const listed = listing === undefined
    ? await regularFiles(outPath)
    : parseHydraBuildProducts(listing);
  const files = await Promise.all(listed.map((file) => fs.realpath(file)));
  if (files.length === 0) {
    throw new ReleaseError(`the build output ${outPath} has no files to publish`);
  }
  return files;
}

async function regularFiles(root: string): Promise<string[]> {
  const stat = await fs.stat(root);
  if (stat.isFile()) return [root];
  const found: string[] = [];
  for (const entry of (await fs.readdir(root)).sort()) {
    if (entry === "nix-support") continue;
    const full = path.join(root, entry);
    const entryStat = await fs.stat(full);
    if (entryStat.isDirectory()) found.push(...await regularFiles(full));
    else if (entryStat.isFile()) found.push(full);
  }
  return found;
}

function refuseBadNames(products: Product[]): void {
  const seen = new Map<string, string>();
  for (const product of products) {
    if (!ASSET_NAME.test(product.name)) {
      throw new ReleaseError(
        `${product.path} would be published as ${
          JSON.stringify(product.name)
        }, which is not a plain file name: rename it in the flake`,
      );
    }
    const earlier = seen.get(product.name);
    if (earlier) {
      throw new ReleaseError(
        `two files of target ${product.target} would both be published as ${product.name} (${earlier} and ${product.path}): give them different extensions in the flake`,
      );
    }
    seen.set(product.name, product.path);
  }
}

// ---------------------------------------------------------------------------------------------
// 6. Hashes, SHA256SUMS, manifest.json
// ---------------------------------------------------------------------------------------------

export interface FileAsset extends Product {
  size: number;
  sha256: string;
  /** Content made by release-boot from `path` (a rewritten iPXE script) instead of the file. */
  bytes?: Uint8Array;
}

/** An asset as published: a file on disk, or the bytes of SHA256SUMS / manifest.json. */
export interface BundleAsset {
  name: string;
  size: number;
  sha256: string;
  path?: string;
  bytes?: Uint8Array;
}

export interface Bundle {
  files: BundleAsset[];
  manifest: Manifest;
  sums: BundleAsset;
  manifestAsset: BundleAsset;
}

// Hashing runs in worker threads: node:crypto's update() is synchronous, so files hash in
// parallel only on separate threads. 1 MiB reads hash ~1.5x faster than the 64 KiB default.
const HASH_WORKER = `
const { parentPort, workerData } = require("node:worker_threads");
const { createHash } = require("node:crypto");
const { openSync, readSync, closeSync } = require("node:fs");
const hash = createHash("sha256");
const buffer = Buffer.allocUnsafe(workerData.readSize);
const fd = openSync(workerData.path, "r");
let size = 0;
for (let n; (n = readSync(fd, buffer, 0, buffer.length, null)) > 0; size += n) {
  hash.update(buffer.subarray(0, n));
}
closeSync(fd);
parentPort.postMessage({ sha256: hash.digest("hex"), size });
`;

export function hashFile(file: string): Promise<{ sha256: string; size: number }> {
  return new Promise((resolve, reject) => {
    const worker = new Worker(HASH_WORKER, {
      eval: true,
      workerData: { path: file, readSize: READ_SIZE },
    });
    worker.once("message", resolve);
    worker.once("error", reject);
  });
}

/** Hashes every file, as many at once as there are cores. */
export async function hashFiles(files: string[]): Promise<{ sha256: string; size: number }[]> {
  const results = new Array<{ sha256: string; size: number }>(files.length);
  let next = 0;
  // Each worker costs ~15 MiB of RSS: four keep a large runner under 200 MiB, and hashing
  // four files at once already outruns the disk and the upload.
  const lanes = Math.max(
    1,
    Math.min(navigator.hardwareConcurrency || 2, files.length, MAX_HASH_WORKERS),
  );
  await Promise.all(Array.from({ length: lanes }, async () => {
    while (next < files.length) {
      const index = next++;
      results[index] = await hashFile(files[index]);
    }
  }));
  return results;
}

async function hashProducts(products: Product[]): Promise<FileAsset[]> {
  const hashes = await hashFiles(products.map((product) => product.path));
  const assets = products.map((product, index) => ({ ...product, ...hashes[index] }));
  for (const asset of assets) log(`${asset.sha256}  ${asset.name} (${formatBytes(asset.size)})`);
  return assets;
}

/** `sha256sum -c` format, sorted by name so the same set always gives the same file. */
export function renderSums(assets: { name: string; sha256: string }[]): string {
  return [...assets]
    .sort((a, b) => a.name < b.name ? -1 : a.name > b.name ? 1 : 0)
    .map((asset) => `${asset.sha256}  ${asset.name}\n`)
    .join("");
}

/** Parses SHA256SUMS text (as sha256sum writes it, text or binary mode) into name -> hash. */
export function parseSums(text: string): Map<string, string> {
  const sums = new Map<string, string>();
  for (const line of text.split("\n")) {
    const match = line.match(/^([0-9a-f]{64}) [ *](.+)$/);
    if (match) sums.set(match[2], match[1]);
  }
  return sums;
}

function flakeInputs(metadata: FlakeMetadata): Record<string, FlakeInput> {
  const nodes = metadata.locks.nodes;
  const rootInputs = nodes[metadata.locks.root]?.inputs ?? {};
  const inputs: Record<string, FlakeInput> = {};
  for (const [name, ref] of Object.entries(rootInputs)) {
    const node = typeof ref === "string" ? nodes[ref] : undefined;
    const locked = node?.locked;
    if (!locked) continue;
    const url = locked.owner && locked.repo
      ? `${locked.type}:${locked.owner}/${locked.repo}`
      : locked.url ?? locked.path;
    inputs[name] = {
      type: locked.type,
      url,
      rev: locked.rev,
      narHash: locked.narHash,
      lastModified: locked.lastModified,
    };
  }
  return inputs;
}

export function describeRelease(options: Options, flake: FlakeInfo, assets: FileAsset[]): Manifest {
  return {
    schema: 1,
    tag: options.tag,
    commit: options.commit,
    flake: {
      ref: options.flake,
      url: flake.metadata.url,
      revision: flake.metadata.revision,
      narHash: flake.metadata.locked.narHash,
      locked: flake.locked,
      dirty: flake.dirty,
      inputs: flakeInputs(flake.metadata),
    },
    nixVersion: flake.nixVersion,
    ciRun: options.ciRun,
    createdAt: new Date().toISOString(),
    assets: assets.map((asset) => ({
      name: asset.name,
      size: asset.size,
      sha256: asset.sha256,
      target: asset.target,
      system: asset.system,
      storePath: asset.path,
      drvPath: asset.drvPath,
    })),
  };
}

function bytesAsset(name: string, text: string): BundleAsset {
  const bytes = new TextEncoder().encode(text);
  return { name, bytes, size: bytes.length, sha256: sha256Hex(bytes) };
}

function sha256Hex(bytes: Uint8Array): string {
  return createHash("sha256").update(bytes).digest("hex");
}

export function bundleRelease(assets: FileAsset[], manifest: Manifest): Bundle {
  return {
    files: assets.map((asset) => ({
      name: asset.name,
      size: asset.size,
      sha256: asset.sha256,
      ...(asset.bytes ? { bytes: asset.bytes } : { path: asset.path }),
    })),
    manifest,
    sums: bytesAsset(SUMS_NAME, renderSums(manifest.assets)),
    manifestAsset: bytesAsset(MANIFEST_NAME, `${JSON.stringify(manifest, null, 2)}\n`),
  };
}

// ---------------------------------------------------------------------------------------------
// 6b. iPXE scripts that boot straight from the release
// ---------------------------------------------------------------------------------------------

/** iPXE commands whose first argument (after options) is an image URI. */
const IPXE_FETCHING = new Set(["kernel", "initrd", "imgfetch", "module", "chain", "imgexec"]);
/** iPXE image options that take a value. */
const IPXE_VALUE_OPTIONS = new Set(["-n", "--name", "-t", "--timeout"]);

/**
 * Points an iPXE script's image URIs at new locations. `locate` maps a file name the script
 * fetches (e.g. "bzImage") to its new URI, or undefined to leave it. iPXE names a fetched
 * image after its URI's last segment, so the kernel's `initrd=` argument follows the rename.
 * Everything else (init=, ${cmdline}, comments) stays as built.
 */
export function rewriteIpxe(script: string, locate: (file: string) => string | undefined): string {
  return script.split("\n").map((line) => {
    const indent = line.match(/^\s*/)![0];
    const words = line.trim().split(/\s+/);
    if (!IPXE_FETCHING.has(words[0])) return line;
    let at = 1;
    while (at < words.length && words[at].startsWith("-")) {
      at += IPXE_VALUE_OPTIONS.has(words[at]) ? 2 : 1;
    }
    if (at >= words.length) return line;
    words[at] = locate(words[at]) ?? words[at];
    for (let arg = at + 1; arg < words.length; arg++) {
      const initrd = words[arg].match(/^initrd=(.+)$/);
      const moved = initrd && locate(initrd[1]);
      if (moved) words[arg] = `initrd=${moved.split("/").pop()}`;
    }
    return indent + words.join(" ");
  }).join("\n");
}

/** Where the release's files will be downloadable from; relative for a local stage. */
function downloadBase(options: Options, site: Repository | undefined): string {
  if (!options.publish) return "";
  const repoUrl = site?.html_url.replace(/\/+$/, "") ?? `${options.server}/${options.repo}`;
  return `${repoUrl}/releases/download/${encodeURIComponent(options.tag)}/`;
}

/** Built iPXE script of a target: `<target>-<system>.built.ipxe`, kept as nix built it. */
export function builtScriptName(name: string): string {
  return name.replace(/\.ipxe$/, ".built.ipxe");
}

/**
 * For every built iPXE script, publishes a copy under the stable `<target>-<system>.ipxe`
 * name whose kernel and initrd come from `base` (the release's download URLs), and keeps
 * the script as built under `<target>-<system>.built.ipxe`.
 */
async function pointIpxeAtRelease(assets: FileAsset[], base: string): Promise<FileAsset[]> {
  const result: FileAsset[] = [];
  for (const built of assets) {
    result.push(built);
    if (!built.name.endsWith(".built.ipxe")) continue;
    const siblings = assets.filter((a) => a.target === built.target && a.system === built.system);
    const locate = (file: string) => {
      const found = siblings.find((a) => a !== built && path.basename(a.path) === file);
      return found && `${base}${encodeURIComponent(found.name)}`;
    };
    const text = rewriteIpxe(await fs.readFile(built.path, "utf8"), locate);
    const bytes = new TextEncoder().encode(text);
    const script = {
      ...built,
      name: built.name.replace(/\.built\.ipxe$/, ".ipxe"),
      bytes,
      size: bytes.length,
      sha256: sha256Hex(bytes),
    };
    result.push(script);
    log(
      `${script.sha256}  ${script.name} (boots from ${base || "the directory it is served from"})`,
    );
  }
  return result;
}

// ---------------------------------------------------------------------------------------------
// 7a. Dry run and local stage
// ---------------------------------------------------------------------------------------------

function printPlan(bundle: Bundle, options: Options): void {
  const where = options.publish ? `${options.server}/${options.repo}` : options.out;
  console.log(`Plan for ${options.tag} (commit ${options.commit}) -> ${where}; nothing written:`);
  for (const asset of [...bundle.files, bundle.sums, bundle.manifestAsset]) {
    console.log(`  ${asset.sha256}  ${asset.name}  ${formatBytes(asset.size)}`);
  }
}

/** A stage replaces --out whole, so --out must be new, empty, or an earlier stage. */
async function refuseForeignDirectory(out: string): Promise<void> {
  const entries: string[] = await fs.readdir(out).catch(() => []);
  if (entries.length > 0 && !entries.includes(MANIFEST_NAME)) {
    throw new UsageError(
      `--out ${out} holds files that are not an earlier stage (no ${MANIFEST_NAME}), and a stage replaces it whole: choose a new or empty directory`,
    );
  }
}

/**
 * Writes the bundle next to its final place, then renames it in: a failure never leaves a
 * half-written --out, and a rerun replaces the earlier stage whole.
 */
async function stageLocally(bundle: Bundle, options: Options): Promise<void> {
  const out = path.resolve(options.out);
  await refuseForeignDirectory(out);
  await fs.mkdir(path.dirname(out), { recursive: true });
  const partial = await fs.mkdtemp(`${out}.partial-`);
  await fs.chmod(partial, 0o755);
  try {
    for (const asset of [...bundle.files, bundle.sums, bundle.manifestAsset]) {
      const target = path.join(partial, asset.name);
      if (asset.path) await fs.copyFile(asset.path, target);
      else await fs.writeFile(target, asset.bytes!);
      await fs.chmod(target, 0o644);
    }
    await fs.rm(out, { recursive: true, force: true });
    await fs.rename(partial, out);
  } catch (error) {
    await fs.rm(partial, { recursive: true, force: true });
    throw error;
  }
  log(`Staged ${bundle.files.length} assets, ${SUMS_NAME} and ${MANIFEST_NAME} in ${out}`);
  log(`Check them: (cd ${out} && sha256sum -c ${SUMS_NAME})`);
  log(
    `Publish them: FORGEJO_TOKEN=... deno task release --server https://FORGEJO --repo OWNER/NAME --tag ${options.tag} --commit ${options.commit} --flake ${options.flake} --targets ${
      options.targets.join(",")
    }`,
  );
  console.log(out);
}

// ---------------------------------------------------------------------------------------------
// 7b. Forgejo: one undici Agent, the token only ever sent to the server's own origin
// ---------------------------------------------------------------------------------------------

export interface Forgejo {
  server: string;
  origin: string;
  repo: string;
  /** Absent for anonymous downloads of a public repository. */
  token?: string;
  agent: Agent;
  timeoutMs: number;
}

/** The mirror-list entry that `server` falls under, compared as URLs, not as strings. */
export function mirrorOf(server: string, mirrors: string[]): string | undefined {
  const target = new URL(server);
  return mirrors.find((mirror) => {
    const url = URL.canParse(mirror) ? new URL(mirror) : undefined;
    if (!url || url.origin !== target.origin) return false;
    const base = url.pathname.replace(/\/+$/, "");
    return target.pathname === base || target.pathname.startsWith(`${base}/`);
  });
}

function refuseMirror(options: Options): Options {
  const mirror = mirrorOf(options.server!, options.mirrors);
  if (mirror) {
    throw new ReleaseError(
      `refusing to publish to ${options.server}: it is on the mirror list (${mirror}), which only distributes releases; publish to the primary Forgejo or change --mirrors`,
    );
  }
  return options;
}
function readToken(env: Env): string | undefined {
  return env.FORGEJO_TOKEN || env.GITHUB_TOKEN || undefined;
}

function requireToken(options: Options, env: Env): string {
  const token = readToken(env);
  if (!token) {
    throw new UsageError(
      "no token: set FORGEJO_TOKEN to a token that can write releases of " +
        `${options.repo} (in a workflow: FORGEJO_TOKEN: \${{ secrets.GITHUB_TOKEN }})`,
    );
  }
  return token;
}

function connectForgejo(options: Options, token: string | undefined): Forgejo {
  if (token) {
    // The mask command is the one line that must carry the token itself.
    if (inCI) console.error(`::add-mask::${token}`);
    secrets = [token];
  }
  const server = options.server!;
  const timeoutMs = options.timeoutSeconds * 1000;
  return {
    server,
    origin: new URL(server).origin,
    repo: options.repo!,
    token,
    timeoutMs,
    agent: new Agent({
      connect: { timeout: 30_000 },
      headersTimeout: timeoutMs,
      bodyTimeout: timeoutMs,
    }),
  };
}

interface Call {
  method: "GET" | "POST" | "PATCH" | "DELETE";
  /** Under /api/v1/repos/{owner}/{repo}, or absolute from the server root with `root`. */
  path: string;
  root?: boolean;
  query?: Record<string, string>;
  json?: unknown;
  /** Statuses the caller handles itself instead of them being errors. */
  expect?: number[];
}

interface Answer {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  text: string;
}

const RETRIES = 5;
const RETRYABLE_STATUS = new Set([429, 500, 502, 503, 504]);

class TransientError extends Error {
  constructor(message: string, readonly retryAfterMs?: number) {
    super(message);
  }
}

function apiUrl(forgejo: Forgejo, call: Pick<Call, "path" | "root" | "query">): URL {
  const base = call.root
    ? `${forgejo.server}/api/v1`
    : `${forgejo.server}/api/v1/repos/${forgejo.repo}`;
  const url = new URL(`${base}${call.path}`);
  for (const [key, value] of Object.entries(call.query ?? {})) url.searchParams.set(key, value);
  return url;
}

/** Headers for a request to `url`: the token goes only to the Forgejo origin. */
function headersFor(
  forgejo: Forgejo,
  url: URL,
  extra: Record<string, string> = {},
): Record<string, string> {
  const headers: Record<string, string> = { accept: "application/json", ...extra };
  if (forgejo.token && url.origin === forgejo.origin) {
    headers.authorization = `token ${forgejo.token}`;
  }
  return headers;
}

/** One API call with bounded retries on connection errors, 5xx and 429. */
async function api(forgejo: Forgejo, call: Call): Promise<Answer> {
  const url = apiUrl(forgejo, call);
  const what = `${call.method} ${url.pathname}`;
  return await withRetries(what, async () => {
    const body = call.json === undefined ? undefined : JSON.stringify(call.json);
    const response = await send(
      forgejo,
      url,
      call.method,
      body,
      body ? { "content-type": "application/json" } : {},
    );
    const answer = {
      status: response.statusCode,
      headers: response.headers,
      text: await response.body.text(),
    };
    throwIfTransient(answer, what);
    if (answer.status >= 300 && !(call.expect ?? []).includes(answer.status)) {
      throw new ReleaseError(explainStatus(forgejo, answer, what));
    }
    return answer;
  });
}

function send(
  forgejo: Forgejo,
  url: URL,
  method: string,
  body: string | Uint8Array | Readable | undefined,
  headers: Record<string, string>,
) {
  return request(url, {
    method: method as "GET",
    body,
    headers: headersFor(forgejo, url, headers),
    dispatcher: forgejo.agent,
  }).catch((error: Error & { code?: string }) => {
    throw new TransientError(`${error.code ?? error.name}: ${error.message}`);
  });
}

function throwIfTransient(answer: Answer, what: string): void {
  if (!RETRYABLE_STATUS.has(answer.status)) return;
  const said = serverMessage(answer.text);
  throw new TransientError(
    `Forgejo answered ${answer.status} for ${what}${said ? ` ("${said}")` : ""}`,
    retryAfterMs(answer.headers["retry-after"]),
  );
}

export function retryAfterMs(header: string | string[] | undefined): number | undefined {
  const value = Array.isArray(header) ? header[0] : header;
  if (!value) return undefined;
  const seconds = Number(value);
  const ms = Number.isFinite(seconds) ? seconds * 1000 : Date.parse(value) - Date.now();
  return Number.isFinite(ms) ? Math.min(Math.max(ms, 0), 120_000) : undefined;
}

async function withRetries<T>(what: string, attempt: (n: number) => Promise<T>): Promise<T> {
  for (let n = 1;; n++) {
    try {
      return await attempt(n);
    } catch (error) {
      if (!(error instanceof TransientError)) throw error;
      if (n >= RETRIES) {
        throw new ReleaseError(`${what} failed ${RETRIES} times (${error.message})`);
      }
      const backoff = error.retryAfterMs ?? 500 * 2 ** (n - 1) * (0.5 + Math.random());
      log(
        `${what}: ${error.message}; retrying in ${(backoff / 1000).toFixed(1)}s (${n}/${
          RETRIES - 1
        })`,
      );
      await new Promise((resolve) => setTimeout(resolve, backoff));
    }
  }
}

/** Forgejo's own error message, when the body is its JSON error (a proxy's HTML is not). */
function serverMessage(text: string): string | undefined {
  const parsed = v.safeParse(APIErrorSchema, safeJson(text));
  return parsed.success && parsed.output.message ? parsed.output.message : undefined;
}

/** One line that says what failed and what to do about it. */
export function explainStatus(
  forgejo: Pick<Forgejo, "repo" | "server">,
  answer: Pick<Answer, "status" | "text">,
  what: string,
): string {
  const said = serverMessage(answer.text);
  const quoted = said ? ` ("${said}")` : "";
  switch (answer.status) {
    case 401:
      return `Forgejo answered 401 for ${what}${quoted}: the token is missing, wrong or expired; set FORGEJO_TOKEN (in a workflow the job's GITHUB_TOKEN is valid only while the job runs)`;
    case 403:
      return `Forgejo answered 403 for ${what}${quoted}: the token cannot write releases of ${forgejo.repo} (a personal token needs write:repository; the workflow token is read-only for pull requests from forks)`;
    case 404:
      return `Forgejo answered 404 for ${what}: ${forgejo.repo} was not found on ${forgejo.server}, or is not visible with this token; check --repo and the token`;
    case 413:
      return `Forgejo or its reverse proxy answered 413 for ${what}${quoted}: raise the proxy's body limit (nginx client_max_body_size) or the [quota] limit`;
    default:
      return `Forgejo answered ${answer.status} for ${what}${
        quoted || `: ${answer.text.slice(0, 120).replace(/\s+/g, " ")}`
      }`;
  }
}

function parseAnswer<T>(
  schema: v.GenericSchema<unknown, T>,
  answer: Answer,
  what: string,
  forgejo: Forgejo,
): T {
  try {
    return parseJson(schema, answer.text, `Forgejo's answer to ${what}`);
  } catch (error) {
    throw new ReleaseError(`${(error as Error).message}; is ${forgejo.server} a Forgejo server?`);
  }
}

async function getJson<T>(
  forgejo: Forgejo,
  schema: v.GenericSchema<unknown, T>,
  call: Call,
): Promise<T> {
  const answer = await api(forgejo, call);
  return parseAnswer(schema, answer, `${call.method} ${call.path}`, forgejo);
}

/** Fails early, before a long build, when the server, repository or token is wrong. */
async function checkForgejo(forgejo: Forgejo): Promise<Repository> {
  const version = await api(forgejo, {
    method: "GET",
    path: "/version",
    root: true,
    expect: [404],
  });
  const parsed = version.status === 200
    ? v.safeParse(ServerVersionSchema, safeJson(version.text))
    : undefined;
  if (!parsed?.success) {
    throw new ReleaseError(
      `${forgejo.server} does not look like Forgejo: GET /api/v1/version answered ${version.status} without a version; check --server (the base URL of the Forgejo instance)`,
    );
  }
  const repo = await getJson(forgejo, RepositorySchema, { method: "GET", path: "" });
  if (repo.permissions && repo.permissions.push === false) {
    throw new ReleaseError(
      `the token cannot write releases of ${forgejo.repo} (it has read access only): a personal token needs write:repository and a user with write access; the workflow token is read-only for pull requests from forks`,
    );
  }
  log(`Forgejo ${parsed.output.version}, repository ${repo.full_name}`);
  return repo;
}

function safeJson(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch {
    return undefined;
  }
}

// ---------------------------------------------------------------------------------------------
// 7c. The release: find or create the draft, refuse what would change history
// ---------------------------------------------------------------------------------------------

async function refuseTagOnOtherCommit(forgejo: Forgejo, options: Options): Promise<void> {
  const answer = await api(forgejo, {
    method: "GET",
    path: `/tags/${encodeURIComponent(options.tag)}`,
    expect: [404],
  });
  if (answer.status === 404) return;
  const tag = parseAnswer(TagSchema, answer, "GET /tags", forgejo);
  if (tag.commit.sha !== options.commit) {
    throw new ReleaseError(
      `the tag ${options.tag} already points at ${tag.commit.sha}, not at ${options.commit}: a tag means one commit; release a new tag, or delete the old tag in Forgejo first`,
    );
  }
}

/** Drafts are visible to writers, but older servers hide them from the tag lookup. */
async function findRelease(forgejo: Forgejo, tag: string): Promise<Release | undefined> {
  const byTag = await api(forgejo, {
    method: "GET",
    path: `/releases/tags/${encodeURIComponent(tag)}`,
    expect: [404],
  });
  if (byTag.status === 200) return parseAnswer(ReleaseSchema, byTag, "GET /releases/tags", forgejo);
  for (let page = 1;; page++) {
    const releases = await getJson(forgejo, ReleaseListSchema, {
      method: "GET",
      path: "/releases",
      query: { draft: "true", page: String(page), limit: "50" },
    });
    const draft = releases.find((release) => release.tag_name.toLowerCase() === tag.toLowerCase());
    // Stop at an empty page: a server may cap pages below the limit asked for.
    if (draft || releases.length === 0) return draft;
  }
}

async function findOrCreateRelease(
  forgejo: Forgejo,
  options: Options,
  bundle: Bundle,
): Promise<Release> {
  const existing = await findRelease(forgejo, options.tag);
  if (existing) {
    return await markPrerelease(forgejo, checkReleaseCommit(existing, options), options);
  }
  const create: CreateReleaseOption = {
    tag_name: options.tag,
    // The commit SHA, never a branch: publishing makes the tag from it later.
    target_commitish: options.commit,
    name: options.tag,
    body: releaseBody(bundle.manifest, options),
    draft: true,
    prerelease: options.prerelease,
  };
  const created = await api(forgejo, {
    method: "POST",
    path: "/releases",
    json: create,
    expect: [409],
  });
  if (created.status === 201) {
    const release = parseAnswer(ReleaseSchema, created, "POST /releases", forgejo);
    log(`Created draft release ${release.tag_name} (id ${release.id})`);
    return release;
  }
  // Another job created it between our lookup and our POST: continue with theirs.
  const raced = await findRelease(forgejo, options.tag);
  if (!raced) {
    throw new ReleaseError(
      `Forgejo says a release for ${options.tag} exists but does not show it; rerun`,
    );
  }
  log(`Another run created ${options.tag} at the same time; continuing with it`);
  return checkReleaseCommit(raced, options);
}

/** --prerelease also applies to a draft an earlier run created; a published release stays. */
async function markPrerelease(
  forgejo: Forgejo,
  release: Release,
  options: Options,
): Promise<Release> {
  if (!release.draft || release.prerelease === options.prerelease) return release;
  const edit: EditReleaseOption = { prerelease: options.prerelease };
  await api(forgejo, { method: "PATCH", path: `/releases/${release.id}`, json: edit });
  return { ...release, prerelease: options.prerelease };
}

function checkReleaseCommit(release: Release, options: Options): Release {
  const target = release.target_commitish;
  if (/^[0-9a-f]{40,64}$/i.test(target) && target.toLowerCase() !== options.commit) {
    throw new ReleaseError(
      `the release ${release.tag_name} is for commit ${target}, not ${options.commit}: a tag means one commit; release a new tag, or delete that release in Forgejo first`,
    );
  }
  log(
    `Found ${
      release.draft ? "draft" : "published"
    } release ${release.tag_name} (id ${release.id}, ${release.assets.length} assets)`,
  );
  return release;
}

/**
 * Which attachment holds which bytes, kept in the release body as an HTML comment (invisible
 * on the release page) and updated after each upload. It lets a rerun trust a copy by its id
 * instead of uploading it again, and tells a replaced copy from the new one.
 */
export type UploadRecord = Record<string, { id: number; size: number; sha256: string }>;

const RECORD_PATTERN = /\n?<!-- release-boot:uploaded (\{.*?\}) -->\n?/s;

export function readUploadRecord(body: string): UploadRecord {
  const match = body.match(RECORD_PATTERN);
  if (!match) return {};
  const parsed = v.safeParse(UploadRecordSchema, safeJson(match[1]));
  return parsed.success ? parsed.output : {};
}

export function withUploadRecord(body: string, record: UploadRecord): string {
  const text = body.replace(RECORD_PATTERN, "\n").trimEnd();
  return `${text}\n\n<!-- release-boot:uploaded ${JSON.stringify(record)} -->\n`;
}

const UploadRecordSchema = v.record(
  v.string(),
  v.object({ id: v.number(), size: v.number(), sha256: v.string() }),
);

/** A copy's sha256 from the upload record, else (for older copies) from manifest.json. */
async function readRecordedSums(forgejo: Forgejo, release: Release): Promise<RecordedSha> {
  const record = readUploadRecord(release.body);
  const { manifest } = await readIndex(forgejo, release);
  return (copy) => {
    const entry = record[copy.name];
    if (entry) return entry.id === copy.id ? entry.sha256 : undefined;
    return manifest?.assets.find((asset) => asset.name === copy.name)?.sha256;
  };
}

async function recordUpload(
  forgejo: Forgejo,
  releaseId: number,
  asset: BundleAsset,
  stored: Attachment,
): Promise<void> {
  const release = await getJson(forgejo, ReleaseSchema, {
    method: "GET",
    path: `/releases/${releaseId}`,
  });
  const record = readUploadRecord(release.body);
  record[asset.name] = { id: stored.id, size: stored.size, sha256: asset.sha256 };
  const edit: EditReleaseOption = { body: withUploadRecord(release.body, record) };
  await api(forgejo, { method: "PATCH", path: `/releases/${releaseId}`, json: edit });
}

/** Every copy of SHA256SUMS and manifest.json in a release, read back. */
export interface RemoteIndex {
  /** The union of every manifest.json copy (a newer copy wins per name), if any. */
  manifest?: Manifest;
  manifests: { copy: Attachment; manifest: Manifest }[];
  sums: { copy: Attachment; text: string }[];
}

async function readIndex(forgejo: Forgejo, release: Release): Promise<RemoteIndex> {
  const oldestFirst = [...release.assets].sort((a, b) => a.id - b.id);
  const manifests = [];
  const sums = [];
  for (const copy of oldestFirst) {
    if (copy.name === MANIFEST_NAME) {
      const text = await downloadAsset(forgejo, copy);
      const manifest = parseJson(ManifestSchema, text, `${MANIFEST_NAME} of ${release.tag_name}`);
      manifests.push({ copy, manifest });
    } else if (copy.name === SUMS_NAME) {
      sums.push({ copy, text: await downloadAsset(forgejo, copy) });
    }
  }
  const manifest = manifests.map((m) => m.manifest).reduce<Manifest | undefined>(
    (union, next) => mergeManifests(union, next),
    undefined,
  );
  return { manifest, manifests, sums };
}

function downloadAsset(forgejo: Forgejo, copy: Attachment): Promise<string> {
  return downloadText(forgejo, assetAddress(forgejo, copy));
}

/** The uuid form works for drafts and duplicate names alike; the tag form may not. */
function assetAddress(forgejo: Forgejo, copy: Attachment): string {
  return copy.uuid ? `${forgejo.server}/attachments/${copy.uuid}` : copy.browser_download_url;
}

/**
 * Downloads a small file, following redirects by hand so that a redirect to another host
 * (object storage) never carries the token.
 */
async function downloadText(forgejo: Forgejo, address: string): Promise<string> {
  let url = new URL(address, forgejo.server);
  for (let hop = 0; hop < 5; hop++) {
    const what = `GET ${url.pathname}`;
    const answer = await withRetries(what, async () => {
      const response = await send(forgejo, url, "GET", undefined, { accept: "*/*" });
      const text = await response.body.text();
      const result = { status: response.statusCode, headers: response.headers, text };
      throwIfTransient(result, what);
      return result;
    });
    const location = answer.headers.location;
    if (answer.status >= 300 && answer.status < 400 && typeof location === "string") {
      url = new URL(location, url);
      continue;
    }
    if (answer.status !== 200) {
      throw new ReleaseError(
        `Forgejo answered ${answer.status} for ${what}: the release's own file cannot be read back; rerun, and check the token can read ${forgejo.repo}`,
      );
    }
    return answer.text;
  }
  throw new ReleaseError(`too many redirects downloading ${address}`);
}

// ---------------------------------------------------------------------------------------------
// 7d. What to upload: a pure plan from the local bundle and the release's current state
// ---------------------------------------------------------------------------------------------

export type PlannedAction =
  /** Already there with the same size and checksum: `remove` lists stray copies to delete. */
  | { kind: "skip"; asset: BundleAsset; keep: Attachment; remove: Attachment[] }
  /** Not there (or only partial/unverifiable copies in a draft, removed after the upload). */
  | { kind: "upload"; asset: BundleAsset; remove: Attachment[] }
  /** There with other bytes: refused unless --replace, which uploads then removes. */
  | { kind: "conflict"; asset: BundleAsset; remote: Attachment[]; remoteSha256?: string };

/** What the release says a stored copy holds: its sha256, or undefined when unknown. */
export type RecordedSha = (copy: Attachment) => string | undefined;

export function planUploads(
  local: BundleAsset[],
  remote: Attachment[],
  recordedSha: RecordedSha,
  isDraft: boolean,
  replace: boolean,
): PlannedAction[] {
  return local.map((asset): PlannedAction => {
    const copies = remote.filter((attachment) => attachment.name === asset.name);
    const good = copies.filter((copy) =>
      copy.size === asset.size && recordedSha(copy) === asset.sha256
    );
    if (good.length > 0) {
      const keep = good.sort((a, b) => a.id - b.id)[0];
      return { kind: "skip", asset, keep, remove: copies.filter((copy) => copy !== keep) };
    }
    if (copies.length === 0) return { kind: "upload", asset, remove: [] };
    const known = copies.map(recordedSha).filter((sha) => sha !== undefined);
    // Our checksum on record but a wrong size: a truncated upload, ours to redo.
    const truncated = known.length > 0 && known.every((sha) => sha === asset.sha256);
    // Nothing on record in a draft: an upload that a killed run never got to record.
    const unrecorded = known.length === 0 && isDraft;
    if (truncated || unrecorded || replace) return { kind: "upload", asset, remove: copies };
    return { kind: "conflict", asset, remote: copies, remoteSha256: known[0] };
  });
}

function refuseConflicts(plan: PlannedAction[], release: Release, options: Options): void {
  const conflicts = plan.filter((action) => action.kind === "conflict");
  if (conflicts.length === 0) return;
  const first = conflicts[0];
  const theirs = first.remoteSha256
    ? `sha256 ${first.remoteSha256}`
    : `${first.remote[0].size} bytes, no checksum`;
  throw new ReleaseError(
    `${first.asset.name} in ${
      release.draft ? "draft" : "published"
    } release ${options.tag} differs from this build (${theirs} there, sha256 ${first.asset.sha256} here)${
      conflicts.length > 1 ? ` and ${conflicts.length - 1} more` : ""
    }; nothing was changed: rerun with --replace to store the new bytes, or release a new tag`,
  );
}

// ---------------------------------------------------------------------------------------------
// 7e. Uploads: the raw file streamed with its exact length, the stored size checked
// ---------------------------------------------------------------------------------------------

async function uploadPlanned(
  forgejo: Forgejo,
  release: Release,
  plan: PlannedAction[],
): Promise<void> {
  const uploads = plan.filter((action) => action.kind === "upload");
  const skipped = plan.filter((action) => action.kind === "skip");
  for (const action of skipped) log(`${action.asset.name}: already in the release, skipped`);
  let done = 0;
  for (const action of uploads) {
    try {
      const stored = await uploadAsset(forgejo, release.id, action.asset, release.assets);
      await recordUpload(forgejo, release.id, action.asset, stored);
    } catch (error) {
      if (error instanceof ReleaseError) {
        throw new ReleaseError(
          `${error.message}; ${done} of ${uploads.length} uploads had finished and the release stays a draft: rerun the same command to resume`,
        );
      }
      throw error;
    }
    done++;
  }
  const strays = plan.flatMap((action) => action.kind === "conflict" ? [] : action.remove);
  for (const stray of strays) {
    await deleteAsset(forgejo, release.id, stray, "a stray or replaced copy");
  }
}

/** `existing`: the release's assets before this upload, to tell a retry's leftovers apart. */
async function uploadAsset(
  forgejo: Forgejo,
  releaseId: number,
  asset: BundleAsset,
  existing: Attachment[],
): Promise<Attachment> {
  const url = apiUrl(forgejo, {
    path: `/releases/${releaseId}/assets`,
    query: { name: asset.name },
  });
  const what = `upload of ${asset.name} (${formatBytes(asset.size)})`;
  return await withRetries(what, async (attempt) => {
    // The failed attempt may have been stored after all: look before uploading again. Not
    // for SHA256SUMS and manifest.json, whose new copies may be another job's; writeIndex
    // tidies their copies itself.
    if (attempt > 1 && asset.path) {
      const now = await listAssets(forgejo, releaseId);
      const arrived = now.filter((a) =>
        a.name === asset.name && !existing.some((b) => b.id === a.id)
      );
      const complete = arrived.find((a) => a.size === asset.size);
      if (complete) return complete;
      for (const partial of arrived) {
        await deleteAsset(forgejo, releaseId, partial, "a partial upload");
      }
    }
    const body = asset.bytes ?? Readable.from(readWithProgress(asset));
    const response = await send(forgejo, url, "POST", body, {
      "content-type": "application/octet-stream",
      "content-length": String(asset.size),
    });
    const answer = {
      status: response.statusCode,
      headers: response.headers,
      text: await response.body.text(),
    };
    throwIfTransient(answer, `POST ${url.pathname}`);
    if (answer.status !== 201) throw new ReleaseError(explainUploadFailure(forgejo, answer, asset));
    const stored = parseAnswer(AttachmentSchema, answer, "POST /assets", forgejo);
    if (stored.size !== asset.size) {
      await deleteAsset(forgejo, releaseId, stored, "a truncated upload");
      throw new TransientError(`Forgejo stored ${stored.size} of ${asset.size} bytes`);
    }
    return stored;
  });
}

function explainUploadFailure(forgejo: Forgejo, answer: Answer, asset: BundleAsset): string {
  const said = serverMessage(answer.text);
  if (answer.status === 413) {
    return `the server or its reverse proxy refused ${asset.name} of ${asset.size} bytes (413${
      said ? `: ${said}` : ""
    }): raise the proxy's client_max_body_size or the [quota] limit, then rerun`;
  }
  if (answer.status === 400 && said && /type is not allowed/i.test(said)) {
    return `Forgejo refuses the file type of ${asset.name} ("${said}"): allow it in [repository.release] ALLOWED_TYPES (empty allows every type), then rerun`;
  }
  return explainStatus(forgejo, answer, `upload of ${asset.name}`);
}

async function listAssets(forgejo: Forgejo, releaseId: number): Promise<Attachment[]> {
  return await getJson(forgejo, AttachmentListSchema, {
    method: "GET",
    path: `/releases/${releaseId}/assets`,
  });
}

async function deleteAsset(
  forgejo: Forgejo,
  releaseId: number,
  asset: Attachment,
  why: string,
): Promise<void> {
  await api(forgejo, {
    method: "DELETE",
    path: `/releases/${releaseId}/assets/${asset.id}`,
    expect: [404],
  });
  log(`Deleted ${why}: ${asset.name} (id ${asset.id}, ${asset.size} bytes)`);
}

/** Streams a file in 1 MiB chunks and shows progress: a bar on a terminal, a few lines in CI. */
async function* readWithProgress(asset: BundleAsset): AsyncIterable<Uint8Array> {
  const terminal = !inCI && Deno.stderr.isTerminal();
  const large = asset.size >= 64 << 20;
  let sent = 0;
  let reported = 0;
  for await (const chunk of createReadStream(asset.path!, { highWaterMark: READ_SIZE })) {
    sent += chunk.length;
    yield chunk;
    const percent = Math.floor((sent / asset.size) * 100);
    if (terminal && large) {
      const bar = "#".repeat(Math.floor(percent / 4)).padEnd(25, ".");
      Deno.stderr.writeSync(new TextEncoder().encode(`\r${asset.name} [${bar}] ${percent}%`));
    } else if (large && percent >= reported + 25) {
      reported = percent - (percent % 25);
      log(`${asset.name}: ${reported}% of ${formatBytes(asset.size)}`);
    }
  }
  if (terminal && large) Deno.stderr.writeSync(new TextEncoder().encode("\n"));
  if (sent !== asset.size) throw new ReleaseError(`${asset.path} changed size while uploading`);
}

// ---------------------------------------------------------------------------------------------
// 7f. SHA256SUMS and manifest.json: the union of every job's assets, written until it holds
// ---------------------------------------------------------------------------------------------

/**
 * Merges this run's manifest into the release's: assets of other jobs (a matrix building
 * one release) are kept, this run's entries win for its own names.
 */
export function mergeManifests(remote: Manifest | undefined, local: Manifest): Manifest {
  if (!remote) return local;
  const mine = new Set(local.assets.map((asset) => asset.name));
  const assets: ManifestAsset[] = [
    ...remote.assets.filter((asset) => !mine.has(asset.name)),
    ...local.assets,
  ]
    .sort((a, b) => a.name < b.name ? -1 : a.name > b.name ? 1 : 0);
  return {
    ...local,
    flake: { ...local.flake, inputs: { ...remote.flake.inputs, ...local.flake.inputs } },
    assets,
  };
}

/** True when `covering` lists every asset of `covered` with the same checksum. */
function covers(covering: ManifestAsset[], covered: { name: string; sha256: string }[]): boolean {
  return covered.every((asset) =>
    covering.some((mine) => mine.name === asset.name && mine.sha256 === asset.sha256)
  );
}

/** True when `covering` names every asset of `covered` (a --replace may change the bytes). */
function namesAll(covering: ManifestAsset[], covered: { name: string }[]): boolean {
  return covered.every((asset) => covering.some((mine) => mine.name === asset.name));
}

/** Exactly one SHA256SUMS and one manifest.json, agreeing, and holding `wanted`. */
function indexSettled(index: RemoteIndex, wanted: ManifestAsset[]): boolean {
  if (index.manifests.length !== 1 || index.sums.length !== 1) return false;
  const remote = index.manifests[0].manifest.assets;
  return covers(remote, wanted) && covers(wanted, remote) &&
    index.sums[0].text === renderSums(remote);
}

/**
 * Writes SHA256SUMS and manifest.json covering every asset, and re-reads until exactly one
 * of each is there. Jobs writing at once converge: each writes the union of every copy it
 * sees, and deletes only older manifest copies whose every name its own lists, so no job's
 * entries are lost.
 */
async function writeIndex(
  forgejo: Forgejo,
  releaseId: number,
  bundle: Bundle,
  options: Options,
): Promise<Release> {
  for (let round = 1; round <= 8; round++) {
    // Jobs that collide back off by different amounts, so one of them settles first.
    if (round > 1) await new Promise((resolve) => setTimeout(resolve, 100 + Math.random() * 400));
    const release = await getJson(forgejo, ReleaseSchema, {
      method: "GET",
      path: `/releases/${releaseId}`,
    });
    const index = await readIndex(forgejo, release);
    const merged = mergeManifests(index.manifest, bundle.manifest);
    if (indexSettled(index, merged.assets)) {
      await updateBody(forgejo, release, index.manifests[0].manifest, options);
      return release;
    }
    const { sums, manifest } = newestIndexHolds(index, merged.assets) ??
      await uploadIndex(forgejo, releaseId, merged, release.assets);
    const older = [
      ...index.manifests.filter((m) =>
        m.copy.id < manifest.id && namesAll(merged.assets, m.manifest.assets)
      ),
      // Older SHA256SUMS copies only restate manifests that were merged above.
      ...index.sums.filter((s) => s.copy.id < sums.id),
    ];
    for (const { copy } of older) await deleteAsset(forgejo, releaseId, copy, "an older index");
  }
  throw new ReleaseError(
    `${SUMS_NAME} of ${options.tag} kept changing under this run (other jobs writing); rerun`,
  );
}

/** The newest copies, when they already say what this run would write (another job wrote them). */
function newestIndexHolds(
  index: RemoteIndex,
  wanted: ManifestAsset[],
): { sums: Attachment; manifest: Attachment } | undefined {
  const manifest = index.manifests.at(-1);
  const sums = index.sums.at(-1);
  if (!manifest || !sums) return undefined;
  const same = covers(manifest.manifest.assets, wanted) &&
    covers(wanted, manifest.manifest.assets) &&
    sums.text === renderSums(wanted);
  return same ? { sums: sums.copy, manifest: manifest.copy } : undefined;
}

async function uploadIndex(
  forgejo: Forgejo,
  releaseId: number,
  merged: Manifest,
  existing: Attachment[],
): Promise<{ sums: Attachment; manifest: Attachment }> {
  const fresh = bundleRelease([], merged);
  // manifest.json first: every SHA256SUMS copy then has its manifest there to be merged from.
  const manifest = await uploadAsset(forgejo, releaseId, fresh.manifestAsset, existing);
  const sums = await uploadAsset(forgejo, releaseId, fresh.sums, existing);
  log(`Wrote ${SUMS_NAME} and ${MANIFEST_NAME} covering ${merged.assets.length} assets`);
  return { sums, manifest };
}

async function updateBody(
  forgejo: Forgejo,
  release: Release,
  manifest: Manifest,
  options: Options,
): Promise<void> {
  const body = withUploadRecord(releaseBody(manifest, options), readUploadRecord(release.body));
  if (release.body === body) return;
  const edit: EditReleaseOption = { body };
  await api(forgejo, { method: "PATCH", path: `/releases/${release.id}`, json: edit });
}

/** The release page, readably: what it is, where it came from, and how to check it. */
export function releaseBody(manifest: Manifest, options: Pick<Options, "server" | "repo">): string {
  const commitUrl = `${options.server}/${options.repo}/commit/${manifest.commit}`;
  const lines = [
    `Boot images built from commit [${
      manifest.commit.slice(0, 12)
    }](${commitUrl}) with Nix ${manifest.nixVersion}.`,
    "",
  ];
  const inputs = Object.entries(manifest.flake.inputs);
  if (inputs.length > 0) {
    lines.push("| flake input | source | rev |", "|---|---|---|");
    for (const [name, input] of inputs) {
      lines.push(
        `| ${name} | ${input.url ?? input.type} | \`${input.rev ?? input.narHash ?? "?"}\` |`,
      );
    }
    lines.push("");
  }
  lines.push("| asset | size | sha256 |", "|---|---|---|");
  for (const asset of manifest.assets) {
    lines.push(`| ${asset.name} | ${formatBytes(asset.size)} | \`${asset.sha256}\` |`);
  }
  lines.push("", `Verify a download: \`sha256sum -c --ignore-missing ${SUMS_NAME}\`.`);
  if (manifest.ciRun) lines.push("", `Built by [CI run](${manifest.ciRun}).`);
  return `${lines.join("\n")}\n`;
}

// ---------------------------------------------------------------------------------------------
// 7g. Publish once everything is there, then confirm it
// ---------------------------------------------------------------------------------------------

/** Names the problems that keep a release from being complete; empty when it is. */
export function incompleteness(
  release: Pick<Release, "assets">,
  index: Pick<RemoteIndex, "manifest" | "sums">,
): string[] {
  const manifest = index.manifest;
  if (!manifest) return [`it has no ${MANIFEST_NAME}`];
  const problems: string[] = [];
  const sums = index.sums.at(-1);
  if (!sums) problems.push(`it has no ${SUMS_NAME}`);
  else if (sums.text !== renderSums(manifest.assets)) {
    problems.push(`${SUMS_NAME} does not agree with ${MANIFEST_NAME}`);
  }
  const counts = new Map<string, Attachment[]>();
  for (const asset of release.assets) {
    counts.set(asset.name, [...counts.get(asset.name) ?? [], asset]);
  }
  for (const [name, copies] of counts) {
    if (copies.length > 1) problems.push(`${name} is there ${copies.length} times`);
    else if (!INDEX_NAMES.has(name) && !manifest.assets.some((asset) => asset.name === name)) {
      problems.push(`${name} is not covered by ${SUMS_NAME}`);
    }
  }
  for (const asset of manifest.assets) {
    const copy = counts.get(asset.name)?.[0];
    if (!copy) problems.push(`${asset.name} is listed in ${SUMS_NAME} but missing`);
    else if (copy.size !== asset.size) {
      problems.push(`${asset.name} has ${copy.size} bytes, not ${asset.size}`);
    }
  }
  return problems;
}
/**
 * Publishes the draft once it is complete. When another job's assets are there but not yet
 * covered, that job is still writing: wait (up to --timeout) for it to cover them.
 */
async function publishWhenComplete(
  forgejo: Forgejo,
  indexed: Release,
  options: Options,
): Promise<Release> {
  const deadline = Date.now() + options.timeoutSeconds * 1000;
  for (let waited = false;; waited = true) {
    if (waited) await new Promise((resolve) => setTimeout(resolve, 1000));
    const release = await getJson(forgejo, ReleaseSchema, {
      method: "GET",
      path: `/releases/${indexed.id}`,
    });
    const problems = incompleteness(release, await readIndex(forgejo, release));
    if (problems.length === 0) {
      if (release.draft && !options.draft) return await publishDraft(forgejo, release);
      if (release.draft) {
        log(
          `Left ${options.tag} a draft (--draft): publish it with --finalize --tag ${options.tag}`,
        );
      }
      return release;
    }
    if (release.draft && options.draft) {
      log(`${options.tag} stays a draft until every job is in: ${problems.join("; ")}`);
      return release;
    }
    if (Date.now() > deadline) {
      throw new ReleaseError(
        `release ${options.tag} ${release.draft ? "stays a draft" : "is incomplete"} because ${
          problems.join("; ")
        }: if another job is still adding assets, it completes the release when it finishes; otherwise rerun with every target, or delete what does not belong`,
      );
    }
    if (!waited) log(`Waiting for another job to finish ${options.tag}: ${problems.join("; ")}`);
  }
}
async function publishDraft(forgejo: Forgejo, release: Release): Promise<Release> {
  const edit: EditReleaseOption = { draft: false };
  await api(forgejo, { method: "PATCH", path: `/releases/${release.id}`, json: edit });
  const published = await getJson(forgejo, ReleaseSchema, {
    method: "GET",
    path: `/releases/${release.id}`,
  });
  if (published.draft) {
    throw new ReleaseError(`Forgejo did not publish ${release.tag_name}; rerun to try again`);
  }
  log(`Published ${published.tag_name}`);
  return published;
}

/** The last job of a matrix: no build, just check the assembled draft and publish it. */
async function finalizeRelease(forgejo: Forgejo, options: Options): Promise<void> {
  const found = await findRelease(forgejo, options.tag);
  const release = found && checkReleaseCommit(found, options);
  if (!release) {
    throw new ReleaseError(
      `there is no release ${options.tag} to finalize: run the build jobs first (with --draft)`,
    );
  }
  await refuseTagOnOtherCommit(forgejo, options);
  const index = await readIndex(forgejo, release);
  const problems = incompleteness(release, index);
  if (problems.length > 0) {
    throw new ReleaseError(
      `release ${options.tag} is not complete, so it stays a draft: ${problems.join("; ")}`,
    );
  }
  const published = release.draft ? await publishDraft(forgejo, release) : release;
  const bundle = bundleRelease([], index.manifest!);
  await reportRelease(published, bundle, Deno.env.toObject());
}

async function reportRelease(release: Release, bundle: Bundle, env: Env): Promise<void> {
  if (env.GITHUB_OUTPUT) {
    await fs.appendFile(
      env.GITHUB_OUTPUT,
      `release-url=${release.html_url}\ntag=${release.tag_name}\nrelease-id=${release.id}\n`,
    );
  }
  if (env.GITHUB_STEP_SUMMARY) {
    const rows = bundle.manifest.assets.map((a) =>
      `| ${a.name} | ${formatBytes(a.size)} | \`${a.sha256}\` |`
    );
    await fs.appendFile(
      env.GITHUB_STEP_SUMMARY,
      [
        `### Release [${release.tag_name}](${release.html_url})${release.draft ? " (draft)" : ""}`,
        "",
        "| asset | size | sha256 |",
        "|---|---|---|",
        ...rows,
        "",
      ].join("\n"),
    );
  }
  log(`Release ${release.tag_name}${release.draft ? " (draft)" : ""}: ${release.html_url}`);
  console.log(release.html_url);
}

// ---------------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------------
// 8. fetch: a published release laid out for booting, every byte checked before it is kept
// ---------------------------------------------------------------------------------------------

async function fetchForBoot(forgejo: Forgejo, options: Options): Promise<void> {
  const release = await step("Find the release", () => findBootRelease(forgejo, options.tag));
  const { manifest, sums } = await readPublishedIndex(forgejo, release);
  const wanted = chooseAssets(manifest, sums, options.targets, options.system, release.tag_name);
  const out = path.resolve(options.out);
  await fs.mkdir(out, { recursive: true });
  await step("Download and verify", async () => {
    for (const asset of wanted) await downloadVerified(forgejo, release, asset, out);
  });
  await writeBootDirectory(out, wanted);
  log(
    `${release.tag_name}: ${wanted.length} files verified in ${out}; serve it over HTTP and chain netboot.ipxe`,
  );
  console.log(out);
}

/** `latest` is the newest published boot-v* release: never a draft, pre-release or boot-dev. */
async function findBootRelease(forgejo: Forgejo, tag: string): Promise<Release> {
  if (tag === "latest") {
    for (let page = 1;; page++) {
      const releases = await getJson(forgejo, ReleaseListSchema, {
        method: "GET",
        path: "/releases",
        query: { draft: "false", "pre-release": "false", page: String(page), limit: "50" },
      });
      const found = releases.find((r) =>
        r.tag_name.startsWith("boot-v") && !r.draft && !r.prerelease
      );
      if (found) return found;
      if (releases.length === 0) {
        throw new ReleaseError(`${forgejo.repo} has no published boot-v* release yet; pass --tag`);
      }
    }
  }
  const answer = await api(forgejo, {
    method: "GET",
    path: `/releases/tags/${encodeURIComponent(tag)}`,
    expect: [404],
  });
  if (answer.status === 404) {
    throw new ReleaseError(
      `${forgejo.repo} has no release ${tag} that this token can see; check --tag`,
    );
  }
  const release = parseAnswer(ReleaseSchema, answer, "GET /releases/tags", forgejo);
  if (release.draft) {
    throw new ReleaseError(`${tag} is still a draft: publish it before booting from it`);
  }
  return release;
}

async function readPublishedIndex(
  forgejo: Forgejo,
  release: Release,
): Promise<{ manifest: Manifest; sums: Map<string, string> }> {
  const index = await readIndex(forgejo, release);
  const newestSums = index.sums.at(-1);
  if (!index.manifest || !newestSums) {
    throw new ReleaseError(
      `${release.tag_name} has no ${SUMS_NAME} and ${MANIFEST_NAME}: it was not made by release-boot, or not finished; nothing can be verified`,
    );
  }
  return { manifest: index.manifest, sums: parseSums(newestSums.text) };
}

/** The assets of the chosen targets, each with the checksum SHA256SUMS gives it. */
export function chooseAssets(
  manifest: Pick<Manifest, "assets">,
  sums: Map<string, string>,
  targets: string[],
  system: string,
  tag: string,
): ManifestAsset[] {
  for (const target of targets) {
    if (!manifest.assets.some((a) => a.target === target && a.system === system)) {
      throw new ReleaseError(
        `${tag} has no ${target} files for ${system}; it has ${
          [...new Set(manifest.assets.map((a) => `${a.target} (${a.system})`))].join(", ")
        }`,
      );
    }
  }
  const wanted = manifest.assets.filter((a) => targets.includes(a.target) && a.system === system);
  for (const asset of wanted) {
    if (sums.get(asset.name) !== asset.sha256) {
      throw new ReleaseError(
        `${asset.name} is not listed in ${tag}'s ${SUMS_NAME} as ${MANIFEST_NAME} says: the release is inconsistent, refusing to trust it`,
      );
    }
  }
  return wanted;
}

/**
 * Downloads into `<name>.part` (resuming one left by an interrupted run), checks the whole
 * file against SHA256SUMS, and only then renames it to its final name. A file that does
 * not match is deleted.
 */
async function downloadVerified(
  forgejo: Forgejo,
  release: Release,
  asset: ManifestAsset,
  out: string,
): Promise<void> {
  const final = path.join(out, asset.name);
  const existing = await fs.stat(final).catch(() => undefined);
  if (existing && (await hashFile(final)).sha256 === asset.sha256) {
    log(`${asset.name}: already here and verified`);
    return;
  }
  const copy = release.assets.find((a) => a.name === asset.name);
  if (!copy) throw new ReleaseError(`${release.tag_name} lists ${asset.name} but does not hold it`);
  // The checksum is in the name, so a part left by another release is never resumed.
  const part = `${final}.${asset.sha256.slice(0, 16)}.part`;
  await removeStaleParts(out, asset.name, part);
  await withRetries(`download of ${asset.name}`, () => downloadToPart(forgejo, copy, part));
  const got = await hashFile(part);
  if (got.sha256 !== asset.sha256) {
    await fs.rm(part, { force: true });
    throw new ReleaseError(
      `${asset.name} does not match ${SUMS_NAME} (expected ${asset.sha256}, got ${got.sha256} for ${got.size} bytes); the download was deleted: rerun, and if it persists the release's file is damaged`,
    );
  }
  await fs.rename(part, final);
  log(`${asset.name}: ${formatBytes(got.size)}, sha256 verified`);
}

async function removeStaleParts(out: string, name: string, keep: string): Promise<void> {
  for (const entry of await fs.readdir(out)) {
    const file = path.join(out, entry);
    if (entry.startsWith(`${name}.`) && entry.endsWith(".part") && file !== keep) {
      await fs.rm(file, { force: true });
    }
  }
}

/** One GET of an asset into `part`, from where it stopped, following redirects by hand. */
async function downloadToPart(forgejo: Forgejo, copy: Attachment, part: string): Promise<void> {
  const have = (await fs.stat(part).catch(() => undefined))?.size ?? 0;
  let url = new URL(assetAddress(forgejo, copy));
  for (let hop = 0; hop < 5; hop++) {
    const headers: Record<string, string> = { accept: "*/*" };
    if (have > 0) headers.range = `bytes=${have}-`;
    const response = await send(forgejo, url, "GET", undefined, headers);
    const location = response.headers.location;
    if (response.statusCode >= 300 && response.statusCode < 400 && typeof location === "string") {
      await response.body.dump();
      url = new URL(location, url);
      continue;
    }
    if (response.statusCode === 416 && have > 0) {
      await response.body.dump();
      return; // The part already holds every byte; the checksum decides.
    }
    if (response.statusCode !== 200 && response.statusCode !== 206) {
      const answer = {
        status: response.statusCode,
        headers: response.headers,
        text: await response.body.text(),
      };
      throwIfTransient(answer, `GET ${url.pathname}`);
      throw new ReleaseError(explainStatus(forgejo, answer, `download of ${copy.name}`));
    }
    const range = String(response.headers["content-range"] ?? "");
    if (response.statusCode === 206 && !range.startsWith(`bytes ${have}-`)) {
      await response.body.dump();
      await fs.rm(part, { force: true });
      throw new TransientError(
        `the server resumed at ${range || "an unknown offset"}, not at ${have}`,
      );
    }
    if (have > 0 && response.statusCode === 206) {
      log(`${copy.name}: resuming after ${formatBytes(have)}`);
    }
    const flags = response.statusCode === 206 ? "a" : "w";
    await pipeline(response.body, createWriteStream(part, { flags })).catch((error: Error) => {
      throw new TransientError(`the download stopped: ${error.message}`);
    });
    return;
  }
  throw new ReleaseError(`too many redirects downloading ${copy.name}`);
}

/**
 * Makes the directory servable as it is: its own SHA256SUMS, and netboot.ipxe rewritten
 * from the script as built so that kernel and initrd load from beside it.
 */
async function writeBootDirectory(out: string, assets: ManifestAsset[]): Promise<void> {
  await writeAtomically(path.join(out, SUMS_NAME), renderSums(assets));
  const scripts = assets.filter((a) => a.name.endsWith(".built.ipxe"));
  for (const script of scripts) {
    const locate = (file: string) => {
      const found = assets.find((a) =>
        a.target === script.target && a.system === script.system && a !== script &&
        !a.name.endsWith(".ipxe") && path.basename(a.storePath) === file
      );
      return found && encodeURIComponent(found.name);
    };
    const name = scripts.length === 1
      ? "netboot.ipxe"
      : script.name.replace(/\.built\.ipxe$/, ".local.ipxe");
    const built = await fs.readFile(path.join(out, script.name), "utf8");
    await writeAtomically(path.join(out, name), rewriteIpxe(built, locate));
    log(`${name}: loads its kernel and initrd from the same directory`);
  }
}

async function writeAtomically(file: string, text: string): Promise<void> {
  await fs.writeFile(`${file}.part`, text);
  await fs.rename(`${file}.part`, file);
}

// ---------------------------------------------------------------------------------------------
// 9. verify: rebuild a release from its commit and compare every file with SHA256SUMS
// ---------------------------------------------------------------------------------------------

/** What to rebuild for a release: one system's targets, and the sums their files must have. */
export interface RebuildScope {
  system: string;
  targets: string[];
  /** Asset name -> sha256 as SHA256SUMS gives it, for every asset of `system`. */
  expected: Map<string, string>;
}

/**
 * The targets of `system` (by default the release's only system) and their sums. SHA256SUMS
 * and manifest.json must agree entry by entry, or there is nothing trustworthy to compare.
 */
export function rebuildScope(
  manifest: Pick<Manifest, "tag" | "assets">,
  sums: Map<string, string>,
  system?: string,
): RebuildScope {
  const unlisted = [...sums.keys()].find((name) => !manifest.assets.some((a) => a.name === name));
  if (unlisted) {
    throw new ReleaseError(
      `${SUMS_NAME} of ${manifest.tag} lists ${unlisted}, which its ${MANIFEST_NAME} does not: the release is inconsistent, refusing to trust it`,
    );
  }
  const systems = [...new Set(manifest.assets.map((asset) => asset.system))];
  if (systems.length === 0) {
    throw new ReleaseError(
      `${manifest.tag} lists no assets in ${MANIFEST_NAME}: nothing to rebuild`,
    );
  }
  const chosen = system ?? (systems.length === 1 ? systems[0] : undefined);
  if (!chosen || !systems.includes(chosen)) {
    throw new UsageError(
      `${manifest.tag} holds files for ${systems.join(", ")}: pass --system with one of them`,
    );
  }
  const targets = [
    ...new Set(manifest.assets.filter((a) => a.system === chosen).map((a) => a.target)),
  ];
  const wanted = chooseAssets(manifest, sums, targets, chosen, manifest.tag);
  return {
    system: chosen,
    targets,
    expected: new Map(wanted.map((asset) => [asset.name, asset.sha256])),
  };
}

/**
 * A rebuild proves something only from the release's own commit: a local checkout must be
 * clean and at that commit, and a reference elsewhere must resolve to it (pin it with ?rev=).
 */
export async function checkFlakeCommit(
  flake: string,
  release: Pick<Manifest, "tag" | "commit">,
): Promise<void> {
  const metadata = await nixJson(
    FlakeMetadataSchema,
    ["flake", "metadata", KEEP_LOCK, "--json", flake],
    `reading the flake ${flake}`,
  );
  const { tag, commit } = release;
  if (metadata.revision === commit) return;
  const pinned = pinToCommit(metadata, commit);
  if (metadata.revision) {
    const local = metadata.url.startsWith("git+file:");
    throw new ReleaseError(
      local
        ? `the flake ${flake} is at commit ${metadata.revision}, but ${tag} was built from ${commit}: check out ${commit}, or pass --flake '${pinned}'`
        : `the flake ${flake} resolves to commit ${metadata.revision}, but ${tag} was built from ${commit}: pass --flake '${pinned}'`,
    );
  }
  if (metadata.locked.type === "git") {
    throw new ReleaseError(
      `the flake ${flake} has uncommitted changes, so it is not commit ${commit} that ${tag} was built from: commit or stash them, or pass --flake '${pinned}'`,
    );
  }
  throw new ReleaseError(
    `the flake ${flake} is a ${metadata.locked.type} flake without a git revision, so nothing ties it to commit ${commit} of ${tag}: pass --flake '${pinned}'`,
  );
}

/** The flake's location as a reference pinned to `commit` (its `dir=` kept), for a fix. */
function pinToCommit(metadata: FlakeMetadata, commit: string): string {
  const forge = metadata.url.match(/^(github|gitlab|sourcehut):([^/?]+\/[^/?]+)/);
  if (forge) return `${forge[1]}:${forge[2]}/${commit}`;
  const location = metadata.url.replace(/^path:/, "git+file://");
  if (!URL.canParse(location)) return `git+file:///path/to/checkout?rev=${commit}`;
  const url = new URL(location);
  const dir = url.searchParams.get("dir");
  url.search = "";
  if (dir) url.searchParams.set("dir", dir);
  url.searchParams.set("rev", commit);
  return url.toString();
}

/** One file of a rebuild, under its asset name. */
export interface RebuiltAsset {
  name: string;
  size: number;
  sha256: string;
  /** Set when nix's check rebuilt the file differently from the copy already in the store. */
  storeSha256?: string;
}

export interface RebuildRequest {
  flake: string;
  system: string;
  targets: string[];
  /** The release's download base, as publishing computed it (`downloadBase`). */
  downloadBase: string;
}

/** What checks leave behind: nix's `<out>.check` copies and the kept build directories. */
interface CheckLeftovers {
  storeCopies: string[];
  buildDirs: string[];
}

/**
 * Rebuilds the files of a release. One `nix build` realises every target (perhaps straight
 * from the store or a cache), then every derivation that produced a file is built again
 * with `nix-store --realise --check`: `nix build --rebuild` would redo only the top
 * derivation, and a netboot bundle only links a kernel and an initrd that others build.
 * Where the check differs, the file is hashed as rebuilt (nix keeps it at `<out>.check`,
 * removed afterwards). The published `.ipxe` is regenerated from the rebuilt script with
 * `downloadBase`, exactly as publishing wrote it.
 */
export async function rebuildRelease(request: RebuildRequest): Promise<RebuiltAsset[]> {
  const builds = await buildTargets(request);
  const products = await collectProducts(builds);
  const storeDir = path.dirname(builds[0].outPath);
  const outputOf = (file: string) => storeOutput(file, storeDir);
  const derivers = await queryDerivers([...new Set(products.map((p) => outputOf(p.path)))]);
  const leftovers: CheckLeftovers = { storeCopies: [], buildDirs: [] };
  try {
    const rebuiltAt = new Map<string, string>();
    for (const drv of new Set(derivers.values())) {
      for (const [out, copy] of await checkDerivation(drv, leftovers)) rebuiltAt.set(out, copy);
    }
    const rebuilt: Product[] = [];
    for (const product of products) {
      const out = outputOf(product.path);
      const copy = rebuiltAt.get(out);
      const file = copy ? copy + product.path.slice(out.length) : product.path;
      // A rebuild that came out different may lack the file: then it is missing, not an error.
      if (copy && !(await fs.lstat(file).catch(() => undefined))?.isFile()) {
        log(`${product.name}: the rebuild of ${out} made no file ${file.slice(copy.length + 1)}`);
        continue;
      }
      rebuilt.push({ ...product, path: file });
    }
    const changed = products.filter((product) => rebuiltAt.has(outputOf(product.path)));
    const storeSums = await hashFiles(changed.map((product) => product.path));
    const storeSha256 = new Map(changed.map((product, i) => [product.name, storeSums[i].sha256]));
    const assets = await pointIpxeAtRelease(await hashProducts(rebuilt), request.downloadBase);
    return assets.map((asset) => {
      const inStore = storeSha256.get(asset.name);
      return {
        name: asset.name,
        size: asset.size,
        sha256: asset.sha256,
        ...(inStore ? { storeSha256: inStore } : {}),
      };
    });
  } finally {
    await removeLeftovers(leftovers);
  }
}

/** The top-level store path a file lives in: `<store>/<hash>-<name>`. */
function storeOutput(file: string, storeDir: string): string {
  const relative = path.relative(storeDir, file);
  if (relative.startsWith("..") || path.isAbsolute(relative)) {
    throw new ReleaseError(`${file} is not in the nix store ${storeDir}, so it cannot be rebuilt`);
  }
  return path.join(storeDir, relative.split(path.sep)[0]);
}

/** Output path -> the derivation that built it. */
async function queryDerivers(outputs: string[]): Promise<Map<string, string>> {
  const result = await $`nix-store --query --deriver ${outputs}`.quiet().nothrow();
  if (result.exitCode !== 0) {
    throw new ReleaseError(
      `cannot ask nix what built the files: ${nixErrorTail(result.stderr, 1)}`,
    );
  }
  const lines = result.stdout.trim().split("\n");
  return new Map(outputs.map((out, index) => {
    const drv = lines[index]?.trim();
    if (!drv || !drv.endsWith(".drv")) {
      throw new ReleaseError(
        `nix does not know which derivation built ${out} (copied in without one), so it cannot be rebuilt: delete it from the store (nix-store --delete) and rerun`,
      );
    }
    return [out, drv];
  }));
}

const NOT_DETERMINISTIC = /output '([^']+)' differs from '([^']+)'/g;
const KEPT_BUILD_DIR = /keeping build directory '([^']+)'/g;

/**
 * Builds `drv` again and compares it with its outputs in the store. Returns the outputs that
 * came out different, each with the path of its rebuilt copy. Nix signals a difference with
 * a message (and exit status 104 on 2.8), so the message decides, not the status.
 */
async function checkDerivation(
  drv: string,
  leftovers: CheckLeftovers,
): Promise<Map<string, string>> {
  log(`Rebuilding ${drv}`);
  const result = await $`nix-store --realise --check --keep-failed ${drv}`.quiet().nothrow();
  for (const [, dir] of result.stderr.matchAll(KEPT_BUILD_DIR)) {
    if (path.isAbsolute(dir) && /^nix-build-.+-\d+$/.test(path.basename(dir))) {
      leftovers.buildDirs.push(dir);
    }
  }
  const differing = new Map<string, string>();
  for (const [, out, copy] of result.stderr.matchAll(NOT_DETERMINISTIC)) {
    if (copy !== `${out}.check`) continue;
    leftovers.storeCopies.push(copy);
    differing.set(out, copy);
  }
  if (result.exitCode !== 0 && differing.size === 0) {
    throw new ReleaseError(`rebuilding ${drv} failed:\n${nixErrorTail(result.stderr)}`);
  }
  for (const copy of differing.values()) {
    if (!(await fs.lstat(copy).catch(() => undefined))) {
      throw new ReleaseError(`nix reported a different rebuild at ${copy} but did not keep it`);
    }
  }
  return differing;
}

/** Removes what the checks left; what cannot be removed is named, never fatal. */
async function removeLeftovers(leftovers: CheckLeftovers): Promise<void> {
  if (leftovers.storeCopies.length > 0) {
    const result = await $`nix-store --delete ${leftovers.storeCopies}`.quiet().nothrow();
    for (const copy of leftovers.storeCopies) {
      if (await fs.lstat(copy).catch(() => undefined)) {
        log(`Could not remove the rebuilt copy ${copy} (${nixErrorTail(result.stderr, 1)})`);
      }
    }
  }
  for (const dir of leftovers.buildDirs) {
    await fs.rm(dir, { recursive: true, force: true }).catch((error: Error) =>
      log(`Could not remove the build directory ${dir}: ${error.message}`)
    );
  }
}

/** The verdict on one asset. */
export type AssetCheck =
  | { name: string; result: "identical"; sha256: string }
  | { name: string; result: "different"; expected: string; actual: string; storeSha256?: string }
  /** In the release, but the rebuild did not produce it. */
  | { name: string; result: "missing"; expected: string }
  /** Produced by the rebuild, but not in the release: noted, not a failure. */
  | { name: string; result: "unlisted"; actual: string };

/** One check per asset of the release and per rebuilt file it lacks, sorted by name. */
export function compareRebuild(
  expected: Map<string, string>,
  rebuilt: RebuiltAsset[],
): AssetCheck[] {
  const byName = new Map(rebuilt.map((asset) => [asset.name, asset]));
  const checks: AssetCheck[] = [...expected].map(([name, sha256]): AssetCheck => {
    const asset = byName.get(name);
    if (!asset) return { name, result: "missing", expected: sha256 };
    if (asset.sha256 === sha256) return { name, result: "identical", sha256 };
    return {
      name,
      result: "different",
      expected: sha256,
      actual: asset.sha256,
      ...(asset.storeSha256 ? { storeSha256: asset.storeSha256 } : {}),
    };
  });
  for (const asset of rebuilt) {
    if (!expected.has(asset.name)) {
      checks.push({ name: asset.name, result: "unlisted", actual: asset.sha256 });
    }
  }
  return checks.sort((a, b) => a.name < b.name ? -1 : a.name > b.name ? 1 : 0);
}

/** A release's verification, as it is reported. */
export interface Verification {
  tag: string;
  commit: string;
  system: string;
  checks: AssetCheck[];
}

function rebuildsIdentically(checks: AssetCheck[]): boolean {
  return checks.every((check) => check.result === "identical" || check.result === "unlisted");
}

/** 0 when every asset of the release rebuilt identically, else 1. */
export function verificationExitCode(verification: Verification): 0 | 1 {
  return rebuildsIdentically(verification.checks) ? 0 : 1;
}

/** One line per asset, for stdout. */
export function renderVerification(verification: Verification): string {
  return verification.checks.map((check) => {
    switch (check.result) {
      case "identical":
        return `identical  ${check.name}  ${check.sha256}`;
      case "different":
        return `different  ${check.name}  release ${check.expected}  rebuilt ${check.actual}${
          check.storeSha256 && check.storeSha256 !== check.actual
            ? `  (not deterministic: the store's earlier build has ${check.storeSha256})`
            : ""
        }`;
      case "missing":
        return `missing    ${check.name}  release ${check.expected}  (the rebuild did not produce it)`;
      case "unlisted":
        return `unlisted   ${check.name}  rebuilt ${check.actual}  (not in the release; not a failure)`;
    }
  }).map((line) => `${line}\n`).join("");
}

/** The one line that sums a verification up, for stderr and the step summary. */
export function verificationVerdict(verification: Verification): string {
  const { tag, commit, checks } = verification;
  const count = (result: AssetCheck["result"]) => checks.filter((c) => c.result === result).length;
  const assets = checks.length - count("unlisted");
  if (rebuildsIdentically(checks)) {
    return `${tag} rebuilds identically from commit ${commit}: ${assets} of ${assets} files`;
  }
  return `${tag} does NOT rebuild identically from commit ${commit}: ${
    count("different")
  } different and ${count("missing")} missing of ${assets} files`;
}

/** The `--json` document. */
export function verificationJson(verification: Verification): {
  tag: string;
  commit: string;
  system: string;
  identical: boolean;
  assets: AssetCheck[];
} {
  const { tag, commit, system, checks } = verification;
  return { tag, commit, system, identical: rebuildsIdentically(checks), assets: checks };
}

/** A table for GITHUB_STEP_SUMMARY. */
export function verificationSummary(verification: Verification): string {
  const sum = (sha256: string | undefined) => sha256 ? `\`${sha256}\`` : "";
  const rows = verification.checks.map((check) => {
    switch (check.result) {
      case "identical":
        return `| ${check.name} | identical | ${sum(check.sha256)} | ${sum(check.sha256)} |`;
      case "different":
        return `| ${check.name} | **different** | ${sum(check.expected)} | ${sum(check.actual)} |`;
      case "missing":
        return `| ${check.name} | **missing** | ${sum(check.expected)} | |`;
      case "unlisted":
        return `| ${check.name} | not in the release | | ${sum(check.actual)} |`;
    }
  });
  return [
    `### Verify ${verification.tag} (${verification.system})`,
    "",
    verificationVerdict(verification),
    "",
    "| asset | result | release sha256 | rebuilt sha256 |",
    "|---|---|---|---|",
    ...rows,
    "",
  ].join("\n");
}

// ---------------------------------------------------------------------------------------------
// 10. prune: delete old boot-dev releases and stale drafts, never a published boot-v*
// ---------------------------------------------------------------------------------------------

/** The parts of a release that prune judges. */
export type PruneRelease =
  & Pick<Release, "id" | "tag_name" | "draft" | "created_at" | "published_at">
  & { assets: Pick<Attachment, "size" | "created_at">[] };

/** One deletion: the release first (which deletes its assets), then its tag. */
export interface PruneDeletion {
  tag: string;
  /** Absent for a tag whose release is already gone. */
  releaseId?: number;
  draft: boolean;
  /** Days since the release last changed; absent for a tag alone. */
  ageDays?: number;
  bytes: number;
  /** Delete the git tag after the release (Forgejo refuses, 409, while a release holds it). */
  deleteTag: boolean;
  why: string;
}

export interface PrunePlan {
  /** Oldest first, so an interrupted run has removed the oldest. */
  deletions: PruneDeletion[];
  /** The boot-* releases left alone, and why. */
  kept: { tag: string; why: string }[];
}

const DAY_MS = 24 * 60 * 60 * 1000;

/**
 * When a release last changed: the newest of its creation, publication and uploads (a draft
 * being assembled gains assets; a published release's dates move to the publish time).
 * Undefined when Forgejo gave no readable date.
 */
function lastChange(release: PruneRelease): number | undefined {
  const times = [
    release.created_at,
    release.published_at,
    ...release.assets.map((asset) => asset.created_at),
  ]
    .map((text) => text === undefined ? NaN : Date.parse(text))
    .filter((time) => Number.isFinite(time));
  return times.length > 0 ? Math.max(...times) : undefined;
}

/**
 * Which releases and tags to delete:
 * - published `boot-dev-*` releases beyond the `keep` newest, with their tags;
 * - drafts of any `boot-*` tag that have not changed for `staleDays` days (what interrupted
 *   runs leave); a draft has no git tag until it is published, so only a `boot-dev-*` tag
 *   of that name is deleted with it;
 * - `boot-dev-*` tags whose release is gone (a run stopped between the two deletions).
 * Never a published `boot-v*` release or its tag, a younger draft (another job may be
 * assembling it), or a release without a readable date. `tags` undefined: tags unknown.
 */
export function planPrune(
  releases: PruneRelease[],
  tags: Pick<Tag, "name">[] | undefined,
  now: Date,
  keep: number,
  staleDays: number,
): PrunePlan {
  if (!Number.isInteger(keep) || keep < 0) {
    throw new UsageError(`keep ${keep} releases? give a whole number, 0 or more`);
  }
  if (!Number.isFinite(staleDays) || staleDays < 1) {
    throw new UsageError(
      `a draft is stale after ${staleDays} days? give 1 or more: a younger draft may be in progress`,
    );
  }
  const tagNames = tags && new Set(tags.map((tag) => tag.name));
  const hasTag = (name: string) => tagNames === undefined || tagNames.has(name);
  const ageOf = (time: number) => (now.getTime() - time) / DAY_MS;
  const deletions: PruneDeletion[] = [];
  const kept: PrunePlan["kept"] = [];
  const remove = (release: PruneRelease, age: number, deleteTag: boolean, why: string) =>
    deletions.push({
      tag: release.tag_name,
      releaseId: release.id,
      draft: release.draft,
      ageDays: age,
      bytes: release.assets.reduce((total, asset) => total + asset.size, 0),
      deleteTag,
      why,
    });

  const devReleases: { release: PruneRelease; changed: number }[] = [];
  for (const release of releases) {
    const tag = release.tag_name;
    if (!tag.startsWith("boot-")) continue;
    const changed = lastChange(release);
    if (changed === undefined) {
      kept.push({ tag, why: "Forgejo gave no date to judge its age by" });
    } else if (release.draft) {
      const age = ageOf(changed);
      if (age >= staleDays) {
        remove(
          release,
          age,
          tag.startsWith("boot-dev-") && tagNames !== undefined && tagNames.has(tag),
          `draft unchanged for ${Math.floor(age)} days (stale after ${staleDays})`,
        );
      } else {
        kept.push({ tag, why: `draft changed ${ageText(age)} ago: it may still be assembled` });
      }
    } else if (tag.startsWith("boot-dev-")) {
      devReleases.push({ release, changed });
    } else {
      kept.push({
        tag,
        why: tag.startsWith("boot-v") ? "a published boot-v* release" : "published, not boot-dev-*",
      });
    }
  }
  devReleases.sort((a, b) => b.changed - a.changed || b.release.id - a.release.id);
  devReleases.forEach(({ release, changed }, index) => {
    if (index < keep) {
      kept.push({ tag: release.tag_name, why: `one of the ${keep} newest boot-dev releases` });
    } else {
      remove(
        release,
        ageOf(changed),
        hasTag(release.tag_name),
        keep === 0
          ? "no boot-dev release is kept"
          : `older than the ${keep} newest boot-dev releases`,
      );
    }
  });

  deletions.sort((a, b) => (b.ageDays ?? 0) - (a.ageDays ?? 0));
  const released = new Set(releases.map((release) => release.tag_name.toLowerCase()));
  for (const name of tagNames ?? []) {
    if (name.startsWith("boot-dev-") && !released.has(name.toLowerCase())) {
      deletions.push({
        tag: name,
        draft: false,
        bytes: 0,
        deleteTag: true,
        why: "a tag left behind by a release deleted earlier",
      });
    }
  }
  return { deletions, kept };
}

function ageText(days: number): string {
  if (days < 1) return "under a day";
  const whole = Math.floor(days);
  return `${whole} day${whole === 1 ? "" : "s"}`;
}

/** The line printed for one deletion, once it is done (or, with --dry-run, planned). */
export function renderPruneDeletion(deletion: PruneDeletion, dryRun: boolean): string {
  const verb = dryRun ? "Would delete" : "Deleted";
  if (deletion.releaseId === undefined) {
    return `${verb} tag ${deletion.tag}: ${deletion.why}`;
  }
  const what = deletion.draft ? "draft" : "release";
  const age = deletion.ageDays === undefined ? "age unknown" : `${ageText(deletion.ageDays)} old`;
  const tag = deletion.deleteTag ? " and its tag" : "";
  return `${verb} ${what} ${deletion.tag}${tag} (${age}, ${
    formatBytes(deletion.bytes)
  }): ${deletion.why}`;
}

/** The closing line: how much the done (or planned) deletions free. */
export function renderPruneTotal(done: PruneDeletion[], dryRun: boolean): string {
  const bytes = done.reduce((total, deletion) => total + deletion.bytes, 0);
  const releases = done.filter((deletion) => deletion.releaseId !== undefined).length;
  const tagsOnly = done.length - releases;
  const counted = `${releases} release${releases === 1 ? "" : "s"}${
    tagsOnly > 0 ? ` and ${tagsOnly} tag${tagsOnly === 1 ? "" : "s"}` : ""
  }`;
  if (done.length === 0) return "Nothing to prune";
  return dryRun
    ? `Would free ${formatBytes(bytes)} from ${counted}; --dry-run deleted nothing`
    : `Freed ${formatBytes(bytes)} from ${counted}`;
}

if (import.meta.main) {
  try {
    await main(Deno.args, Deno.env.toObject());
  } catch (error) {
    const known = error instanceof UsageError || error instanceof ReleaseError;
    const message = known
      ? (error as Error).message
      : `unexpected error: ${(error as Error)?.stack ?? error}`;
    log(`release-boot: ${message}`);
    if (inCI) log(`::error::${message.split("\n")[0]}`);
    Deno.exit(error instanceof UsageError ? 2 : 1);
  }
}

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
import { constants as fsConstants, createReadStream } from "node:fs";
import * as fs from "node:fs/promises";
import * as path from "node:path";
import process from "node:process";
import { Readable } from "node:stream";
import { Worker } from "node:worker_threads";
import { Agent, type Dispatcher, interceptors, request, type RetryHandler } from "undici";
import * as v from "valibot";
import { $, minimist, sleep } from "zx";
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
  TagListSchema,
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
/** SHA256SUMS, its signature and manifest.json: the release's index, never listed in it. */
const INDEX_NAMES = new Set([SUMS_NAME, `${SUMS_NAME}.sig`, MANIFEST_NAME]);
const DEFAULT_MIRRORS = "https://codeberg.org";
/** prune's retention: the newest boot-dev releases kept, and when a draft is abandoned. */
const PRUNE_KEEP = 5;
const PRUNE_STALE_DAYS = 7;
const READ_SIZE = 1 << 20;
const MAX_HASH_WORKERS = 4;

// ---------------------------------------------------------------------------------------------
// The runbook
// ---------------------------------------------------------------------------------------------

async function main(argv: string[], env: Env): Promise<void> {
  configureOutput(env);
  if (argv.includes("--help") || argv.includes("-h")) return printHelp();
  hideSecretsFromChildren(env);
  const options = await readOptions(argv, env);
  if (options.command === "fetch") return await fetchForBoot(options, env);
  if (options.command === "verify") return await verifyRelease(options, env);
  if (options.command === "prune") return await pruneReleases(options, env);

  const forgejo = options.site && !options.dryRun
    ? connectForgejo(
      refuseMirror(options.site, options.mirrors),
      requireToken(options, env),
      options,
    )
    : undefined;
  if (!forgejo && !options.dryRun) await refuseForeignOut(options.out);
  const repository = forgejo && await step("Check Forgejo", () => checkForgejo(forgejo));
  if (forgejo && options.finalize) return await finalizeRelease(forgejo, options, env);

  const flake = await step("Read the flake", () => readFlake(options));
  if (forgejo) refuseUntrustedFlake(flake, options);
  const builds = await step("Build", () => buildTargets(options));
  const products = await collectProducts(builds);
  const hashed = await step("Hash", () => hashProducts(products));
  const assets = await pointIpxeAtRelease(hashed, downloadBase(options, repository));
  const bundle = bundleRelease(assets, describeRelease(options, flake, assets));

  if (options.dryRun) return printPlan(bundle, options);
  if (!forgejo) return await stageLocally(bundle, options);

  await step("Check the tag", () => refuseTagOnOtherCommit(forgejo, options));
  const draft = await step(
    "Find or create the draft",
    () => findOrCreateDraft(forgejo, options, bundle),
  );
  const plan = planUploads(
    bundle.files,
    draft.assets,
    await readRecordedSums(forgejo, draft),
    draft.draft,
    options.replace,
  );
  refuseConflicts(plan, draft, options);
  await step("Upload", () => uploadPlanned(forgejo, draft, plan));
  await step("Write checksums", () => writeIndex(forgejo, draft, bundle, plan, options));
  const release = await step("Publish", () => publishWhenComplete(forgejo, draft, options));
  await reportRelease(release, bundle.manifest, env);
}

// ---------------------------------------------------------------------------------------------
// Errors: one failure model. Every message is one sentence that names the thing and the fix.
// ---------------------------------------------------------------------------------------------

/** Bad flags or environment: exit 2, and nothing was done. */
export class UsageError extends Error {}
/** The release could not be made as asked: exit 1, nothing half-done visible. */
export class ReleaseError extends Error {}

// ---------------------------------------------------------------------------------------------
// Output: progress and problems on stderr, results on stdout, secrets never shown
// ---------------------------------------------------------------------------------------------

const output = { ci: false, secrets: [] as string[] };

function configureOutput(env: Env): void {
  output.ci = env.CI === "true" || env.GITHUB_ACTIONS === "true";
}

/** Registers a secret: masked by the CI log, and replaced by *** in everything we print. */
function mask(secret: string): void {
  // The mask command is the one line that must carry the secret itself.
  if (output.ci) console.error(`::add-mask::${secret}`);
  output.secrets.push(secret);
}

function redact(text: string): string {
  return output.secrets.reduce((out, secret) => out.replaceAll(secret, "***"), text);
}

/** Progress and problems, for people: stderr. */
function log(message: string): void {
  console.error(redact(message));
}

/** The result a caller may capture (a URL, a directory, a plan): stdout. */
function result(line: string): void {
  console.log(redact(line));
}

/** Rewrites the current terminal line: upload progress bars. */
function drawProgress(line: string): void {
  Deno.stderr.writeSync(new TextEncoder().encode(redact(line)));
}

async function step<T>(title: string, work: () => Promise<T>): Promise<T> {
  log(output.ci ? `::group::${title}` : `==> ${title}`);
  try {
    return await work();
  } finally {
    if (output.ci) log("::endgroup::");
  }
}

function formatBytes(bytes: number): string {
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
// 1. Flags and environment
// ---------------------------------------------------------------------------------------------

type Env = Record<string, string | undefined>;

/** Where releases live: a Forgejo base URL and a repository on it. */
interface Site {
  server: string;
  /** OWNER/NAME, each part valid as Forgejo names them. */
  repo: string;
}

/** How every HTTP request behaves: the tests shrink the delays. */
interface HttpSettings {
  /** A request making no progress for this long fails (then is retried). */
  timeoutMs: number;
  /** The first retry waits about this long; each further one twice as long. */
  retryDelayMs: number;
}

interface CommonOptions {
  /** Servers never published to and never sent the token. */
  mirrors: string[];
  http: HttpSettings;
}

/** Build the images and stage them in `out`, or publish them to `site`. */
interface ReleaseOptions extends CommonOptions {
  command: "release";
  flake: string;
  targets: string[];
  system: string;
  tag: string;
  commit: string;
  /** Absent: no server configured, the release is staged in `out`. */
  site?: Site;
  out: string;
  dryRun: boolean;
  draft: boolean;
  prerelease: boolean;
  replace: boolean;
  finalize: boolean;
  allowDirty: boolean;
  ciRun?: string;
  /** Signs SHA256SUMS wherever this run writes it; then a release needs its signature. */
  signingKey?: SigningKey;
}

/** Download a published release's boot files into `out/<tag>`, then point `out/current` at it. */
interface DownloadOptions extends CommonOptions {
  command: "fetch";
  rollback: false;
  site: Site;
  /** A tag, or "latest": the newest published boot-v* release. */
  tag: string;
  out: string;
  targets: string[];
  system: string;
  /** From --trust: SHA256SUMS.sig must verify against one of these, or nothing is changed. */
  trust?: TrustedKey[];
  /** Tag directories kept in `out`, current and previous always among them. */
  keep: number;
}

/** Rebuild a published release from its commit and compare its files with SHA256SUMS. */
interface VerifyOptions extends CommonOptions {
  command: "verify";
  site: Site;
  /** A tag, or "latest": the newest published boot-v* release. */
  tag: string;
  /** Absent: the release's commit, fetched from the repository it was published to. */
  flake?: string;
  /** Absent: the release's only system. */
  system?: string;
  /** An allowed_signers file: SHA256SUMS must then carry a signature by one of its keys. */
  trust?: string;
  json: boolean;
}

/** Delete old boot-dev releases and stale drafts. */
interface PruneOptions extends CommonOptions {
  command: "prune";
  site: Site;
  keep: number;
  staleDays: number;
  dryRun: boolean;
}

/** Point `out/current` back at `out/previous`, with no network. */
interface RollbackOptions extends CommonOptions {
  command: "fetch";
  rollback: true;
  out: string;
}

type FetchOptions = DownloadOptions | RollbackOptions;

export type Options = ReleaseOptions | FetchOptions | VerifyOptions | PruneOptions;

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
  "trust",
  "keep",
  "stale-drafts",
  "signing-key",
] as const;
const BOOLEAN_FLAGS = [
  "dry-run",
  "draft",
  "prerelease",
  "replace",
  "finalize",
  "allow-dirty",
  "json",
  "rollback",
] as const;
type StringFlag = typeof STRING_FLAGS[number];
type BooleanFlag = typeof BOOLEAN_FLAGS[number];

const HELP = `release-boot: build a flake's NixOS boot images and publish them as a Forgejo release.

Usage:
  deno task release [flags]            (same as ./scripts/release-boot.ts [flags])
  deno task release fetch --server URL --repo OWNER/NAME --tag TAG|latest --out DIR
                    [--trust FILE] [--keep N] [--targets netboot] [--system x86_64-linux]
  deno task release fetch --rollback --out DIR
  deno task release verify --server URL --repo OWNER/NAME --tag TAG|latest [--flake REF]
                    [--system S] [--trust FILE] [--json]
  deno task release prune --server URL --repo OWNER/NAME [--keep N] [--stale-drafts DAYS]
                    [--dry-run]

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
  --out DIR          where a local stage goes (default dist/<tag>); it must be new, empty,
                     or an earlier stage: anything else is refused before the build
  --dry-run          build and hash, print the plan, write nothing anywhere
  --draft            upload everything but leave the release a draft (multi-job releases)
  --prerelease       mark the release a pre-release (boot-dev-* tags always are)
  --replace          when an asset differs from the one already in the release, store the
                     new bytes and the new SHA256SUMS, then delete the old copies
  --finalize         build nothing: check that every asset of the draft for the tag is
                     covered by its SHA256SUMS, then publish it (the last job of a matrix)
  --signing-key FILE sign SHA256SUMS (SHA256SUMS.sig, an SSH signature) with this unencrypted
                     ssh-ed25519 key; or give the key's text in RELEASE_BOOT_SIGNING_KEY
  --allow-dirty      publish even from a git checkout with uncommitted changes or a flake
                     whose inputs are not locked (recorded in manifest.json)
  --timeout SECONDS  a request making no progress this long fails, then is retried (default
                     600); a whole request, tries included, ends after five times this plus
                     1 s per MiB it carries
  --mirrors LIST     comma-separated server URLs never published to and never sent the
                     token (default "${DEFAULT_MIRRORS}": the mirror only distributes)
  --help             this text

fetch downloads a published release's files for the targets (default netboot) into DIR/TAG,
checks each against the release's SHA256SUMS before it gets its final name (a mismatch is
deleted), resumes an interrupted download, writes netboot.ipxe to load kernel and initrd from
beside it, and only then points the symlink DIR/current at DIR/TAG (DIR/previous keeps the
one before), so an HTTP server serving DIR/current never sees a half-made directory.
"latest" is the newest published boot-v* release. A token is optional for a public repository.
  --trust FILE       allowed_signers (or ssh-ed25519 public key lines): SHA256SUMS.sig must be
                     signed by one of its keys, else nothing under DIR changes
  --keep N           tag directories to keep in DIR (default 3; current and previous stay)
  --rollback         point DIR/current back at DIR/previous; no network

verify rebuilds a published release from the commit its manifest.json names and compares
every file with its SHA256SUMS: one line per file on stdout (identical, different with both
sums, missing), the JSON with --json, the verdict on stderr. --flake (default: the release's
tag and commit fetched from the repository, git+URL?ref=refs/tags/TAG&rev=COMMIT) must be
at that commit: a clean checkout of it, or a reference pinned with ?rev=. --trust FILE
(allowed_signers) requires SHA256SUMS.sig by one of its keys. Exit 0 when every file is
identical, 1 when any differs or is missing (or the release cannot be checked).

prune deletes published boot-dev-* releases beyond the --keep newest (default ${PRUNE_KEEP}) with
their tags, drafts unchanged for --stale-drafts days (default ${PRUNE_STALE_DAYS}) and boot-dev-*
tags whose release is gone. A published boot-v* release is never deleted. It needs a token
that can write releases; --dry-run prints what it would delete and deletes nothing. An
interrupted prune leaves every release it did not reach whole: rerun it.

Environment:
  FORGEJO_TOKEN      token with write access to the repository's releases
  GITHUB_TOKEN       used when FORGEJO_TOKEN is unset (the workflow token)
  GITHUB_SERVER_URL, GITHUB_REPOSITORY, GITHUB_SHA, GITHUB_REF_TYPE, GITHUB_REF_NAME,
  GITHUB_RUN_ID      defaults for the flags above, set by Forgejo Actions
  GITHUB_OUTPUT      receives release-url, tag and release-id
  GITHUB_STEP_SUMMARY receives a table of the assets
  RELEASE_BOOT_SIGNING_KEY  the signing key's text (a CI secret), instead of --signing-key
  RELEASE_BOOT_RETRY_DELAY_MS  first retry delay in milliseconds (default 500)

Examples:
  deno task release --flake path:./test/fixture --targets netboot,iso
  deno task release --dry-run --targets netboot
  FORGEJO_TOKEN=... deno task release --server https://git.example.org --repo ops/runners \\
      --tag boot-v1.2.0
  deno task release --targets netboot --draft --tag boot-v1.2.0   # one job of a matrix
  deno task release --finalize --tag boot-v1.2.0                   # the job after it
  deno task release fetch --server https://git.example.org --repo ops/runners \\
      --tag latest --out /srv/netboot --trust /etc/release-boot/allowed_signers
  deno task release fetch --rollback --out /srv/netboot
  deno task release verify --server https://git.example.org --repo ops/runners --tag latest
  FORGEJO_TOKEN=... deno task release prune --server https://git.example.org \\
      --repo ops/runners --dry-run

Reruns are safe: assets already in the release with the same size and checksum are skipped,
an interrupted run leaves a draft that the next run completes, and a finished release is
left untouched. stdout carries only the release URL (or, staged, the directory).

Exit status: 0 done, 1 failed (nothing half-done is visible), 2 bad usage.`;

function printHelp(): void {
  result(HELP);
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

/**
 * Forgejo's rules for the two halves of OWNER/NAME (models/user and models/repo): an owner is
 * letters, digits, "-", "_", "." with no two of the latter in a row and none at either end; a
 * repository name is letters, digits, "-", "_", "." but never "." or "..", nor ending in
 * ".git" or ".wiki". Anything else could only reach another API route.
 */
export function repoProblem(repo: string): string | undefined {
  const parts = repo.split("/");
  if (parts.length !== 2) return "a repository is written OWNER/NAME";
  const [owner, name] = parts;
  if (!/^[A-Za-z0-9](?:[A-Za-z0-9_.-]*[A-Za-z0-9])?$/.test(owner) || /[-._]{2}/.test(owner)) {
    return `the owner ${JSON.stringify(owner)} is not a Forgejo user or organisation name`;
  }
  if (!/^[A-Za-z0-9_.-]+$/.test(name) || /^\.+$/.test(name) || /\.(git|wiki)$/i.test(name)) {
    return `the name ${JSON.stringify(name)} is not a Forgejo repository name`;
  }
  return undefined;
}

/** A schema that accepts a string when `problem` finds nothing wrong with it. */
function ruled(problem: (text: string) => string | undefined) {
  return v.pipe(
    v.string(),
    v.rawCheck(({ dataset, addIssue }) => {
      const found = dataset.typed ? problem(dataset.value) : undefined;
      if (found) addIssue({ message: found });
    }),
  );
}

const TagFlagSchema = ruled((tag) => {
  const problem = tagProblem(tag);
  return problem && `${problem} (git's tag rules); use e.g. boot-v1.2.0`;
});
const RepoFlagSchema = ruled(repoProblem);
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
const ServerFlagSchema = v.pipe(
  ruled(serverProblem),
  v.transform((url) => url.replace(/\/+$/, "")),
);
const FlakeFlagSchema = v.pipe(
  v.string(),
  v.minLength(1, "it is empty"),
  v.check((ref) => !ref.includes("#"), "give the flake without #: targets are chosen by --targets"),
);
const WholeNumberSchema = (unit: string, min: number) =>
  v.pipe(
    v.string(),
    v.transform(Number),
    v.number(`it is not a number of ${unit}`),
    v.integer(`it is not a whole number of ${unit}`),
    v.minValue(min, `it must be at least ${min} ${unit}`),
  );
const TimeoutFlagSchema = WholeNumberSchema("seconds", 1);
const KeepTagsFlagSchema = WholeNumberSchema("tag directories", 1);
const RetryDelaySchema = WholeNumberSchema("milliseconds", 0);
/**
 * A token is one opaque word. Whitespace or a control character (a pasted newline, a CR from
 * a Windows file) would only ever produce a confusing "invalid header" error, retried.
 */
const TokenSchema = v.pipe(
  v.string(),
  // deno-lint-ignore no-control-regex
  v.regex(/^[^\s\x00-\x1f\x7f]+$/, "contains whitespace or a control character"),
);

export function serverProblem(text: string): string | undefined {
  let url: URL;
  try {
    url = new URL(text);
  } catch {
    return "it is not a URL; give the Forgejo base URL, e.g. https://git.example.org";
  }
  if (url.protocol !== "https:" && !(url.protocol === "http:" && isLoopback(url))) {
    return "use https (plain http only for localhost)";
  }
  if (url.username || url.password) return "it must not carry credentials; use FORGEJO_TOKEN";
  if (url.search || url.hash) return "it must not have a query or fragment";
  return undefined;
}

function isLoopback(url: URL): boolean {
  const host = url.hostname.replace(/\.$/, "");
  return host === "localhost" || host === "[::1]" || /^127(\.\d{1,3}){3}$/.test(host);
}

/** Reads one value through its schema; a failure is a UsageError naming where it came from. */
function parseFlag<T>(
  flag: string,
  schema: v.GenericSchema<string, T>,
  value: string,
  origin = `--${flag}`,
): T {
  const parsed = v.safeParse(schema, value);
  if (parsed.success) return parsed.output;
  throw new UsageError(`bad ${origin} ${JSON.stringify(value)}: ${parsed.issues[0].message}`);
}

/** The command line as given: every flag declared, unknown ones refused. */
interface Flags {
  value(name: StringFlag): string | undefined;
  on(name: BooleanFlag): boolean;
  /** Names of the flags given, for refusing those a command does not take. */
  given: string[];
}

function readFlags(args: string[]): Flags {
  const parsed = minimist(args, {
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
  return {
    value(name) {
      const value = parsed[name];
      if (Array.isArray(value)) throw new UsageError(`--${name} is given more than once`);
      if (value === "") throw new UsageError(`--${name} needs a value; see --help`);
      return value;
    },
    on: (name) => parsed[name] === true,
    given: [...STRING_FLAGS, ...BOOLEAN_FLAGS].filter((name) =>
      parsed[name] !== undefined && parsed[name] !== false
    ),
  };
}

/** A flag, else the environment variable Forgejo Actions sets for it; parsed by `schema`. */
function flagOrEnv<T>(
  flags: Flags,
  name: StringFlag,
  env: Env,
  variable: string,
  schema: v.GenericSchema<string, T>,
): T | undefined {
  const given = flags.value(name);
  const value = given ?? (env[variable] || undefined);
  return value === undefined
    ? undefined
    : parseFlag(name, schema, value, given === undefined ? variable : `--${name}`);
}

/** Flags and environment become Options, or a UsageError before any work is done. */
export async function readOptions(argv: string[], env: Env): Promise<Options> {
  const command = COMMANDS.find((name) => name === argv[0]);
  const fetching = command === "fetch";
  const flags = readFlags(command ? argv.slice(1) : argv);
  const common: CommonOptions = {
    mirrors: (flags.value("mirrors") ?? DEFAULT_MIRRORS).split(",").map((url) => url.trim()),
    http: {
      timeoutMs: 1000 * parseFlag("timeout", TimeoutFlagSchema, flags.value("timeout") ?? "600"),
      retryDelayMs: parseFlag(
        "retry delay",
        RetryDelaySchema,
        env.RELEASE_BOOT_RETRY_DELAY_MS || "500",
        "RELEASE_BOOT_RETRY_DELAY_MS",
      ),
    },
  };
  refuseForeignFlags(command ?? "release", flags);
  if (command === "verify") return verifyOptions(flags, env, common);
  if (command === "prune") return pruneOptions(flags, env, common);
  return fetching
    ? await fetchOptions(flags, env, common)
    : await releaseOptions(flags, env, common);
}

/** The commands named by the first argument; without one, release. */
const COMMANDS = ["fetch", "verify", "prune"] as const;
const COMMON_FLAGS = ["server", "repo", "timeout", "mirrors"];
/** The flags each command takes; any other is refused rather than silently ignored. */
const COMMAND_FLAGS: Record<"release" | typeof COMMANDS[number], string[]> = {
  release: [
    ...COMMON_FLAGS,
    ...["flake", "targets", "system", "tag", "commit", "out", "signing-key"],
    ...["dry-run", "draft", "prerelease", "replace", "finalize", "allow-dirty"],
  ],
  fetch: [...COMMON_FLAGS, "targets", "system", "tag", "out", "trust", "keep", "rollback"],
  verify: [...COMMON_FLAGS, "tag", "flake", "system", "trust", "json"],
  prune: [...COMMON_FLAGS, "keep", "stale-drafts", "dry-run"],
};

function refuseForeignFlags(command: keyof typeof COMMAND_FLAGS, flags: Flags): void {
  const misplaced = flags.given.find((name) => !COMMAND_FLAGS[command].includes(name));
  if (!misplaced) return;
  const takers = Object.entries(COMMAND_FLAGS)
    .filter(([, names]) => names.includes(misplaced))
    .map(([taker]) => taker);
  const list = takers.length > 1
    ? `${takers.slice(0, -1).join(", ")} and ${takers.at(-1)}`
    : takers[0];
  throw new UsageError(`--${misplaced} is a flag of ${list}, not of ${command}; see --help`);
}

async function releaseOptions(
  flags: Flags,
  env: Env,
  common: CommonOptions,
): Promise<ReleaseOptions> {
  const server = flagOrEnv(flags, "server", env, "GITHUB_SERVER_URL", ServerFlagSchema);
  const repo = flagOrEnv(flags, "repo", env, "GITHUB_REPOSITORY", RepoFlagSchema);
  if (server && !repo) {
    throw new UsageError(
      "no repository to publish to: pass --repo OWNER/NAME (or set GITHUB_REPOSITORY)",
    );
  }
  if (flags.on("finalize") && !server) {
    throw new UsageError(
      "--finalize publishes a draft on Forgejo: pass --server (or set GITHUB_SERVER_URL)",
    );
  }
  if (flags.on("finalize") && flags.on("draft")) {
    throw new UsageError("--finalize publishes the draft; it cannot be combined with --draft");
  }
  const commit = flagOrEnv(flags, "commit", env, "GITHUB_SHA", CommitFlagSchema) ??
    parseFlag("commit", CommitFlagSchema, await gitHead(), "commit");
  const tag = (flags.value("tag") === undefined && env.GITHUB_REF_TYPE !== "tag")
    ? `boot-dev-${commit.slice(0, 12)}`
    : flagOrEnv(flags, "tag", env, "GITHUB_REF_NAME", TagFlagSchema) ??
      `boot-dev-${commit.slice(0, 12)}`;
  return {
    command: "release",
    flake: parseFlag("flake", FlakeFlagSchema, flags.value("flake") ?? "."),
    targets: parseFlag("targets", TargetsFlagSchema, flags.value("targets") ?? "netboot,iso"),
    system: parseFlag("system", SystemFlagSchema, flags.value("system") ?? "x86_64-linux"),
    tag,
    commit,
    site: server && repo ? { server, repo } : undefined,
    out: flags.value("out") ?? path.join("dist", tag),
    dryRun: flags.on("dry-run"),
    draft: flags.on("draft"),
    prerelease: flags.on("prerelease") || tag.startsWith("boot-dev-"),
    replace: flags.on("replace"),
    finalize: flags.on("finalize"),
    allowDirty: flags.on("allow-dirty"),
    signingKey: await readSigningKey(flags.value("signing-key"), maskSigningKey(env)),
    ciRun: env.GITHUB_SERVER_URL && env.GITHUB_REPOSITORY && env.GITHUB_RUN_ID
      ? `${
        env.GITHUB_SERVER_URL.replace(/\/+$/, "")
      }/${env.GITHUB_REPOSITORY}/actions/runs/${env.GITHUB_RUN_ID}`
      : undefined,
    ...common,
  };
}

/** `fetch` reads a published release: it needs where, which tag, and where to put it. */
async function fetchOptions(
  flags: Flags,
  env: Env,
  common: CommonOptions,
): Promise<FetchOptions> {
  if (flags.on("rollback")) {
    const extra = flags.given.find((name) => !["rollback", "out"].includes(name));
    if (extra) throw new UsageError(`--rollback takes only --out DIR, not --${extra}`);
    const out = flags.value("out");
    if (!out) throw new UsageError("fetch --rollback needs --out DIR: the boot directory");
    return { command: "fetch", rollback: true, out, ...common };
  }
  const server = flagOrEnv(flags, "server", env, "GITHUB_SERVER_URL", ServerFlagSchema);
  const repo = flagOrEnv(flags, "repo", env, "GITHUB_REPOSITORY", RepoFlagSchema);
  if (!server) throw new UsageError("fetch needs --server URL (or GITHUB_SERVER_URL)");
  if (!repo) throw new UsageError("fetch needs --repo OWNER/NAME (or GITHUB_REPOSITORY)");
  const tag = flags.value("tag") ??
    (env.GITHUB_REF_TYPE === "tag" && env.GITHUB_REF_NAME ? env.GITHUB_REF_NAME : undefined);
  if (!tag) {
    throw new UsageError("fetch needs --tag TAG, or --tag latest for the newest boot-v* release");
  }
  const out = flags.value("out");
  if (!out) {
    throw new UsageError("fetch needs --out DIR: the directory to lay the boot files out in");
  }
  const trustFile = flags.value("trust");
  return {
    command: "fetch",
    rollback: false,
    site: { server, repo },
    tag: tag === "latest" ? tag : parseFlag("tag", TagFlagSchema, tag),
    out,
    targets: parseFlag("targets", TargetsFlagSchema, flags.value("targets") ?? "netboot"),
    system: parseFlag("system", SystemFlagSchema, flags.value("system") ?? "x86_64-linux"),
    trust: trustFile === undefined ? undefined : await readTrust(trustFile),
    keep: parseFlag("keep", KeepTagsFlagSchema, flags.value("keep") ?? "3"),
    ...common,
  };
}

const KeepReleasesFlagSchema = WholeNumberSchema("releases", 0);
const StaleDraftsFlagSchema = WholeNumberSchema("days", 1);

/** `verify` rebuilds one published release: where it is, which tag, and from what flake. */
function verifyOptions(flags: Flags, env: Env, common: CommonOptions): VerifyOptions {
  const server = flagOrEnv(flags, "server", env, "GITHUB_SERVER_URL", ServerFlagSchema);
  const repo = flagOrEnv(flags, "repo", env, "GITHUB_REPOSITORY", RepoFlagSchema);
  if (!server) throw new UsageError("verify needs --server URL (or GITHUB_SERVER_URL)");
  if (!repo) throw new UsageError("verify needs --repo OWNER/NAME (or GITHUB_REPOSITORY)");
  const tag = flags.value("tag");
  if (!tag) {
    throw new UsageError("verify needs --tag TAG, or --tag latest for the newest boot-v* release");
  }
  const flake = flags.value("flake");
  const system = flags.value("system");
  return {
    command: "verify",
    site: { server, repo },
    tag: tag === "latest" ? tag : parseFlag("tag", TagFlagSchema, tag),
    flake: flake === undefined ? undefined : parseFlag("flake", FlakeFlagSchema, flake),
    system: system === undefined ? undefined : parseFlag("system", SystemFlagSchema, system),
    trust: flags.value("trust"),
    json: flags.on("json"),
    ...common,
  };
}

/** `prune` deletes from one repository: where it is, and how much to keep. */
function pruneOptions(flags: Flags, env: Env, common: CommonOptions): PruneOptions {
  const server = flagOrEnv(flags, "server", env, "GITHUB_SERVER_URL", ServerFlagSchema);
  const repo = flagOrEnv(flags, "repo", env, "GITHUB_REPOSITORY", RepoFlagSchema);
  if (!server) throw new UsageError("prune needs --server URL (or GITHUB_SERVER_URL)");
  if (!repo) throw new UsageError("prune needs --repo OWNER/NAME (or GITHUB_REPOSITORY)");
  return {
    command: "prune",
    site: { server, repo },
    keep: parseFlag("keep", KeepReleasesFlagSchema, flags.value("keep") ?? String(PRUNE_KEEP)),
    staleDays: parseFlag(
      "stale-drafts",
      StaleDraftsFlagSchema,
      flags.value("stale-drafts") ?? String(PRUNE_STALE_DAYS),
    ),
    dryRun: flags.on("dry-run"),
    ...common,
  };
}

/** The key's text in the environment is a secret: CI masks it line by line, we print none. */
function maskSigningKey(env: Env): Env {
  for (const line of env[SIGNING_KEY_ENV]?.split("\n") ?? []) {
    if (line.trim().length >= 16 && !line.includes("-----")) mask(line.trim());
  }
  return env;
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

/** Child processes (nix, git) never see a token or key: zx passes $.env to them. */
function hideSecretsFromChildren(env: Env): void {
  $.env = Object.fromEntries(
    Object.entries(env).filter(([name]) => !/TOKEN|SECRET|PASSWORD|KEY/i.test(name)),
  );
}

/** The token from the environment (FORGEJO_TOKEN, else GITHUB_TOKEN), checked and masked. */
function readToken(env: Env): string | undefined {
  const variable = env.FORGEJO_TOKEN ? "FORGEJO_TOKEN" : "GITHUB_TOKEN";
  const token = env[variable] || undefined;
  if (token === undefined) return undefined;
  const parsed = v.safeParse(TokenSchema, token);
  if (!parsed.success) {
    throw new UsageError(
      `${variable} ${parsed.issues[0].message} (a pasted newline?): set it to the token alone`,
    );
  }
  mask(token);
  return token;
}

function requireToken(options: ReleaseOptions, env: Env): string {
  const token = readToken(env);
  if (!token) {
    throw new UsageError(
      "no token: set FORGEJO_TOKEN to a token that can write releases of " +
        `${options.site?.repo} (in a workflow: FORGEJO_TOKEN: \${{ secrets.GITHUB_TOKEN }})`,
    );
  }
  return token;
}

/**
 * The mirror-list entry that `server` falls under. Origins are compared normalised: case,
 * a trailing dot, a default port and IDNA spellings are one host, and every loopback name
 * is one host, so no spelling of a mirror gets the token.
 */
export function mirrorOf(server: string, mirrors: string[]): string | undefined {
  const target = new URL(server);
  return mirrors.find((mirror) => {
    const url = URL.canParse(mirror) ? new URL(mirror) : undefined;
    if (!url || hostKey(url) !== hostKey(target)) return false;
    const base = url.pathname.replace(/\/+$/, "");
    const at = target.pathname.replace(/\/+$/, "");
    return at === base || at.startsWith(`${base}/`);
  });
}

/** scheme://host:port with the host as a server sees it. URL already lowercases and IDNA-encodes. */
function hostKey(url: URL): string {
  const host = isLoopback(url) ? "loopback" : url.hostname.replace(/\.$/, "");
  const port = url.port || (url.protocol === "https:" ? "443" : "80");
  return `${url.protocol}//${host}:${port}`;
}

function refuseMirror(site: Site, mirrors: string[]): Site {
  const mirror = mirrorOf(site.server, mirrors);
  if (mirror) {
    throw new ReleaseError(
      `refusing to publish to ${site.server}: it is on the mirror list (${mirror}), which only distributes releases; publish to the primary Forgejo or change --mirrors`,
    );
  }
  return site;
}
// ---------------------------------------------------------------------------------------------
// 2. Forgejo: one client with verb methods, over one undici Agent with its interceptors
// ---------------------------------------------------------------------------------------------

/** Sizes no real release reaches: a larger body comes from a broken or hostile server. */
const MAX_API_BODY = 16 << 20;
const MAX_INDEX_FILE = 1 << 20;
/** Index copies read from one release: racing jobs leave a few, never dozens. */
const MAX_INDEX_COPIES = 24;
/** Forgejo serves at most 50 per page; 200 pages are 10,000 releases, past any history. */
const PAGE_SIZE = 50;
const MAX_PAGES = 200;
const MAX_REDIRECTS = 5;
/** Tries of one request in all: the first, then four retries. */
const TRIES = 5;
/** Each try of a request carrying a file may take --timeout plus this long per MiB. */
const MS_PER_MIB = 1000;
const RETRY_STATUS = new Set([429, 500, 502, 503, 504]);
/** Failures of the network or the peer, never of this machine (ENAMETOOLONG, bad headers). */
const RETRY_CODES = new Set([
  "ECONNRESET",
  "ECONNREFUSED",
  "EPIPE",
  "ETIMEDOUT",
  "ENETUNREACH",
  "EHOSTUNREACH",
  "EAI_AGAIN",
  "UND_ERR_SOCKET",
  "UND_ERR_CONNECT_TIMEOUT",
  "UND_ERR_HEADERS_TIMEOUT",
  "UND_ERR_BODY_TIMEOUT",
]);
/** What a repeat cannot do twice. POST is not: uploads look before they send again. */
const IDEMPOTENT = ["GET", "HEAD", "PUT", "PATCH", "DELETE"];

type Method = "GET" | "POST" | "PATCH" | "DELETE";

/** An HTTP failure, already explained. `transient` ones were worth retrying. */
class HttpError extends ReleaseError {
  constructor(message: string, readonly transient: boolean, readonly retryAfter?: string) {
    super(message);
  }
}

interface Exchange {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  text: string;
}

interface SendInit {
  body?: string | Uint8Array | Readable;
  headers?: Record<string, string>;
  /** Statuses the caller handles; any other status of 300 or more is an HttpError. */
  expect?: number[];
  maxBytes?: number;
  /** Bytes the request or its answer carries, for the overall deadline. */
  carries?: number;
  /** POST /releases may be repeated: a second create answers 409, which the caller handles. */
  repeatable?: boolean;
}

/** Wait before retry number `attempt` (1-based): Retry-After when given, else exponential. */
function backoffMs(
  http: HttpSettings,
  attempt: number,
  retryAfter?: string | string[],
): number {
  return retryAfterMs(retryAfter) ??
    http.retryDelayMs * 2 ** (attempt - 1) * (0.5 + Math.random());
}

export function retryAfterMs(header: string | string[] | undefined): number | undefined {
  const value = Array.isArray(header) ? header[0] : header;
  if (!value) return undefined;
  const seconds = Number(value);
  const ms = Number.isFinite(seconds) ? seconds * 1000 : Date.parse(value) - Date.now();
  return Number.isFinite(ms) ? Math.min(Math.max(ms, 0), 120_000) : undefined;
}

function isTransient(error: { statusCode?: number; code?: string }): boolean {
  return error.statusCode !== undefined
    ? RETRY_STATUS.has(error.statusCode)
    : RETRY_CODES.has(error.code ?? "");
}

/**
 * undici's retry interceptor with this script's policy: only transient failures, only
 * methods that may repeat, `TRIES` in all, and each retry said out loud.
 */
function retryPolicy(http: HttpSettings): RetryHandler.RetryCallback {
  return (error, { state, opts }, done) => {
    const failure = error as Error & {
      statusCode?: number;
      code?: string;
      headers?: Exchange["headers"];
    };
    const methods = opts.retryOptions?.methods ?? IDEMPOTENT;
    if (!isTransient(failure) || !methods.includes(opts.method) || state.counter >= TRIES) {
      return done(error);
    }
    const delay = backoffMs(http, state.counter, failure.headers?.["retry-after"]);
    const what = `${opts.method} ${String(opts.path).split("?")[0]}`;
    log(
      `${
        failure.statusCode
          ? `Forgejo answered ${failure.statusCode} for ${what}`
          : `${what} failed (${failure.code})`
      }; retrying in ${(delay / 1000).toFixed(1)}s (${state.counter}/${TRIES - 1})`,
    );
    // The handler cancels this timer when the request is aborted.
    return setTimeout(() => done(null), delay);
  };
}

export type Forgejo = ReturnType<typeof connectForgejo>;

/**
 * The Forgejo API as verbs. The token goes only to the server's own origin; on a redirect to
 * any other origin undici's redirect interceptor drops the authorization header (and
 * `headersFor` never adds it to a request for another origin).
 */
function connectForgejo(site: Site, token: string | undefined, settings: CommonOptions) {
  const { http } = settings;
  const origin = new URL(site.server).origin;
  const agent = new Agent({
    connect: { timeout: 30_000 },
    headersTimeout: http.timeoutMs,
    bodyTimeout: http.timeoutMs,
  }).compose(
    // throwOnError: false hands the last answer (its status and error body) to the caller.
    interceptors.retry({
      maxRetries: TRIES - 1,
      methods: IDEMPOTENT,
      retry: retryPolicy(http),
      throwOnError: false,
    }),
    interceptors.redirect({ maxRedirections: MAX_REDIRECTS, throwOnMaxRedirect: true }),
  );
  const [owner, name] = site.repo.split("/");
  const repoPath = `/api/v1/repos/${encodeURIComponent(owner)}/${encodeURIComponent(name)}`;
  const api = (route: string, query: Record<string, string> = {}) => {
    const url = new URL(`${site.server}${route}`);
    for (const [key, value] of Object.entries(query)) url.searchParams.set(key, value);
    return url;
  };
  const repoApi = (route: string, query?: Record<string, string>) =>
    api(`${repoPath}${route}`, query);

  function headersFor(url: URL, extra: Record<string, string> = {}): Record<string, string> {
    const headers: Record<string, string> = { accept: "application/json", ...extra };
    if (token && url.origin === origin) headers.authorization = `token ${token}`;
    return headers;
  }

  /** One request, retried by the interceptor when it may be; its answer read up to a cap. */
  async function send(method: Method, url: URL, init: SendInit = {}): Promise<Exchange> {
    const what = `${method} ${url.pathname}`;
    const deadlineMs = deadlineFor(http, init.carries ?? 0);
    const signal = AbortSignal.timeout(deadlineMs);
    try {
      const options = {
        method,
        body: init.body,
        headers: headersFor(url, init.headers),
        dispatcher: agent,
        signal,
        // Read by retryPolicy: which methods this one request may repeat.
        retryOptions: { methods: init.repeatable ? [...IDEMPOTENT, "POST"] : IDEMPOTENT },
      };
      const response = await request(url, options);
      const text = await readCapped(response.body, init.maxBytes ?? MAX_API_BODY, what);
      const answer = { status: response.statusCode, headers: response.headers, text };
      if (answer.status >= 300 && !(init.expect ?? []).includes(answer.status)) {
        throw new HttpError(
          explainStatus(site, answer, what),
          RETRY_STATUS.has(answer.status),
          String(answer.headers["retry-after"] ?? ""),
        );
      }
      return answer;
    } catch (error) {
      if (error instanceof ReleaseError) throw error;
      if (signal.aborted) {
        throw new HttpError(
          `${what} did not finish within ${
            Math.round(deadlineMs / 1000)
          }s: the server answers too slowly or never ends its answer; check ${site.server}, or raise --timeout`,
          true,
        );
      }
      const failure = error as Error & { code?: string };
      const transient = isTransient(failure);
      throw new HttpError(
        `${what} failed${transient && IDEMPOTENT.includes(method) ? ` ${TRIES} times` : ""} (${
          failure.code ?? failure.name
        }: ${failure.message})`,
        transient,
      );
    }
  }

  async function json<T>(
    schema: v.GenericSchema<unknown, T>,
    method: Method,
    url: URL,
    init: SendInit = {},
  ): Promise<T> {
    const answer = await send(method, url, init);
    return parseAnswer(schema, answer.text, `${method} ${url.pathname}`);
  }

  function parseAnswer<T>(schema: v.GenericSchema<unknown, T>, text: string, what: string): T {
    try {
      return parseJson(schema, text, `Forgejo's answer to ${what}`);
    } catch (error) {
      throw new ReleaseError(`${(error as Error).message}; is ${site.server} a Forgejo server?`);
    }
  }

  /** A JSON request body. */
  const sendJson = (body: unknown): SendInit => ({
    body: JSON.stringify(body),
    headers: { "content-type": "application/json" },
  });

  /**
   * Every item of a paged list, in the server's order. A server that ignores `page` (the same
   * page again), a short or empty page, or the total it announced ends the listing; past
   * MAX_PAGES it is an error, never an endless loop.
   */
  async function listPaged<T>(
    route: string,
    schema: v.GenericSchema<unknown, T[]>,
    keyOf: (item: T) => string | number,
    query: Record<string, string>,
    noun: string,
  ): Promise<T[]> {
    const seen = new Set<string | number>();
    const items: T[] = [];
    let pageSize = PAGE_SIZE;
    for (let page = 1; page <= MAX_PAGES; page++) {
      const url = repoApi(route, { ...query, page: String(page), limit: String(PAGE_SIZE) });
      const answer = await send("GET", url);
      const onPage = parseAnswer(schema, answer.text, `GET ${url.pathname}`);
      const fresh = onPage.filter((item) => !seen.has(keyOf(item)));
      for (const item of fresh) seen.add(keyOf(item));
      items.push(...fresh);
      const total = Number(answer.headers["x-total-count"]);
      // A server may serve fewer than asked: the first page says how many a full page holds.
      if (page === 1 && onPage.length > 0) pageSize = Math.min(onPage.length, PAGE_SIZE);
      const done = fresh.length < onPage.length || onPage.length < pageSize ||
        (Number.isFinite(total) && items.length >= total);
      if (done) return items;
    }
    throw new ReleaseError(
      `${site.repo} lists more than ${MAX_PAGES} pages of ${noun}: the server does not page as Forgejo does; check --server`,
    );
  }

  /** Every release matching `query`, newest first. */
  const listReleases = (query: Record<string, string>) =>
    listPaged("/releases", ReleaseListSchema, (release) => release.id, query, "releases");

  return {
    server: site.server,
    repo: site.repo,
    origin,
    http,

    /** The server's version; none when it does not answer as Forgejo does. */
    async version(): Promise<{ status: number; version?: string }> {
      const answer = await send("GET", api("/api/v1/version"), { expect: [404] });
      const parsed = answer.status === 200
        ? v.safeParse(ServerVersionSchema, safeJson(answer.text))
        : undefined;
      return {
        status: answer.status,
        version: parsed?.success ? parsed.output.version : undefined,
      };
    },

    repository: () => json(RepositorySchema, "GET", repoApi("")),

    releases: {
      /** By tag; drafts are visible to writers, but older servers hide them from this lookup. */
      async byTag(tag: string): Promise<Release | undefined> {
        const url = repoApi(`/releases/tags/${encodeURIComponent(tag)}`);
        const answer = await send("GET", url, { expect: [404] });
        if (answer.status === 200) {
          return parseAnswer(ReleaseSchema, answer.text, `GET ${url.pathname}`);
        }
        const drafts = await listReleases({ draft: "true" });
        return drafts.find((release) => release.tag_name.toLowerCase() === tag.toLowerCase());
      },
      list: (query: { draft?: boolean; prerelease?: boolean } = {}) =>
        listReleases(
          Object.fromEntries([
            ...(query.draft === undefined ? [] : [["draft", String(query.draft)]]),
            ...(query.prerelease === undefined ? [] : [["pre-release", String(query.prerelease)]]),
          ]),
        ),
      get: (id: number) => json(ReleaseSchema, "GET", repoApi(`/releases/${id}`)),
      /** The new release, or undefined when one already exists for the tag (409). */
      async create(option: CreateReleaseOption): Promise<Release | undefined> {
        const url = repoApi("/releases");
        const answer = await send("POST", url, {
          ...sendJson(option),
          expect: [409],
          repeatable: true,
        });
        return answer.status === 409
          ? undefined
          : parseAnswer(ReleaseSchema, answer.text, `POST ${url.pathname}`);
      },
      edit: (id: number, edit: EditReleaseOption) =>
        json(ReleaseSchema, "PATCH", repoApi(`/releases/${id}`), sendJson(edit)),
      /** Deletes the release and every asset; the git tag stays. */
      async remove(id: number): Promise<void> {
        await send("DELETE", repoApi(`/releases/${id}`), { expect: [404] });
      },
    },

    assets: {
      list: (releaseId: number) =>
        json(AttachmentListSchema, "GET", repoApi(`/releases/${releaseId}/assets`)),
      /** One POST of the raw bytes, streamed with their exact length. Never repeated here. */
      async upload(releaseId: number, asset: BundleAsset): Promise<Attachment> {
        const url = repoApi(`/releases/${releaseId}/assets`, { name: asset.name });
        const answer = await send("POST", url, {
          body: asset.bytes ?? Readable.from(readWithProgress(asset)),
          headers: {
            "content-type": "application/octet-stream",
            "content-length": String(asset.size),
          },
          expect: [400, 413],
          carries: asset.size,
        });
        if (answer.status !== 201) {
          throw new HttpError(explainUploadFailure(site, answer, asset), false);
        }
        return parseAnswer(AttachmentSchema, answer.text, `POST ${url.pathname}`);
      },
      /** True when it was there to delete. */
      async remove(releaseId: number, copy: Attachment): Promise<boolean> {
        const url = repoApi(`/releases/${releaseId}/assets/${copy.id}`);
        return (await send("DELETE", url, { expect: [404] })).status !== 404;
      },
      /**
       * A small file of a release (SHA256SUMS, manifest.json), at most `maxBytes`; undefined
       * when it is gone (another job deleted it since the listing).
       */
      async text(copy: Attachment, maxBytes = MAX_INDEX_FILE): Promise<string | undefined> {
        if (copy.size > maxBytes) {
          throw new ReleaseError(
            `${copy.name} of ${site.repo} has ${copy.size} bytes, more than any real ${copy.name} (${
              formatBytes(maxBytes)
            }): refusing to read it; delete that asset`,
          );
        }
        const url = new URL(assetAddress(site, copy));
        const answer = await send("GET", url, {
          headers: { accept: "*/*" },
          maxBytes,
          expect: [404],
        });
        return answer.status === 404 ? undefined : answer.text;
      },
      /** A streamed download (for fetch): the caller reads the body. */
      async open(copy: Attachment, from = 0): Promise<Dispatcher.ResponseData> {
        const url = new URL(assetAddress(site, copy));
        return await request(url, {
          method: "GET",
          headers: headersFor(url, {
            accept: "*/*",
            ...(from > 0 ? { range: `bytes=${from}-` } : {}),
          }),
          dispatcher: agent,
          signal: AbortSignal.timeout(deadlineFor(http, copy.size)),
        });
      },
    },

    tags: {
      /** Every git tag of the repository. */
      list: () => listPaged("/tags", TagListSchema, (tag) => tag.name, {}, "tags"),
      async get(tag: string): Promise<Tag | undefined> {
        const url = repoApi(`/tags/${encodeURIComponent(tag)}`);
        const answer = await send("GET", url, { expect: [404] });
        return answer.status === 404
          ? undefined
          : parseAnswer(TagSchema, answer.text, `GET ${url.pathname}`);
      },
      /** "held" while a release (a draft too) still holds the tag. */
      async remove(tag: string): Promise<"removed" | "absent" | "held"> {
        const url = repoApi(`/tags/${encodeURIComponent(tag)}`);
        const answer = await send("DELETE", url, { expect: [404, 409] });
        return answer.status === 404 ? "absent" : answer.status === 409 ? "held" : "removed";
      },
    },
  };
}

/**
 * The overall deadline of one request, all its tries included: the idle timeout only catches
 * a silent peer, this also ends one that trickles a byte at a time.
 */
function deadlineFor(http: HttpSettings, carries: number): number {
  return TRIES * (http.timeoutMs + MS_PER_MIB * (carries / (1 << 20)));
}

/** Reads a response body, refusing one larger than `max` instead of holding it. */
async function readCapped(
  body: Dispatcher.ResponseData["body"],
  max: number,
  what: string,
): Promise<string> {
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of body) {
    size += chunk.length;
    if (size > max) {
      body.destroy();
      throw new ReleaseError(
        `the answer to ${what} is larger than ${
          formatBytes(max)
        }, more than any real Forgejo answer: refusing it; check --server`,
      );
    }
    chunks.push(chunk);
  }
  return Buffer.concat(chunks).toString("utf8");
}

/** The uuid form works for drafts and duplicate names alike; the tag form may not. */
function assetAddress(site: Site, copy: Attachment): string {
  return copy.uuid ? `${site.server}/attachments/${copy.uuid}` : copy.browser_download_url;
}

/** Forgejo's own error message, when the body is its JSON error (a proxy's HTML is not). */
function serverMessage(text: string): string | undefined {
  const parsed = v.safeParse(APIErrorSchema, safeJson(text));
  return parsed.success && parsed.output.message ? parsed.output.message : undefined;
}

function safeJson(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch {
    return undefined;
  }
}

/** One line that says what failed and what to do about it. */
export function explainStatus(
  site: Site,
  answer: Pick<Exchange, "status" | "text">,
  what: string,
): string {
  const said = serverMessage(answer.text);
  const quoted = said ? ` ("${said}")` : "";
  switch (answer.status) {
    case 401:
      return `Forgejo answered 401 for ${what}${quoted}: the token is missing, wrong or expired; set FORGEJO_TOKEN (in a workflow the job's GITHUB_TOKEN is valid only while the job runs)`;
    case 403:
      return `Forgejo answered 403 for ${what}${quoted}: the token cannot write releases of ${site.repo} (a personal token needs write:repository; the workflow token is read-only for pull requests from forks)`;
    case 404:
      return `Forgejo answered 404 for ${what}: ${site.repo} was not found on ${site.server}, or is not visible with this token; check --repo and the token`;
    case 413:
      return `Forgejo or its reverse proxy answered 413 for ${what}${quoted}: raise the proxy's body limit (nginx client_max_body_size) or the [quota] limit`;
    default:
      return `Forgejo answered ${answer.status} for ${what}${
        quoted || `: ${answer.text.slice(0, 120).replace(/\s+/g, " ")}`
      }`;
  }
}

function explainUploadFailure(site: Site, answer: Exchange, asset: BundleAsset): string {
  const said = serverMessage(answer.text);
  if (answer.status === 413) {
    return `the server or its reverse proxy refused ${asset.name} of ${asset.size} bytes (413${
      said ? `: ${said}` : ""
    }): raise the proxy's client_max_body_size or the [quota] limit, then rerun`;
  }
  if (answer.status === 400 && said && /type is not allowed/i.test(said)) {
    return `Forgejo refuses the file type of ${asset.name} ("${said}"): allow it in [repository.release] ALLOWED_TYPES (empty allows every type), then rerun`;
  }
  return explainStatus(site, answer, `upload of ${asset.name}`);
}

/** Fails early, before a long build, when the server, repository or token is wrong. */
async function checkForgejo(forgejo: Forgejo): Promise<Repository> {
  const { status, version } = await forgejo.version();
  if (!version) {
    throw new ReleaseError(
      `${forgejo.server} does not look like Forgejo: GET /api/v1/version answered ${status} without a version; check --server (the base URL of the Forgejo instance)`,
    );
  }
  const repo = await forgejo.repository();
  if (repo.permissions && repo.permissions.push === false) {
    throw new ReleaseError(
      `the token cannot write releases of ${forgejo.repo} (it has read access only): a personal token needs write:repository and a user with write access; the workflow token is read-only for pull requests from forks`,
    );
  }
  log(`Forgejo ${version}, repository ${repo.full_name}`);
  return repo;
}
// ---------------------------------------------------------------------------------------------
// 3. The flake: targets, inputs, provenance
// ---------------------------------------------------------------------------------------------

interface FlakeInfo {
  metadata: FlakeMetadata;
  /** False when flake.lock is missing or stale (nix would have to lock inputs). */
  locked: boolean;
  dirty: boolean;
  nixVersion: string;
}

function installable(options: Pick<ReleaseOptions, "flake" | "system">, target?: string): string {
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
function nixErrorTail(stderr: string, lines = 12): string {
  const all = stderr.split("\n").map((line) => line.trimEnd()).filter(Boolean);
  const start = all.findLastIndex((line) => line.startsWith("error:"));
  const tail = start >= 0 ? all.slice(start) : all;
  return tail.slice(0, lines).join("\n").replace(/^error: /, "");
}

async function readFlake(options: ReleaseOptions): Promise<FlakeInfo> {
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

async function listTargets(options: ReleaseOptions): Promise<string[]> {
  const result = await $`nix ${NIX_FEATURES} eval ${KEEP_LOCK} --json ${
    installable(options)
  } --apply builtins.attrNames`
    .quiet().nothrow();
  if (result.exitCode === 0) return parseJson(AttrNamesSchema, result.stdout, "nix eval");
  if (/does not provide attribute/.test(result.stderr)) return [];
  throw new UsageError(`cannot read the flake ${options.flake}: ${nixErrorTail(result.stderr, 1)}`);
}

/** Publishing trusts only what can be rebuilt: locked inputs and a committed tree. */
function refuseUntrustedFlake(flake: FlakeInfo, options: ReleaseOptions): void {
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

interface TargetBuild {
  target: string;
  system: string;
  drvPath: string;
  outPath: string;
}

/** What a build needs to know: `release` and `verify` both build this way. */
type BuildRequest = Pick<ReleaseOptions, "flake" | "system" | "targets">;

/**
 * One nix build for every target: one evaluation, and nix builds them in parallel. Nix lists
 * its results in its own order (store-path order on 2.8, not the installables'), so each
 * result is matched to its target by derivation.
 */
async function buildTargets(options: BuildRequest): Promise<TargetBuild[]> {
  // One target has one result: only several need their derivations to be told apart.
  const drvPaths = options.targets.length > 1 ? await targetDerivations(options) : undefined;
  const installables = options.targets.map((target) => installable(options, target));
  const build = $`nix ${NIX_FEATURES} build ${KEEP_LOCK} --json --no-link ${installables}`.quiet()
    .nothrow();
  build.stderr.on("data", (chunk: Buffer) => process.stderr.write(chunk));
  const result = await build;
  if (result.exitCode !== 0) {
    const named = options.targets.filter((target) =>
      drvPaths && result.stderr.includes(drvPaths[target])
    );
    throw new ReleaseError(
      `nix build failed for target ${
        (named.length > 0 ? named : options.targets).join(", ")
      } (${options.system}); nothing was published:\n${nixErrorTail(result.stderr)}`,
    );
  }
  const results: BuildResult[] = parseJson(BuildResultsSchema, result.stdout, "nix build --json");
  return options.targets.map((target) => {
    const built = drvPaths ? results.find((r) => r.drvPath === drvPaths[target]) : results[0];
    if (!built) {
      throw new ReleaseError(
        `nix build did not report target ${target}; rerun, and report this with nix --version`,
      );
    }
    return { target, system: options.system, drvPath: built.drvPath, outPath: built.outputs.out };
  });
}

/** Each target's derivation, from one evaluation. */
async function targetDerivations(options: BuildRequest): Promise<Record<string, string>> {
  const apply = `ps: builtins.mapAttrs (name: _: ps.\${name}.drvPath) (builtins.fromJSON ''${
    JSON.stringify(Object.fromEntries(options.targets.map((t) => [t, null])))
  }'')`;
  return await nixJson(
    OutPathsSchema,
    ["eval", KEEP_LOCK, "--json", installable(options), "--apply", apply],
    `evaluating the targets ${options.targets.join(", ")}`,
  );
}

// ---------------------------------------------------------------------------------------------
// 5. Build products and asset names
// ---------------------------------------------------------------------------------------------

interface Product {
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

interface FileAsset extends Product {
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

interface Bundle {
  files: BundleAsset[];
  manifest: Manifest;
  sums: BytesAsset;
  manifestAsset: BytesAsset;
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

function hashFile(file: string): Promise<{ sha256: string; size: number }> {
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

function describeRelease(
  options: ReleaseOptions,
  flake: FlakeInfo,
  assets: FileAsset[],
): Manifest {
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

/** An asset made of bytes release-boot wrote (SHA256SUMS, manifest.json), not a file. */
type BytesAsset = BundleAsset & { bytes: Uint8Array };

function bytesAsset(name: string, text: string): BytesAsset {
  const bytes = new TextEncoder().encode(text);
  return { name, bytes, size: bytes.length, sha256: sha256Hex(bytes) };
}

function sha256Hex(bytes: Uint8Array): string {
  return createHash("sha256").update(bytes).digest("hex");
}

/** SHA256SUMS lists every asset and manifest.json, so the provenance record is vouched for too. */
function bundleRelease(assets: FileAsset[], manifest: Manifest): Bundle {
  const manifestAsset = bytesAsset(MANIFEST_NAME, `${JSON.stringify(manifest, null, 2)}\n`);
  return {
    files: assets.map((asset) => ({
      name: asset.name,
      size: asset.size,
      sha256: asset.sha256,
      ...(asset.bytes ? { bytes: asset.bytes } : { path: asset.path }),
    })),
    manifest,
    sums: bytesAsset(SUMS_NAME, renderSums([...manifest.assets, manifestAsset])),
    manifestAsset,
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
function downloadBase(options: ReleaseOptions, repository: Repository | undefined): string {
  if (!options.site) return "";
  const repoUrl = repository?.html_url.replace(/\/+$/, "") ??
    `${options.site.server}/${options.site.repo}`;
  return `${repoUrl}/releases/download/${encodeURIComponent(options.tag)}/`;
}

/** Built iPXE script of a target: `<target>-<system>.built.ipxe`, kept as nix built it. */
function builtScriptName(name: string): string {
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
// 6c. SHA256SUMS.sig: SSH signatures (SSHSIG), made and checked natively
// ---------------------------------------------------------------------------------------------
// OpenSSH's PROTOCOL.sshsig, done here rather than by `ssh-keygen -Y sign` so that the signing
// key never reaches a file, a child process's environment or an ssh-agent: its text becomes a
// non-extractable CryptoKey and its bytes are zeroed. `ssh-keygen -Y verify` checks what
// signSums writes, byte for byte the signature `ssh-keygen -Y sign` would write (Ed25519 is
// deterministic); verifySums checks what `ssh-keygen -Y sign` writes.

const SIGNATURE_NAME = `${SUMS_NAME}.sig`;
export const SIGNING_KEY_ENV = "RELEASE_BOOT_SIGNING_KEY";
/** Key, signature and trust files are hundreds of bytes; anything larger is not one of them. */
const MAX_SIGNING_TEXT = 64 * 1024;
const ED25519 = "ssh-ed25519";
const SSHSIG_MAGIC = "SSHSIG";
const SSHSIG_VERSION = 1;
/** OpenSSH writes sha512 and accepts both when it verifies. */
const SSHSIG_HASHES = new Set(["sha512", "sha256"]);
const SIGNATURE_ARMOR = {
  begin: "-----BEGIN SSH SIGNATURE-----",
  end: "-----END SSH SIGNATURE-----",
};
const KEY_ARMOR = {
  begin: "-----BEGIN OPENSSH PRIVATE KEY-----",
  end: "-----END OPENSSH PRIVATE KEY-----",
};
const KEY_MAGIC = "openssh-key-v1\0";
/** RFC 8410 PKCS#8 DER of an Ed25519 private key, up to the 32-byte seed that ends it. */
const ED25519_PKCS8_PREFIX = "302e020100300506032b657004220420";
const MAKE_KEY = "make one with ssh-keygen -t ed25519 -N '' -C release-boot";
const ALLOWED_SIGNERS_OPTIONS = "cert-authority, namespaces=, valid-after=, valid-before=";

/**
 * The release's signing key: its public half in the clear, its private half only as a
 * non-extractable CryptoKey. Printing or serialising it shows the fingerprint, never the seed.
 */
class SigningKey {
  readonly #privateKey: CryptoKey;
  /** The public key in SSH wire format (string "ssh-ed25519", string key). */
  readonly publicBlob: Uint8Array;
  /** `SHA256:...`, as `ssh-keygen -l` prints it. */
  readonly fingerprint: string;
  readonly comment: string;

  constructor(privateKey: CryptoKey, publicBlob: Uint8Array, comment: string) {
    this.#privateKey = privateKey;
    this.publicBlob = publicBlob;
    this.fingerprint = sshFingerprint(publicBlob);
    this.comment = comment;
  }

  sign(data: Uint8Array): Promise<ArrayBuffer> {
    return crypto.subtle.sign("Ed25519", this.#privateKey, ownBytes(data));
  }

  /** `ssh-ed25519 AAAA... comment`: a line for allowed_signers or --trust. */
  publicKeyLine(): string {
    return [ED25519, Buffer.from(this.publicBlob).toString("base64"), this.comment]
      .filter(Boolean).join(" ");
  }

  toString(): string {
    return `${ED25519} ${this.fingerprint}${this.comment ? ` ${this.comment}` : ""}`;
  }

  toJSON(): { type: string; fingerprint: string; comment: string } {
    return { type: ED25519, fingerprint: this.fingerprint, comment: this.comment };
  }

  [Symbol.for("Deno.customInspect")](): string {
    return `SigningKey(${this})`;
  }

  [Symbol.for("nodejs.util.inspect.custom")](): string {
    return `SigningKey(${this})`;
  }
}

/** A public key the fetch side accepts signatures from, with its allowed_signers limits. */
interface TrustedKey {
  /** The allowed_signers principals, or for a bare key line its comment or fingerprint. */
  principal: string;
  fingerprint: string;
  publicBlob: Uint8Array;
  /** The raw 32-byte Ed25519 public key. */
  publicKey: Uint8Array;
  /** allowed_signers `namespaces="..."` patterns; undefined means every namespace. */
  namespaces?: string;
  /** allowed_signers `valid-after` / `valid-before`, in ms since the epoch. */
  validAfter?: number;
  validBefore?: number;
  /** Where it was read, for messages: `--trust FILE, line 3`. */
  origin: string;
}

/**
 * The signing key from `--signing-key FILE` or from RELEASE_BOOT_SIGNING_KEY (the key's text,
 * as a CI secret), undefined when neither is given. The key text is then dropped from the
 * environment that zx hands to child processes.
 */
export async function readSigningKey(
  flagFile: string | undefined,
  env: Env,
): Promise<SigningKey | undefined> {
  const fromEnv = env[SIGNING_KEY_ENV]?.trim() ? env[SIGNING_KEY_ENV] : undefined;
  delete $.env[SIGNING_KEY_ENV];
  if (flagFile !== undefined && fromEnv !== undefined) {
    throw new UsageError(
      `both --signing-key and ${SIGNING_KEY_ENV} are set: give the signing key one way only`,
    );
  }
  if (flagFile !== undefined) {
    const source = `--signing-key ${flagFile}`;
    const { text, mode } = await readSmallText(flagFile, source);
    if (mode & 0o077) {
      log(
        `warning: ${source} can be read by other users (mode ${(mode & 0o777).toString(8)}): ` +
          `chmod 600 ${flagFile}`,
      );
    }
    return await withSource(source, () => parseSigningKey(text));
  }
  if (fromEnv !== undefined) {
    return await withSource(SIGNING_KEY_ENV, () => parseSigningKey(fromEnv));
  }
  return undefined;
}

/** The trust file of `fetch --trust FILE`: allowed_signers, or public key lines. */
export async function readTrust(file: string, namespace = "file"): Promise<TrustedKey[]> {
  const source = `--trust ${file}`;
  const { text } = await readSmallText(file, source);
  return parseTrust(text, { namespace, source });
}

/**
 * Parses the text of an unencrypted OpenSSH Ed25519 private key (openssh-key-v1, as
 * `ssh-keygen -t ed25519 -N ''` writes it). Every refusal is one line that never quotes the key.
 */
export async function parseSigningKey(text: string): Promise<SigningKey> {
  const bytes = dearmorKey(text);
  try {
    const damaged = (problem: string) =>
      new UsageError(
        `the signing key is damaged (${problem}): copy the whole key file again, or ${MAKE_KEY}`,
      );
    if (!startsWithAscii(bytes, KEY_MAGIC)) throw damaged("not openssh-key-v1");
    const file = new WireReader(bytes.subarray(KEY_MAGIC.length), damaged);
    const cipher = file.text();
    const kdf = file.text();
    file.string();
    const count = file.u32();
    if (count !== 1) {
      throw new UsageError(`the signing key holds ${count} keys, not one: ${MAKE_KEY}`);
    }
    const publicBlob = file.string();
    const type = new WireReader(publicBlob, damaged).text();
    if (type !== ED25519) {
      throw new UsageError(
        `the signing key is ${describeKeyType(type)}: release-boot signs with Ed25519, ${MAKE_KEY}`,
      );
    }
    if (cipher !== "none" || kdf !== "none") {
      throw new UsageError(
        `the signing key is encrypted: release-boot needs an unencrypted key, ${MAKE_KEY}`,
      );
    }
    const publicKey = readEd25519Blob(publicBlob, damaged);
    const secret = new WireReader(file.string(), damaged);
    file.end();
    if (secret.u32() !== secret.u32()) throw damaged("its check numbers differ");
    if (secret.text() !== ED25519) throw damaged("its private part is not ssh-ed25519");
    if (!equalBytes(secret.string(), publicKey)) throw damaged("its two public keys differ");
    const seedAndPublic = secret.string();
    if (seedAndPublic.length !== 64 || !equalBytes(seedAndPublic.subarray(32), publicKey)) {
      throw damaged("its private key is not seed and public key");
    }
    const comment = secret.text();
    const padding = secret.rest();
    if (padding.length >= 8 || padding.some((byte, at) => byte !== at + 1)) {
      throw damaged("bad padding");
    }
    const privateKey = await importEd25519Seed(seedAndPublic.subarray(0, 32));
    const key = new SigningKey(privateKey, publicBlob.slice(), comment);
    if (!await keyPairMatches(key, publicKey)) {
      throw damaged("its private key does not belong to its public key");
    }
    return key;
  } finally {
    bytes.fill(0);
  }
}

/**
 * Signs `sums` as `ssh-keygen -Y sign -n NAMESPACE` does: SSHSIG version 1 over its SHA-512,
 * armored and wrapped at 70 columns.
 */
export async function signSums(
  key: SigningKey,
  sums: Uint8Array,
  namespace = "file",
): Promise<string> {
  const hash = "sha512";
  const signature = new Uint8Array(await key.sign(signedData(namespace, hash, sums)));
  const blob = concatBytes(
    ascii(SSHSIG_MAGIC),
    u32Bytes(SSHSIG_VERSION),
    sshString(key.publicBlob),
    sshString(namespace),
    sshString(""),
    sshString(hash),
    sshString(concatBytes(sshString(ED25519), sshString(signature))),
  );
  const lines = Buffer.from(blob).toString("base64").match(/.{1,70}/g)!;
  return `${SIGNATURE_ARMOR.begin}\n${lines.join("\n")}\n${SIGNATURE_ARMOR.end}\n`;
}

/**
 * Reads trusted keys: allowed_signers lines (`principals [options] keytype key [comment]`) or
 * bare `ssh-ed25519 AAAA... [comment]` lines. Keys of other types and cert-authority lines are
 * skipped with a note (a shared allowed_signers file may hold them for other uses); a line
 * that cannot be read, or a file without an Ed25519 key valid for `namespace`, is refused.
 */
export function parseTrust(
  text: string,
  { namespace = "file", source = "the trust file", note = log }: {
    namespace?: string;
    source?: string;
    note?: (message: string) => void;
  } = {},
): TrustedKey[] {
  if (text.length > MAX_SIGNING_TEXT) {
    throw new UsageError(`${source} is over 64 KiB: give an allowed_signers file or key lines`);
  }
  const trusted: TrustedKey[] = [];
  const lines = text.split("\n");
  for (let index = 0; index < lines.length; index++) {
    const line = lines[index].trim();
    if (line === "" || line.startsWith("#")) continue;
    const origin = `${source}, line ${index + 1}`;
    const key = parseTrustLine(line, origin);
    if (typeof key === "string") note(`${origin}: skipped: ${key}`);
    else trusted.push(key);
  }
  if (!trusted.some((key) => matchesPatternList(namespace, key.namespaces ?? "*"))) {
    throw new UsageError(
      `${source} has no ssh-ed25519 key for namespace "${namespace}": give it the signing ` +
        `key's public line (ssh-ed25519 AAAA... release-boot) or an allowed_signers line for it`,
    );
  }
  return trusted;
}

/**
 * Checks `armored` (SHA256SUMS.sig) over `sums` as `ssh-keygen -Y verify` does, against the
 * trusted keys only, and names the signer. Every failure is a ReleaseError of one line.
 */
export async function verifySums(
  trusted: TrustedKey[],
  sums: Uint8Array,
  armored: string,
  namespace = "file",
): Promise<{ principal: string; fingerprint: string }> {
  const damaged = (problem: string) =>
    new ReleaseError(`${SIGNATURE_NAME} is damaged (${problem}): download it again`);
  const blob = dearmorSignature(armored);
  if (!startsWithAscii(blob, SSHSIG_MAGIC)) throw damaged("no SSHSIG magic");
  const sig = new WireReader(blob.subarray(SSHSIG_MAGIC.length), damaged);
  const version = sig.u32();
  if (version !== SSHSIG_VERSION) {
    throw new ReleaseError(
      `${SIGNATURE_NAME} is SSHSIG version ${version}; release-boot checks version 1`,
    );
  }
  const publicBlob = sig.string();
  const signedNamespace = sig.text();
  sig.string();
  const hash = sig.text();
  const signature = new WireReader(sig.string(), damaged);
  sig.end();

  if (signedNamespace !== namespace) {
    throw new ReleaseError(
      `${SIGNATURE_NAME} is signed for namespace "${signedNamespace}", not "${namespace}": ` +
        `it must be made with ssh-keygen -Y sign -n ${namespace} (or by release-boot)`,
    );
  }
  if (!SSHSIG_HASHES.has(hash)) {
    throw new ReleaseError(
      `${SIGNATURE_NAME} uses hash "${hash}": OpenSSH signatures use sha512 (or sha256)`,
    );
  }
  const fingerprint = sshFingerprint(publicBlob);
  const signerType = new WireReader(publicBlob, damaged).text();
  if (signerType !== ED25519) {
    throw new ReleaseError(
      `${SIGNATURE_NAME} was made with ${describeKeyType(signerType)} (${fingerprint}): ` +
        `release-boot checks ssh-ed25519 signatures only`,
    );
  }
  const signer = chooseTrustedSigner(trusted, publicBlob, fingerprint, namespace);
  if (signature.text() !== ED25519) throw damaged("its signature is not ssh-ed25519");
  const raw = signature.string();
  signature.end();
  if (raw.length !== 64) throw damaged("its signature is not 64 bytes");

  const publicKey = await crypto.subtle.importKey(
    "raw",
    ownBytes(signer.publicKey),
    { name: "Ed25519" },
    false,
    ["verify"],
  );
  const data = signedData(namespace, hash, sums);
  if (!await crypto.subtle.verify("Ed25519", publicKey, ownBytes(raw), data)) {
    throw new ReleaseError(
      `${SIGNATURE_NAME} does not match ${SUMS_NAME}: it was changed after ${fingerprint} ` +
        `(${signer.principal}) signed it, or the two files are from different releases`,
    );
  }
  return { principal: signer.principal, fingerprint };
}

/** The trusted entry for the signer's key that allows this namespace now, or why none does. */
function chooseTrustedSigner(
  trusted: TrustedKey[],
  publicBlob: Uint8Array,
  fingerprint: string,
  namespace: string,
): TrustedKey {
  const entries = trusted.filter((key) => equalBytes(key.publicBlob, publicBlob));
  if (entries.length === 0) {
    throw new ReleaseError(
      `${SIGNATURE_NAME} was made by ${fingerprint}, a key the trust file does not list: ` +
        `add its public key if you trust it, or find out who signed this release`,
    );
  }
  const now = Date.now();
  const problem = (key: TrustedKey) => {
    if (!matchesPatternList(namespace, key.namespaces ?? "*")) {
      return `allows it only for namespaces "${key.namespaces}", not "${namespace}"`;
    }
    if (key.validAfter !== undefined && now < key.validAfter) {
      return `trusts it only from ${new Date(key.validAfter).toISOString()}`;
    }
    if (key.validBefore !== undefined && now > key.validBefore) {
      return `trusted it only until ${new Date(key.validBefore).toISOString()}`;
    }
    return undefined;
  };
  const usable = entries.find((key) => problem(key) === undefined);
  if (usable) return usable;
  throw new ReleaseError(
    `${SIGNATURE_NAME} was made by ${fingerprint}, but ${entries[0].origin} ${problem(entries[0])}`,
  );
}

/** A trusted key, or why the line's key is skipped. */
function parseTrustLine(line: string, origin: string): TrustedKey | string {
  const fields = splitUnquoted(line, " \t", origin);
  const typeAt = fields.slice(0, 3).findIndex(isKeyType);
  if (typeAt < 0 || fields[typeAt + 1] === undefined) {
    throw new UsageError(
      `${origin}: expected "principals [options] ssh-ed25519 AAAA..." or "ssh-ed25519 AAAA..."`,
    );
  }
  const principal = typeAt === 0 ? undefined : unquote(fields[0]);
  const options = typeAt === 2 ? parseSignerOptions(fields[1], origin) : {};
  const [type, encoded, ...comment] = fields.slice(typeAt);
  const bad = (problem: string) =>
    new UsageError(
      `${origin}: the key is damaged (${problem}): copy the line from its .pub file again`,
    );
  const publicBlob = decodeBase64(encoded, () => bad("not base64"));
  const blobType = new WireReader(publicBlob, bad).text();
  if (blobType !== type) throw bad(`it says ${type} but holds ${blobType}`);
  if (options.certAuthority) {
    return "cert-authority: release-boot checks plain ssh-ed25519 keys, not certificates";
  }
  if (type !== ED25519) {
    return `${describeKeyType(type)}: release-boot checks ssh-ed25519 signatures only`;
  }
  const publicKey = readEd25519Blob(publicBlob, bad);
  const fingerprint = sshFingerprint(publicBlob);
  return {
    principal: principal ?? (comment.join(" ") || fingerprint),
    fingerprint,
    publicBlob,
    publicKey,
    namespaces: options.namespaces,
    validAfter: options.validAfter,
    validBefore: options.validBefore,
    origin,
  };
}

interface SignerOptions {
  certAuthority?: boolean;
  namespaces?: string;
  validAfter?: number;
  validBefore?: number;
}

/** allowed_signers options, as ssh-keygen(1) lists them; any other option is refused. */
function parseSignerOptions(field: string, origin: string): SignerOptions {
  const options: SignerOptions = {};
  for (const option of splitUnquoted(field, ",", origin)) {
    const [, name, value] = option.match(/^([A-Za-z-]+)(?:=(.*))?$/s) ?? [];
    const lower = name?.toLowerCase();
    if (lower === "cert-authority" && value === undefined) {
      options.certAuthority = true;
      continue;
    }
    if (value !== undefined && !/^".*"$/s.test(value)) {
      throw new UsageError(`${origin}: write the value of ${name} in double quotes: ${name}="..."`);
    }
    if (value === undefined) {
      throw new UsageError(
        `${origin}: unknown option ${option} (allowed_signers options: ${ALLOWED_SIGNERS_OPTIONS})`,
      );
    }
    const text = unquote(value);
    if (lower === "namespaces") options.namespaces = text;
    else if (lower === "valid-after") options.validAfter = parseSignerTime(text, option, origin);
    else if (lower === "valid-before") options.validBefore = parseSignerTime(text, option, origin);
    else {
      throw new UsageError(
        `${origin}: unknown option ${name} (allowed_signers options: ${ALLOWED_SIGNERS_OPTIONS})`,
      );
    }
  }
  return options;
}

/** ssh-keygen's YYYYMMDD[HHMM[SS]][Z]: local time unless it ends in Z. */
function parseSignerTime(text: string, option: string, origin: string): number {
  const parts = text.match(/^(\d{4})(\d{2})(\d{2})(?:(\d{2})(\d{2})(\d{2})?)?(Z?)$/);
  if (!parts) {
    throw new UsageError(`${origin}: ${option} is not a time: write YYYYMMDD[HHMM[SS]][Z]`);
  }
  const [year, month, day, hour, minute, second] = parts.slice(1, 7).map((n) => Number(n ?? 0));
  const time = parts[7]
    ? Date.UTC(year, month - 1, day, hour, minute, second)
    : new Date(year, month - 1, day, hour, minute, second).getTime();
  const back = new Date(time);
  const fields = parts[7]
    ? [back.getUTCMonth() + 1, back.getUTCDate(), back.getUTCHours(), back.getUTCMinutes()]
    : [back.getMonth() + 1, back.getDate(), back.getHours(), back.getMinutes()];
  if (fields[0] !== month || fields[1] !== day || hour > 23 || minute > 59 || second > 59) {
    throw new UsageError(`${origin}: ${option} is not a date`);
  }
  return time;
}

/** OpenSSH's match_pattern_list: comma-separated globs (* and ?), `!` negates and wins. */
function matchesPatternList(name: string, list: string): boolean {
  let matched = false;
  for (const entry of list.split(",")) {
    const negated = entry.startsWith("!");
    if (!matchesGlob(name, negated ? entry.slice(1) : entry)) continue;
    if (negated) return false;
    matched = true;
  }
  return matched;
}

/** Glob match in O(name × pattern): on a mismatch, only the last `*` is retried. */
function matchesGlob(name: string, pattern: string): boolean {
  let n = 0;
  let p = 0;
  let star = -1;
  let resume = 0;
  while (n < name.length) {
    if (p < pattern.length && (pattern[p] === "?" || pattern[p] === name[n])) {
      n++;
      p++;
    } else if (p < pattern.length && pattern[p] === "*") {
      star = p++;
      resume = n;
    } else if (star >= 0) {
      p = star + 1;
      n = ++resume;
    } else {
      return false;
    }
  }
  while (p < pattern.length && pattern[p] === "*") p++;
  return p === pattern.length;
}

/** Splits at separators outside double quotes; an unclosed quote is refused. */
function splitUnquoted(text: string, separators: string, origin: string): string[] {
  const fields: string[] = [];
  let field = "";
  let quoted = false;
  for (const char of text) {
    if (char === '"') quoted = !quoted;
    if (!quoted && separators.includes(char)) {
      if (field) fields.push(field);
      field = "";
    } else {
      field += char;
    }
  }
  if (quoted) throw new UsageError(`${origin}: a double quote is not closed`);
  if (field) fields.push(field);
  return fields;
}

function unquote(text: string): string {
  return /^".*"$/s.test(text) ? text.slice(1, -1) : text;
}

function isKeyType(field: string | undefined): boolean {
  return field !== undefined &&
    /^(ssh-(ed25519|rsa|dss)|ecdsa-sha2-nistp\d+|sk-[a-z0-9-]+@openssh\.com)(-cert-v01@openssh\.com)?$/
      .test(field);
}

function describeKeyType(type: string): string {
  if (type === "ssh-rsa") return "an RSA key (ssh-rsa)";
  if (type.startsWith("ecdsa-")) return `an ECDSA key (${type})`;
  if (type.startsWith("sk-")) return `a security-key key (${type})`;
  if (type.includes("-cert-")) return `a certificate (${type})`;
  return `a ${type} key`;
}

function readEd25519Blob(blob: Uint8Array, fail: (problem: string) => Error): Uint8Array {
  const reader = new WireReader(blob, fail);
  if (reader.text() !== ED25519) throw fail("not an ssh-ed25519 key");
  const key = reader.string();
  reader.end();
  if (key.length !== 32) throw fail("an Ed25519 public key is 32 bytes");
  return key;
}

/** The armored private key's bytes; refusals name the kind of text without quoting it. */
function dearmorKey(text: string): Uint8Array {
  if (text.length > MAX_SIGNING_TEXT) {
    throw new UsageError(`the signing key is over 64 KiB, so it is not an SSH key: ${MAKE_KEY}`);
  }
  const trimmed = text.trim();
  const pem = trimmed.match(/^-----BEGIN ([A-Z0-9 ]+)-----/)?.[1];
  if (pem === "ENCRYPTED PRIVATE KEY") {
    throw new UsageError(
      `the signing key is encrypted: release-boot needs an unencrypted key, ${MAKE_KEY}`,
    );
  }
  if (pem !== undefined && pem !== "OPENSSH PRIVATE KEY") {
    const what = pem === "RSA PRIVATE KEY"
      ? "a PEM RSA key"
      : pem === "EC PRIVATE KEY"
      ? "a PEM ECDSA key"
      : `a PEM "${pem}" file`;
    throw new UsageError(
      `the signing key is ${what}: release-boot reads OpenSSH Ed25519 keys, ${MAKE_KEY}`,
    );
  }
  if (isKeyType(trimmed.split(/\s/)[0])) {
    throw new UsageError(
      "the signing key is a public key: give the private key file (the one without .pub)",
    );
  }
  if (pem === undefined || !trimmed.endsWith(KEY_ARMOR.end)) {
    throw new UsageError(
      `the signing key is not an OpenSSH private key (${KEY_ARMOR.begin} ... ` +
        `${KEY_ARMOR.end}): ${MAKE_KEY}`,
    );
  }
  const body = trimmed.slice(KEY_ARMOR.begin.length, -KEY_ARMOR.end.length).replace(/\s+/g, "");
  return decodeBase64(
    body,
    () => new UsageError(`the signing key is damaged (its body is not base64): ${MAKE_KEY}`),
  );
}

function dearmorSignature(text: string): Uint8Array {
  if (text.length > MAX_SIGNING_TEXT) {
    throw new ReleaseError(`${SIGNATURE_NAME} is over 64 KiB, so it is not an SSH signature`);
  }
  const trimmed = text.trim();
  if (!trimmed.startsWith(SIGNATURE_ARMOR.begin) || !trimmed.endsWith(SIGNATURE_ARMOR.end)) {
    throw new ReleaseError(
      `${SIGNATURE_NAME} is not an SSH signature (${SIGNATURE_ARMOR.begin} ... ` +
        `${SIGNATURE_ARMOR.end})`,
    );
  }
  const body = trimmed.slice(SIGNATURE_ARMOR.begin.length, -SIGNATURE_ARMOR.end.length);
  return decodeBase64(
    body.replace(/\s+/g, ""),
    () => new ReleaseError(`${SIGNATURE_NAME} is damaged (its body is not base64)`),
  );
}

/** Strict base64 (Buffer.from skips stray characters); Buffer's pooled copy is zeroed. */
function decodeBase64(text: string, fail: () => Error): Uint8Array {
  if (text.length % 4 !== 0 || !/^[A-Za-z0-9+/]*={0,2}$/.test(text)) throw fail();
  const decoded = Buffer.from(text, "base64");
  const bytes = new Uint8Array(decoded);
  decoded.fill(0);
  if (bytes.length !== text.length / 4 * 3 - (text.match(/=*$/)![0].length)) throw fail();
  return bytes;
}

/** What SSHSIG signs: magic, namespace, reserved, hash name, hash of the message. */
function signedData(namespace: string, hash: string, message: Uint8Array): Uint8Array<ArrayBuffer> {
  return concatBytes(
    ascii(SSHSIG_MAGIC),
    sshString(namespace),
    sshString(""),
    sshString(hash),
    sshString(createHash(hash).update(message).digest()),
  );
}

async function importEd25519Seed(seed: Uint8Array): Promise<CryptoKey> {
  const pkcs8 = concatBytes(Buffer.from(ED25519_PKCS8_PREFIX, "hex"), seed);
  try {
    return await crypto.subtle.importKey("pkcs8", pkcs8, { name: "Ed25519" }, false, ["sign"]);
  } finally {
    pkcs8.fill(0);
  }
}

/** The file's public key must be the one its seed makes; a sign-and-verify proves it. */
async function keyPairMatches(key: SigningKey, publicKey: Uint8Array): Promise<boolean> {
  const probe = ascii("release-boot key check");
  const verifier = await crypto.subtle.importKey(
    "raw",
    ownBytes(publicKey),
    { name: "Ed25519" },
    false,
    ["verify"],
  );
  return await crypto.subtle.verify("Ed25519", verifier, await key.sign(probe), probe);
}

/** Runs `parse`, prefixing a UsageError with where the text came from. */
async function withSource<T>(source: string, parse: () => Promise<T>): Promise<T> {
  try {
    return await parse();
  } catch (error) {
    if (error instanceof UsageError) throw new UsageError(`${source}: ${error.message}`);
    throw error;
  }
}

/** A key or trust file, refused unreadable, not a file, or over 64 KiB, before it is read. */
async function readSmallText(
  file: string,
  source: string,
): Promise<{ text: string; mode: number }> {
  let handle: fs.FileHandle;
  try {
    handle = await fs.open(file, "r");
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    throw new UsageError(`${source}: cannot open it (${code ?? (error as Error).message})`);
  }
  try {
    const stat = await handle.stat();
    if (!stat.isFile()) throw new UsageError(`${source}: not a regular file`);
    if (stat.size > MAX_SIGNING_TEXT) {
      throw new UsageError(`${source}: over 64 KiB, not a key file`);
    }
    const buffer = new Uint8Array(MAX_SIGNING_TEXT + 1);
    const { bytesRead } = await handle.read(buffer, 0, buffer.length, 0);
    if (bytesRead > MAX_SIGNING_TEXT) {
      throw new UsageError(`${source}: over 64 KiB, not a key file`);
    }
    const text = new TextDecoder().decode(buffer.subarray(0, bytesRead));
    buffer.fill(0);
    return { text, mode: stat.mode };
  } finally {
    await handle.close();
  }
}

/** Reads SSH wire format (RFC 4251): every length is checked against what is left. */
class WireReader {
  #bytes: Uint8Array;
  #at = 0;
  #fail: (problem: string) => Error;

  constructor(bytes: Uint8Array, fail: (problem: string) => Error) {
    this.#bytes = bytes;
    this.#fail = fail;
  }

  u32(): number {
    if (this.#bytes.length - this.#at < 4) throw this.#fail("it ends early");
    const view = new DataView(this.#bytes.buffer, this.#bytes.byteOffset, this.#bytes.length);
    const value = view.getUint32(this.#at);
    this.#at += 4;
    return value;
  }

  string(): Uint8Array {
    const length = this.u32();
    if (length > this.#bytes.length - this.#at) throw this.#fail("a field runs past its end");
    const value = this.#bytes.subarray(this.#at, this.#at + length);
    this.#at += length;
    return value;
  }

  text(): string {
    const bytes = this.string();
    try {
      return new TextDecoder("utf-8", { fatal: true }).decode(bytes);
    } catch {
      throw this.#fail("a name is not UTF-8");
    }
  }

  rest(): Uint8Array {
    const value = this.#bytes.subarray(this.#at);
    this.#at = this.#bytes.length;
    return value;
  }

  end(): void {
    if (this.#at !== this.#bytes.length) throw this.#fail("bytes follow its end");
  }
}

function sshFingerprint(publicBlob: Uint8Array): string {
  return `SHA256:${createHash("sha256").update(publicBlob).digest("base64").replace(/=+$/, "")}`;
}

function sshString(value: Uint8Array | string): Uint8Array {
  const bytes = typeof value === "string" ? ascii(value) : value;
  return concatBytes(u32Bytes(bytes.length), bytes);
}

function u32Bytes(value: number): Uint8Array {
  const bytes = new Uint8Array(4);
  new DataView(bytes.buffer).setUint32(0, value);
  return bytes;
}

function ascii(text: string): Uint8Array<ArrayBuffer> {
  return new TextEncoder().encode(text);
}

function concatBytes(...parts: Uint8Array[]): Uint8Array<ArrayBuffer> {
  const out = new Uint8Array(parts.reduce((sum, part) => sum + part.length, 0));
  let at = 0;
  for (const part of parts) {
    out.set(part, at);
    at += part.length;
  }
  return out;
}

/** A copy on its own ArrayBuffer, which is what Web Crypto's types ask for. */
function ownBytes(bytes: Uint8Array): Uint8Array<ArrayBuffer> {
  return new Uint8Array(bytes);
}

function startsWithAscii(bytes: Uint8Array, prefix: string): boolean {
  return equalBytes(bytes.subarray(0, prefix.length), ascii(prefix));
}

function equalBytes(a: Uint8Array, b: Uint8Array): boolean {
  return a.length === b.length && a.every((byte, at) => byte === b[at]);
}

// ---------------------------------------------------------------------------------------------
// 7a. Dry run and local stage
// ---------------------------------------------------------------------------------------------

function printPlan(bundle: Bundle, options: ReleaseOptions): void {
  const where = options.site ? `${options.site.server}/${options.site.repo}` : options.out;
  result(`Plan for ${options.tag} (commit ${options.commit}) -> ${where}; nothing written:`);
  for (const asset of [...bundle.files, bundle.sums, bundle.manifestAsset]) {
    result(`  ${asset.sha256}  ${asset.name}  ${formatBytes(asset.size)}`);
  }
}

/**
 * True when every entry of `dir` is a file an earlier stage wrote: manifest.json, SHA256SUMS
 * and the names SHA256SUMS lists. A stage replaces --out whole, so nothing else may be there.
 */
async function isEarlierStage(dir: string, entries: string[]): Promise<boolean> {
  if (!entries.includes(SUMS_NAME) || !entries.includes(MANIFEST_NAME)) return false;
  const sums = await fs.readFile(path.join(dir, SUMS_NAME), "utf8").catch(() => "");
  const listed = parseSums(sums.slice(0, MAX_INDEX_FILE));
  return entries.every((entry) => INDEX_NAMES.has(entry) || listed.has(entry));
}

/** Refuses, before any build, an --out that is a file or holds anything but an earlier stage. */
async function refuseForeignOut(out: string): Promise<void> {
  const stat = await fs.lstat(out).catch(() => undefined);
  if (!stat) return;
  if (!stat.isDirectory()) {
    throw new UsageError(`--out ${out} is not a directory: choose a new or empty directory`);
  }
  const entries = await fs.readdir(out);
  if (entries.length > 0 && !await isEarlierStage(out, entries)) {
    throw new UsageError(
      `--out ${out} holds files that are not an earlier stage of release-boot, and a stage replaces it whole: choose a new or empty directory`,
    );
  }
}

/**
 * Writes the bundle next to its final place, then renames it in: a failure, SIGTERM or
 * Ctrl-C never leaves a half-written --out, and a rerun replaces the earlier stage whole.
 */
async function stageLocally(bundle: Bundle, options: ReleaseOptions): Promise<void> {
  const out = path.resolve(options.out);
  await refuseForeignOut(out);
  await fs.mkdir(path.dirname(out), { recursive: true });
  await removeAbandonedStages(out);
  const partial = await fs.mkdtemp(`${out}.partial-`);
  // Stopped part-way (SIGTERM from CI, Ctrl-C), the partial copy goes; --out stays as it was.
  const onStop = (signal: "SIGTERM" | "SIGINT") => () => {
    try {
      Deno.removeSync(partial, { recursive: true });
    } catch {
      // Already renamed into place: nothing partial is left.
    }
    Deno.exit(signal === "SIGTERM" ? 143 : 130);
  };
  const stops = (["SIGTERM", "SIGINT"] as const).map((signal) => ({
    signal,
    stop: onStop(signal),
  }));
  for (const { signal, stop } of stops) Deno.addSignalListener(signal, stop);
  try {
    await fs.chmod(partial, 0o755);
    for (const asset of [...bundle.files, bundle.sums, bundle.manifestAsset]) {
      const target = path.join(partial, asset.name);
      if (asset.path) await fs.copyFile(asset.path, target);
      else await fs.writeFile(target, asset.bytes ?? new Uint8Array());
      await fs.chmod(target, 0o644);
    }
    await fs.rm(out, { recursive: true, force: true });
    await fs.rename(partial, out);
  } catch (error) {
    await fs.rm(partial, { recursive: true, force: true });
    throw error;
  } finally {
    for (const { signal, stop } of stops) Deno.removeSignalListener(signal, stop);
  }
  log(`Staged ${bundle.files.length} assets, ${SUMS_NAME} and ${MANIFEST_NAME} in ${out}`);
  log(`Check them: (cd ${out} && sha256sum -c ${SUMS_NAME})`);
  log(
    `Publish them: FORGEJO_TOKEN=... deno task release --server https://FORGEJO --repo OWNER/NAME --tag ${options.tag} --commit ${options.commit} --flake ${options.flake} --targets ${
      options.targets.join(",")
    }`,
  );
  result(out);
}

/** `<out>.partial-*` directories a killed stage left: only plain files, never anything else. */
async function removeAbandonedStages(out: string): Promise<void> {
  const parent = path.dirname(out);
  const prefix = `${path.basename(out)}.partial-`;
  for (const entry of await fs.readdir(parent)) {
    if (!entry.startsWith(prefix) || entry.length !== prefix.length + 6) continue;
    const dir = path.join(parent, entry);
    const stat = await fs.lstat(dir);
    if (!stat.isDirectory()) continue;
    const files = await fs.readdir(dir, { withFileTypes: true });
    if (files.every((file) => file.isFile() && ASSET_NAME.test(file.name))) {
      await fs.rm(dir, { recursive: true, force: true });
      log(`Removed ${dir}, left by an interrupted stage`);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// 7b. The release: find or create the draft, refuse what would change history
// ---------------------------------------------------------------------------------------------

async function refuseTagOnOtherCommit(forgejo: Forgejo, options: ReleaseOptions): Promise<void> {
  const tag = await forgejo.tags.get(options.tag);
  if (tag && tag.commit.sha !== options.commit) {
    throw new ReleaseError(
      `the tag ${options.tag} already points at ${tag.commit.sha}, not at ${options.commit}: a tag means one commit; release a new tag, or delete the old tag in Forgejo first`,
    );
  }
}

async function findOrCreateDraft(
  forgejo: Forgejo,
  options: ReleaseOptions,
  bundle: Bundle,
): Promise<Release> {
  const existing = await forgejo.releases.byTag(options.tag);
  if (existing) return await adoptRelease(forgejo, existing, options);
  const created = await forgejo.releases.create({
    tag_name: options.tag,
    // The commit SHA, never a branch: publishing makes the tag from it later.
    target_commitish: options.commit,
    name: options.tag,
    body: releaseBody(bundle.manifest, options),
    draft: true,
    prerelease: options.prerelease,
  });
  if (created) {
    log(`Created draft release ${created.tag_name} (id ${created.id})`);
    return created;
  }
  // Another job created it between our lookup and our POST: continue with theirs.
  const raced = await forgejo.releases.byTag(options.tag);
  if (!raced) {
    throw new ReleaseError(
      `Forgejo says a release for ${options.tag} exists but does not show it; rerun`,
    );
  }
  log(`Another run created ${options.tag} at the same time; continuing with it`);
  return await adoptRelease(forgejo, raced, options);
}

/**
 * Takes over a release made earlier (by a killed run, another job, or another tool). A draft
 * makes its tag from target_commitish only when published, so a draft that names a branch or
 * nothing is pinned to the built SHA first; one naming another SHA is refused.
 */
async function adoptRelease(
  forgejo: Forgejo,
  release: Release,
  options: Pick<ReleaseOptions, "commit" | "prerelease" | "tag">,
): Promise<Release> {
  const target = release.target_commitish.toLowerCase();
  const names = /^[0-9a-f]{40}([0-9a-f]{24})?$/.test(target);
  if (names && target !== options.commit) {
    throw new ReleaseError(
      `the release ${release.tag_name} is for commit ${target}, not ${options.commit}: a tag means one commit; release a new tag, or delete that release in Forgejo first`,
    );
  }
  log(
    `Found ${
      release.draft ? "draft" : "published"
    } release ${release.tag_name} (id ${release.id}, ${release.assets.length} assets)`,
  );
  if (!release.draft) return release;
  const edit: EditReleaseOption = {
    ...(names ? {} : { target_commitish: options.commit }),
    ...(release.prerelease === options.prerelease ? {} : { prerelease: options.prerelease }),
  };
  if (Object.keys(edit).length === 0) return release;
  if (edit.target_commitish) {
    log(
      `Pinned the draft to commit ${options.commit} (it named ${
        JSON.stringify(release.target_commitish)
      }, where its tag would land when published)`,
    );
  }
  return await forgejo.releases.edit(release.id, edit);
}

/**
 * Which attachment holds which bytes, kept in the release body as an HTML comment (invisible
 * on the release page) and updated after each upload. It lets a rerun trust a copy by its id
 * instead of uploading it again, and tells a replaced copy from the new one.
 */
type UploadRecord = Record<string, { id: number; size: number; sha256: string }>;

const RECORD_PATTERN = /\n?<!-- release-boot:uploaded (\{.*?\}) -->\n?/s;

const UploadRecordSchema = v.record(
  v.string(),
  v.object({ id: v.number(), size: v.number(), sha256: v.string() }),
);

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

/** A copy's sha256 from the upload record, else (for older copies) from manifest.json. */
async function readRecordedSums(forgejo: Forgejo, release: Release): Promise<RecordedSha> {
  const record = readUploadRecord(release.body);
  const manifest = unionManifest(await readIndex(forgejo, release));
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
  const release = await forgejo.releases.get(releaseId);
  const record = readUploadRecord(release.body);
  record[asset.name] = { id: stored.id, size: stored.size, sha256: asset.sha256 };
  await forgejo.releases.edit(releaseId, { body: withUploadRecord(release.body, record) });
}

/** Every copy of SHA256SUMS, its signature and manifest.json in a release, oldest first. */
interface RemoteIndex {
  manifests: { copy: Attachment; manifest: Manifest; sha256: string }[];
  sums: { copy: Attachment; text: string }[];
  /**
   * `signer`: the fingerprint of the key that made this signature over the newest SHA256SUMS
   * (checked with the key the signature names); undefined when it signs other bytes.
   */
  signatures: { copy: Attachment; text: string; signer?: string }[];
}

async function readIndex(forgejo: Forgejo, release: Release): Promise<RemoteIndex> {
  const copies = release.assets.filter((copy) => INDEX_NAMES.has(copy.name)).length;
  if (copies > MAX_INDEX_COPIES) {
    throw new ReleaseError(
      `${release.tag_name} holds ${copies} copies of ${SUMS_NAME}, ${MANIFEST_NAME} and ${SIGNATURE_NAME}, more than racing jobs ever leave (${MAX_INDEX_COPIES}): refusing to read them; delete the extra copies in Forgejo`,
    );
  }
  const index: RemoteIndex = { manifests: [], sums: [], signatures: [] };
  for (const copy of [...release.assets].sort((a, b) => a.id - b.id)) {
    // A copy deleted since the listing (another job tidying up) is simply not there.
    const text = INDEX_NAMES.has(copy.name) ? await forgejo.assets.text(copy) : undefined;
    if (text === undefined) continue;
    if (copy.name === MANIFEST_NAME) {
      const manifest = parseJson(ManifestSchema, text, `${MANIFEST_NAME} of ${release.tag_name}`);
      index.manifests.push({ copy, manifest, sha256: sha256Hex(new TextEncoder().encode(text)) });
    } else if (copy.name === SUMS_NAME) {
      index.sums.push({ copy, text });
    } else if (copy.name === SIGNATURE_NAME) {
      index.signatures.push({ copy, text });
    }
  }
  const newest = index.sums.at(-1);
  for (const signature of index.signatures) {
    signature.signer = newest && await signerOver(new TextEncoder().encode(newest.text), signature);
  }
  return index;
}

/**
 * The fingerprint of the key that made `signature` over `sums`, checked with the public key
 * the signature carries: proof that it signs these bytes, not that the key is trusted.
 */
async function signerOver(
  sums: Uint8Array,
  signature: { text: string },
): Promise<string | undefined> {
  try {
    const blob = dearmorSignature(signature.text);
    if (!startsWithAscii(blob, SSHSIG_MAGIC)) return undefined;
    const fail = () => new ReleaseError("not a signature");
    const reader = new WireReader(blob.subarray(SSHSIG_MAGIC.length), fail);
    reader.u32();
    const publicBlob = reader.string();
    const fingerprint = sshFingerprint(publicBlob);
    const own: TrustedKey = {
      principal: fingerprint,
      fingerprint,
      publicBlob,
      publicKey: readEd25519Blob(publicBlob, fail),
      origin: SIGNATURE_NAME,
    };
    return (await verifySums([own], sums, signature.text)).fingerprint;
  } catch (error) {
    if (error instanceof ReleaseError || error instanceof UsageError) return undefined;
    throw error;
  }
}

/** The union of every manifest.json copy (a newer copy wins per name), if any. */
function unionManifest(index: RemoteIndex): Manifest | undefined {
  return index.manifests.reduce<Manifest | undefined>(
    (union, next) => mergeManifests(union, next.manifest),
    undefined,
  );
}

// ---------------------------------------------------------------------------------------------
// 7c. What to upload: a pure plan from the local bundle and the release's current state
// ---------------------------------------------------------------------------------------------

type PlannedAction =
  /** Already there with the same size and checksum: `remove` lists stray copies to delete. */
  | { kind: "skip"; asset: BundleAsset; keep: Attachment; remove: Attachment[] }
  /** Not there (or only partial/unverifiable copies, removed once the new index is in). */
  | { kind: "upload"; asset: BundleAsset; remove: Attachment[] }
  /** There with other bytes: refused unless --replace, which uploads then removes. */
  | { kind: "conflict"; asset: BundleAsset; remote: Attachment[]; remoteSha256?: string };

/** What the release says a stored copy holds: its sha256, or undefined when unknown. */
type RecordedSha = (copy: Attachment) => string | undefined;

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

function refuseConflicts(plan: PlannedAction[], release: Release, options: ReleaseOptions): void {
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

/**
 * Runs `work` on `release`; a failure part-way also says what it leaves behind, as it is.
 * `progress` says how far the work got, when that helps.
 */
async function sayingWhatIsLeft<T>(
  release: Release,
  work: () => Promise<T>,
  progress = "",
): Promise<T> {
  try {
    return await work();
  } catch (error) {
    if (!(error instanceof ReleaseError)) throw error;
    const left = release.draft
      ? "the release stays a draft: rerun the same command to resume"
      : `the published release ${release.tag_name} still has its SHA256SUMS and every copy it lists (new copies may sit beside them): rerun the same command to finish`;
    throw new ReleaseError(`${error.message}; ${progress}${left}`);
  }
}

// ---------------------------------------------------------------------------------------------
// 7d. Uploads: the raw file streamed with its exact length, the stored size checked
// ---------------------------------------------------------------------------------------------

async function uploadPlanned(
  forgejo: Forgejo,
  release: Release,
  plan: PlannedAction[],
): Promise<void> {
  const uploads = plan.filter((action) => action.kind === "upload");
  for (const action of plan) {
    if (action.kind === "skip") log(`${action.asset.name}: already in the release, skipped`);
  }
  for (const [done, action] of uploads.entries()) {
    await sayingWhatIsLeft(release, async () => {
      const stored = await uploadAsset(forgejo, release.id, action.asset, release.assets);
      await recordUpload(forgejo, release.id, action.asset, stored);
    }, `${done} of ${uploads.length} uploads had finished and `);
  }
}

/**
 * Uploads one asset, retrying a transient failure. A POST is not idempotent: the failed
 * attempt may have been stored after all, so before sending again it looks, and keeps a
 * complete copy that arrived or deletes a partial one. `before`: the release's assets
 * before this upload, to tell this upload's copies from older ones.
 */
async function uploadAsset(
  forgejo: Forgejo,
  releaseId: number,
  asset: BundleAsset,
  before: Attachment[],
): Promise<Attachment> {
  const what = `upload of ${asset.name} (${formatBytes(asset.size)})`;
  for (let attempt = 1;; attempt++) {
    if (attempt > 1) {
      const arrived = await copiesSince(forgejo, releaseId, asset, before);
      if (arrived) return arrived;
    }
    try {
      const stored = await forgejo.assets.upload(releaseId, asset);
      if (stored.size === asset.size) return stored;
      await deleteAsset(forgejo, releaseId, stored, "a truncated upload");
      throw new HttpError(`Forgejo stored ${stored.size} of ${asset.size} bytes`, true);
    } catch (error) {
      if (!(error instanceof HttpError) || !error.transient) throw error;
      if (attempt >= TRIES) {
        throw new ReleaseError(`${what} failed ${TRIES} times (${error.message})`);
      }
      const delay = backoffMs(forgejo.http, attempt, error.retryAfter);
      log(
        `${what}: ${error.message}; retrying in ${(delay / 1000).toFixed(1)}s (${attempt}/${
          TRIES - 1
        })`,
      );
      await sleep(delay);
    }
  }
}

/** A complete copy of `asset` stored since `before` by a failed attempt; partial ones go. */
async function copiesSince(
  forgejo: Forgejo,
  releaseId: number,
  asset: BundleAsset,
  before: Attachment[],
): Promise<Attachment | undefined> {
  const arrived = (await forgejo.assets.list(releaseId)).filter((copy) =>
    copy.name === asset.name && !before.some((old) => old.id === copy.id)
  );
  for (const copy of arrived) {
    // Index files may be another job's fresh copy: only identical bytes are ours.
    const ours = copy.size === asset.size &&
      (asset.path !== undefined ||
        sha256Hex(new TextEncoder().encode(await forgejo.assets.text(copy) ?? "")) ===
          asset.sha256);
    if (ours) {
      log(`${asset.name}: the failed attempt was stored after all (id ${copy.id}); kept it`);
      return copy;
    }
    if (asset.path !== undefined) {
      await deleteAsset(forgejo, releaseId, copy, "a partial upload");
    }
  }
  return undefined;
}

async function deleteAsset(
  forgejo: Forgejo,
  releaseId: number,
  copy: Attachment,
  why: string,
): Promise<void> {
  await forgejo.assets.remove(releaseId, copy);
  log(`Deleted ${why}: ${copy.name} (id ${copy.id}, ${copy.size} bytes)`);
}

/** Streams a file in 1 MiB chunks and shows progress: a bar on a terminal, a few lines in CI. */
async function* readWithProgress(asset: BundleAsset): AsyncIterable<Uint8Array> {
  if (asset.path === undefined) throw new ReleaseError(`${asset.name} has no file to upload`);
  const terminal = !output.ci && Deno.stderr.isTerminal();
  const large = asset.size >= 64 << 20;
  let sent = 0;
  let reported = 0;
  for await (const chunk of createReadStream(asset.path, { highWaterMark: READ_SIZE })) {
    sent += chunk.length;
    yield chunk;
    const percent = Math.floor((sent / asset.size) * 100);
    if (terminal && large) {
      const bar = "#".repeat(Math.floor(percent / 4)).padEnd(25, ".");
      drawProgress(`\r${asset.name} [${bar}] ${percent}%`);
    } else if (large && percent >= reported + 25) {
      reported = percent - (percent % 25);
      log(`${asset.name}: ${reported}% of ${formatBytes(asset.size)}`);
    }
  }
  if (terminal && large) drawProgress("\n");
  if (sent !== asset.size) throw new ReleaseError(`${asset.path} changed size while uploading`);
}

// ---------------------------------------------------------------------------------------------
// 7e. SHA256SUMS and manifest.json: the union of every job's assets, written until it holds
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

/** What keeps a release from being complete, in two kinds; both empty: it is complete. */
interface Judgement {
  /**
   * SHA256SUMS and manifest.json: once each, agreeing, listing what is wanted; SHA256SUMS.sig
   * at most once and over the current SHA256SUMS (once, by `signer`, when that is given).
   */
  index: string[];
  /** The other assets: each there once, listed, with its listed size. */
  assets: string[];
}

/**
 * The one completeness judgement. `wanted`: the assets the index must list exactly (the
 * union of every job's), or undefined to accept what manifest.json lists. `signer`: the
 * fingerprint of the signing key this run holds; then the release must carry its signature.
 */
export function judgeRelease(
  assets: Pick<Attachment, "name" | "size">[],
  index: Pick<RemoteIndex, "manifests" | "sums"> & Partial<Pick<RemoteIndex, "signatures">>,
  wanted?: Pick<ManifestAsset, "name" | "sha256">[],
  signer?: string,
): Judgement {
  const problems: Judgement = { index: [], assets: [] };
  problems.index.push(...signatureProblems(index.signatures ?? [], signer));
  const manifest = index.manifests.length === 1 ? index.manifests[0] : undefined;
  const sums = index.sums.length === 1 ? index.sums[0] : undefined;
  for (
    const [name, count] of [[MANIFEST_NAME, index.manifests.length], [
      SUMS_NAME,
      index.sums.length,
    ]] as const
  ) {
    if (count !== 1) {
      problems.index.push(count === 0 ? `it has no ${name}` : `${name} is there ${count} times`);
    }
  }
  if (!manifest) return problems;
  const listed = manifest.manifest.assets;
  if (sums && !sumsAgree(sums.text, listed, manifest.sha256)) {
    problems.index.push(`${SUMS_NAME} does not agree with ${MANIFEST_NAME}`);
  }
  const same = (a: { name: string; sha256: string }, b: { name: string; sha256: string }) =>
    a.name === b.name && a.sha256 === b.sha256;
  for (const asset of wanted ?? []) {
    if (!listed.some((entry) => same(entry, asset))) {
      problems.index.push(`${SUMS_NAME} does not list ${asset.name} as built`);
    }
  }
  for (const entry of wanted ? listed : []) {
    if (!wanted?.some((asset) => same(entry, asset))) {
      problems.index.push(`${SUMS_NAME} lists ${entry.name}, which is not wanted`);
    }
  }
  const copies = new Map<string, number[]>();
  for (const asset of assets) copies.set(asset.name, [...copies.get(asset.name) ?? [], asset.size]);
  for (const [name, sizes] of copies) {
    if (INDEX_NAMES.has(name)) continue;
    if (sizes.length > 1) problems.assets.push(`${name} is there ${sizes.length} times`);
    else if (!listed.some((entry) => entry.name === name)) {
      problems.assets.push(`${name} is not covered by ${SUMS_NAME}`);
    }
  }
  for (const entry of listed) {
    const sizes = copies.get(entry.name);
    if (!sizes) problems.assets.push(`${entry.name} is listed in ${SUMS_NAME} but missing`);
    else if (sizes.length === 1 && sizes[0] !== entry.size) {
      problems.assets.push(`${entry.name} has ${sizes[0]} bytes, not ${entry.size}`);
    }
  }
  return problems;
}

function signatureProblems(
  signatures: Pick<RemoteIndex["signatures"][number], "signer">[],
  signer: string | undefined,
): string[] {
  if (signatures.length > 1) return [`${SIGNATURE_NAME} is there ${signatures.length} times`];
  const [signature] = signatures;
  if (!signature) return signer ? [`it has no ${SIGNATURE_NAME}`] : [];
  if (signature.signer === undefined) {
    return [`${SIGNATURE_NAME} does not sign the current ${SUMS_NAME}`];
  }
  if (signer && signature.signer !== signer) {
    return [`${SIGNATURE_NAME} is by ${signature.signer}, not by the signing key ${signer}`];
  }
  return [];
}

/** SHA256SUMS lists every asset and manifest.json (releases before that did not list it). */
function sumsAgree(text: string, assets: ManifestAsset[], manifestSha: string): boolean {
  return text === renderSums([...assets, { name: MANIFEST_NAME, sha256: manifestSha }]) ||
    text === renderSums(assets);
}

/** All problems of a judgement, as one list. */
function problemsOf(judgement: Judgement): string[] {
  return [...judgement.index, ...judgement.assets];
}

/**
 * Writes SHA256SUMS and manifest.json covering every asset, re-reading until exactly one of
 * each is there and lists what every job built; then removes the copies this run replaced.
 * Jobs writing at once converge: each writes the union of every copy it sees, and deletes
 * only older manifest copies whose every name its own lists, so no job's entries are lost.
 */
async function writeIndex(
  forgejo: Forgejo,
  draft: Release,
  bundle: Bundle,
  plan: PlannedAction[],
  options: ReleaseOptions,
): Promise<void> {
  await sayingWhatIsLeft(draft, async () => {
    const key = options.signingKey;
    for (let round = 1; round <= 8; round++) {
      // Jobs that collide back off by different amounts, so one of them settles first.
      if (round > 1) await sleep(100 + Math.random() * 400);
      const release = await forgejo.releases.get(draft.id);
      const index = await readIndex(forgejo, release);
      const merged = mergeManifests(unionManifest(index), bundle.manifest);
      if (judgeRelease(release.assets, index, merged.assets, key?.fingerprint).index.length === 0) {
        // Only now, with the new SHA256SUMS in, may the copies it no longer lists go.
        const replaced = plan.flatMap((action) => action.kind === "conflict" ? [] : action.remove);
        for (const copy of replaced) {
          await deleteAsset(forgejo, release.id, copy, "a stray or replaced copy");
        }
        await updateBody(forgejo, release, index.manifests[0].manifest, options);
        return;
      }
      const newest = { manifests: index.manifests.slice(-1), sums: index.sums.slice(-1) };
      const written = judgeRelease([], newest, merged.assets).index.length === 0
        ? {
          manifest: newest.manifests[0].copy.id,
          sums: newest.sums[0].copy.id,
          signature: await keepOrSign(forgejo, release, index, key),
        }
        : await uploadIndex(forgejo, release, merged, key);
      const older = [
        ...index.manifests.filter((m) =>
          m.copy.id < written.manifest &&
          m.manifest.assets.every((asset) => merged.assets.some((mine) => mine.name === asset.name))
        ),
        // Older SHA256SUMS copies only restate manifests that were merged above.
        ...index.sums.filter((s) => s.copy.id < written.sums),
        // A signature goes with the SHA256SUMS it signs.
        ...index.signatures.filter((s) => s.copy.id !== written.signature),
      ];
      for (const { copy } of older) await deleteAsset(forgejo, release.id, copy, "an older index");
    }
    throw new ReleaseError(
      `${SUMS_NAME} of ${options.tag} kept changing under this run (other jobs writing)`,
    );
  });
}

/**
 * manifest.json first, then SHA256SUMS, which lists the manifest's checksum too, then (with a
 * key) SHA256SUMS.sig over exactly those bytes.
 */
async function uploadIndex(
  forgejo: Forgejo,
  release: Release,
  merged: Manifest,
  key: SigningKey | undefined,
): Promise<{ manifest: number; sums: number; signature?: number }> {
  const fresh = bundleRelease([], merged);
  const manifest = await uploadAsset(forgejo, release.id, fresh.manifestAsset, release.assets);
  const sums = await uploadAsset(forgejo, release.id, fresh.sums, release.assets);
  log(`Wrote ${SUMS_NAME} and ${MANIFEST_NAME} covering ${merged.assets.length} assets`);
  const signature = key && await uploadSignature(forgejo, release, fresh.sums.bytes, key);
  return { manifest: manifest.id, sums: sums.id, signature };
}

/**
 * The signature to keep beside the newest SHA256SUMS: the newest one over its bytes (by
 * `key`, when a key is held), else, holding a key, a new one. Undefined: none is kept.
 */
async function keepOrSign(
  forgejo: Forgejo,
  release: Release,
  index: RemoteIndex,
  key: SigningKey | undefined,
): Promise<number | undefined> {
  const good = index.signatures.filter((s) =>
    s.signer !== undefined && (!key || s.signer === key.fingerprint)
  );
  const sums = index.sums.at(-1);
  if (good.length > 0 || !key || !sums) return good.at(-1)?.copy.id;
  return await uploadSignature(forgejo, release, new TextEncoder().encode(sums.text), key);
}

async function uploadSignature(
  forgejo: Forgejo,
  release: Release,
  sums: Uint8Array,
  key: SigningKey,
): Promise<number> {
  const asset = bytesAsset(SIGNATURE_NAME, await signSums(key, sums));
  const stored = await uploadAsset(forgejo, release.id, asset, release.assets);
  log(`Signed ${SUMS_NAME} with ${key.fingerprint} (${SIGNATURE_NAME})`);
  return stored.id;
}

async function updateBody(
  forgejo: Forgejo,
  release: Release,
  manifest: Manifest,
  options: ReleaseOptions,
): Promise<void> {
  const body = withUploadRecord(releaseBody(manifest, options), readUploadRecord(release.body));
  if (release.body !== body) await forgejo.releases.edit(release.id, { body });
}

/** The release page, readably: what it is, where it came from, and how to check it. */
export function releaseBody(manifest: Manifest, options: Pick<ReleaseOptions, "site">): string {
  const commitUrl = `${options.site?.server}/${options.site?.repo}/commit/${manifest.commit}`;
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
// 7f. Publish once everything is there, then confirm it
// ---------------------------------------------------------------------------------------------

/**
 * Publishes the draft once it is complete. When another job's assets are there but not yet
 * covered, that job is still writing: wait (up to --timeout) for it to cover them.
 */
async function publishWhenComplete(
  forgejo: Forgejo,
  draft: Release,
  options: ReleaseOptions,
): Promise<Release> {
  const deadline = Date.now() + options.http.timeoutMs;
  for (let waited = false;; waited = true) {
    if (waited) await sleep(1000);
    const release = await forgejo.releases.get(draft.id);
    const problems = problemsOf(
      judgeRelease(
        release.assets,
        await readIndex(forgejo, release),
        undefined,
        options.signingKey?.fingerprint,
      ),
    );
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
  await forgejo.releases.edit(release.id, { draft: false });
  const published = await forgejo.releases.get(release.id);
  if (published.draft) {
    throw new ReleaseError(`Forgejo did not publish ${release.tag_name}; rerun to try again`);
  }
  log(`Published ${published.tag_name}`);
  return published;
}

/** The last job of a matrix: no build, just check the assembled draft and publish it. */
async function finalizeRelease(
  forgejo: Forgejo,
  options: ReleaseOptions,
  env: Env,
): Promise<void> {
  const found = await forgejo.releases.byTag(options.tag);
  if (!found) {
    throw new ReleaseError(
      `there is no release ${options.tag} to finalize: run the build jobs first (with --draft)`,
    );
  }
  await refuseTagOnOtherCommit(forgejo, options);
  const adopted = await adoptRelease(forgejo, found, options);
  const key = options.signingKey;
  const unsigned = await readIndex(forgejo, adopted);
  const withoutSignature = { manifests: unsigned.manifests, sums: unsigned.sums };
  if (key && problemsOf(judgeRelease(adopted.assets, withoutSignature)).length === 0) {
    await signIfUnsigned(forgejo, adopted, unsigned, key);
  }
  const release = await forgejo.releases.get(adopted.id);
  const index = await readIndex(forgejo, release);
  const problems = problemsOf(judgeRelease(release.assets, index, undefined, key?.fingerprint));
  if (problems.length > 0) {
    throw new ReleaseError(
      `release ${options.tag} is not complete, so it ${
        release.draft ? "stays a draft" : "is left as it is"
      }: ${problems.join("; ")}${
        !key && problems.some((p) => p.includes(SIGNATURE_NAME))
          ? ` (rerun with --signing-key or ${SIGNING_KEY_ENV} to sign it again)`
          : ""
      }`,
    );
  }
  const published = release.draft ? await publishDraft(forgejo, release) : release;
  await reportRelease(published, index.manifests[0].manifest, env);
}

/**
 * Holding the key, finalize signs the complete index itself when its signature is missing,
 * stale or another key's, and removes every other signature copy.
 */
async function signIfUnsigned(
  forgejo: Forgejo,
  release: Release,
  index: RemoteIndex,
  key: SigningKey,
): Promise<void> {
  const kept = await keepOrSign(forgejo, release, index, key);
  for (const { copy } of index.signatures.filter((s) => s.copy.id !== kept)) {
    await deleteAsset(forgejo, release.id, copy, "a signature of other bytes");
  }
}

async function reportRelease(release: Release, manifest: Manifest, env: Env): Promise<void> {
  if (env.GITHUB_OUTPUT) {
    await fs.appendFile(
      env.GITHUB_OUTPUT,
      `release-url=${release.html_url}\ntag=${release.tag_name}\nrelease-id=${release.id}\n`,
    );
  }
  if (env.GITHUB_STEP_SUMMARY) {
    const rows = manifest.assets.map((a) =>
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
  result(release.html_url);
}
// ---------------------------------------------------------------------------------------------
// 8. fetch: a published release laid out for booting, every byte checked before it is kept
// ---------------------------------------------------------------------------------------------

async function fetchForBoot(options: FetchOptions, env: Env): Promise<void> {
  const out = path.resolve(options.out);
  if (options.rollback) {
    if (!(await lstatOrUndefined(out))) throw new ReleaseError(`there is no ${out} to roll back`);
    return await withBootLock(out, () => rollBack(out));
  }
  // A mirror serves public files; the primary server's token has no business there.
  const token = mirrorOf(options.site.server, options.mirrors) ? undefined : readToken(env);
  const forgejo = connectForgejo(options.site, token, options);
  const release = await step("Find the release", () => findBootRelease(forgejo, options.tag));
  const tag = release.tag_name;
  const directory = tagDirectoryName(tag);
  // Everything that decides whether to trust the release happens before DIR is touched.
  const index = await readIndex(forgejo, release);
  const sums = await authenticSums(index, tag, options.trust);
  const boot = await chooseBootFiles(forgejo, release, index, sums, options);
  const dir = await withBootLock(out, async () => {
    const dir = await openTagDirectory(out, directory);
    await step("Download and verify", async () => {
      for (const file of boot.files) await downloadVerified(forgejo, release, file, dir);
    });
    await writeBootDirectory(dir, boot);
    await pointCurrentAt(out, directory);
    await removeOldReleases(out, options.keep);
    return dir;
  });
  log(
    `${tag}: ${boot.files.length} files verified in ${dir}; ${
      path.join(out, CURRENT)
    } points at it: serve that over HTTP and chain netboot.ipxe`,
  );
  result(dir);
}

/** `latest` is the newest published boot-v* release: never a draft, pre-release or boot-dev. */
async function findBootRelease(forgejo: Forgejo, tag: string): Promise<Release> {
  if (tag === "latest") {
    const published = await forgejo.releases.list({ draft: false, prerelease: false });
    const found = published.find((r) =>
      r.tag_name.startsWith("boot-v") && !r.draft && !r.prerelease
    );
    if (!found) {
      throw new ReleaseError(`${forgejo.repo} has no published boot-v* release yet; pass --tag`);
    }
    return found;
  }
  const release = await forgejo.releases.byTag(tag);
  if (!release) {
    throw new ReleaseError(
      `${forgejo.repo} has no release ${tag} that this token can see; check --tag`,
    );
  }
  if (release.draft) {
    throw new ReleaseError(`${tag} is still a draft: publish it before booting from it`);
  }
  return release;
}

/**
 * SHA256SUMS as the release holds it, the root every file is checked against. With --trust
 * its signature must verify against a trusted key first; without, one line says that only
 * integrity, not authenticity, is checked.
 */
async function authenticSums(
  index: RemoteIndex,
  tag: string,
  trust: TrustedKey[] | undefined,
): Promise<Map<string, string>> {
  if (index.sums.length !== 1) {
    throw new ReleaseError(
      index.sums.length === 0
        ? `${tag} has no ${SUMS_NAME}: it was not finished, or not made to be verified; nothing can be checked`
        : `${tag} holds ${SUMS_NAME} ${index.sums.length} times: it is not finished; fetch it once it has one`,
    );
  }
  const sums = index.sums[0].text;
  if (trust) {
    const signature = index.signatures.at(-1);
    if (!signature) {
      throw new ReleaseError(
        `${tag} has no ${SIGNATURE_NAME}, so nothing proves who made its ${SUMS_NAME}; nothing was changed: publish it with a signing key, or drop --trust to check integrity only`,
      );
    }
    const signer = await verifySums(trust, new TextEncoder().encode(sums), signature.text);
    log(`${tag}: ${SUMS_NAME} is signed by ${signer.principal} (${signer.fingerprint})`);
  } else {
    log(
      `${tag}: files are checked against its ${SUMS_NAME} (integrity), but not who made it (authenticity): pass --trust FILE to require its signature`,
    );
  }
  return plainNames(parseSums(sums), tag);
}

/** A release names files: never a path, which could reach outside the directory written. */
function plainNames(sums: Map<string, string>, tag: string): Map<string, string> {
  const bad = [...sums.keys()].find((name) => !ASSET_NAME.test(name));
  if (bad !== undefined) {
    throw new ReleaseError(
      `${SUMS_NAME} of ${tag} lists ${
        JSON.stringify(bad)
      }, which is not a plain file name: refusing to trust the release`,
    );
  }
  return sums;
}

/** manifest.json's assets of the chosen targets; a target it has no files for is refused. */
function assetsOfTargets(
  manifest: Pick<Manifest, "assets">,
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
  return manifest.assets.filter((a) => targets.includes(a.target) && a.system === system);
}

/** The assets of the chosen targets, each with the checksum SHA256SUMS gives it. */
export function chooseAssets(
  manifest: Pick<Manifest, "assets">,
  sums: Map<string, string>,
  targets: string[],
  system: string,
  tag: string,
): ManifestAsset[] {
  const wanted = assetsOfTargets(manifest, targets, system, tag);
  for (const asset of wanted) {
    if (sums.get(asset.name) !== asset.sha256) {
      throw new ReleaseError(
        `${asset.name} is not listed in ${tag}'s ${SUMS_NAME} as ${MANIFEST_NAME} says: the release is inconsistent, refusing to trust it`,
      );
    }
  }
  return wanted;
}

/** One file to download, with the checksum SHA256SUMS gives it. */
interface BootFile {
  name: string;
  sha256: string;
}

/** An iPXE script to write beside the files, from `from` with its images found by `locate`. */
interface LocalScript {
  from: string;
  name: string;
  locate: (file: string) => string | undefined;
}

interface BootSet {
  files: BootFile[];
  scripts: LocalScript[];
}

/**
 * The files to boot: with manifest.json (checked against SHA256SUMS), the chosen targets'
 * assets; without it, a release another tool made, the iPXE script and the kernel and initrd
 * it names, or failing a script, the one kernel and one initrd by their names.
 */
async function chooseBootFiles(
  forgejo: Forgejo,
  release: Release,
  index: RemoteIndex,
  sums: Map<string, string>,
  options: DownloadOptions,
): Promise<BootSet> {
  const tag = release.tag_name;
  const listed = sums.get(MANIFEST_NAME);
  const manifest = listed === undefined
    ? unionManifest(index)
    : index.manifests.find((copy) => copy.sha256 === listed)?.manifest;
  if (listed !== undefined && !manifest) {
    throw new ReleaseError(
      `${tag}'s ${MANIFEST_NAME} does not match its ${SUMS_NAME}: the release was changed, refusing to trust it`,
    );
  }
  if (manifest) return bootFilesOf(manifest, sums, options.targets, options.system, tag);
  const scripts = [...sums.keys()].filter((name) => name.endsWith(".ipxe"));
  if (scripts.length === 0) {
    const boot = bootFilesByName(sums, tag);
    log(`${tag} has no iPXE script: fetching its kernel and initrd only; boot them with your own`);
    return boot;
  }
  const script = oneScript(scripts, options, tag);
  const copy = release.assets.find((asset) => asset.name === script);
  if (!copy) throw new ReleaseError(`${tag} lists ${script} but does not hold it`);
  const text = await forgejo.assets.text(copy);
  if (text === undefined || sha256Hex(new TextEncoder().encode(text)) !== sums.get(script)) {
    throw new ReleaseError(`${script} of ${tag} does not match ${SUMS_NAME}; refusing to boot it`);
  }
  return bootFilesOfScript(script, text, sums, tag);
}

/** The assets of the chosen targets from manifest.json, each as SHA256SUMS lists it. */
function bootFilesOf(
  manifest: Pick<Manifest, "assets">,
  sums: Map<string, string>,
  targets: string[],
  system: string,
  tag: string,
): BootSet {
  const assets = assetsOfTargets(manifest, targets, system, tag);
  const files = assets.map((asset) => {
    const sha256 = sums.get(asset.name);
    if (!sha256) {
      throw new ReleaseError(
        `${asset.name} is not listed in ${tag}'s ${SUMS_NAME}: the release is inconsistent, refusing to trust it`,
      );
    }
    return { name: asset.name, sha256 };
  });
  const built = assets.filter((a) => a.name.endsWith(".built.ipxe"));
  const scripts = built.map((script) => ({
    from: script.name,
    name: built.length === 1
      ? "netboot.ipxe"
      : script.name.replace(/\.built\.ipxe$/, ".local.ipxe"),
    locate: (file: string) => {
      const found = assets.find((a) =>
        a.target === script.target && a.system === script.system && a !== script &&
        !a.name.endsWith(".ipxe") && path.basename(a.storePath) === file
      );
      return found && encodeURIComponent(found.name);
    },
  }));
  return { files, scripts };
}

function oneScript(scripts: string[], options: DownloadOptions, tag: string): string {
  if (scripts.length === 1) return scripts[0];
  const fitting = scripts.filter((name) =>
    name.includes(options.system) && options.targets.some((target) => name.includes(target))
  );
  if (fitting.length === 1) return fitting[0];
  throw new ReleaseError(
    `${tag} has no ${MANIFEST_NAME} and ${
      fitting.length === 0 ? "none" : "more than one"
    } of its iPXE scripts (${
      scripts.join(", ")
    }) fits --targets and --system: cannot tell which to boot`,
  );
}

/** A release without manifest.json: the script and the images its kernel/initrd lines fetch. */
export function bootFilesOfScript(
  script: string,
  text: string,
  sums: Map<string, string>,
  tag: string,
): BootSet {
  // iPXE names an image after its URI's last segment; the release holds it under that name.
  const nameOf = (uri: string) => {
    const last = uri.split(/[?#]/)[0].split("/").filter(Boolean).at(-1) ?? uri;
    try {
      return decodeURIComponent(last);
    } catch {
      return last;
    }
  };
  const fetched = { kernel: [] as string[], initrd: [] as string[] };
  for (const line of text.split("\n")) {
    const command = line.trim().split(/\s+/)[0];
    if (command !== "kernel" && command !== "initrd") continue;
    // rewriteIpxe reads the line's tokens: its first question is the image the line fetches.
    let image: string | undefined;
    rewriteIpxe(line, (uri) => {
      image ??= uri;
      return undefined;
    });
    if (image) fetched[command].push(image);
  }
  const held = (uris: string[]) => uris.map(nameOf).filter((name) => sums.has(name));
  const kernels = held(fetched.kernel);
  const initrds = held(fetched.initrd);
  if (kernels.length === 0 || initrds.length === 0) {
    const named = [...fetched.kernel, ...fetched.initrd];
    throw new ReleaseError(
      `${script} of ${tag} names no ${
        kernels.length === 0 ? "kernel" : "initrd"
      } that ${tag} holds${
        named.length > 0 ? ` (it fetches ${named.join(", ")})` : ""
      }: cannot tell what to boot`,
    );
  }
  const images = new Set([...kernels, ...initrds]);
  const local = script === "netboot.ipxe" ? "netboot.local.ipxe" : "netboot.ipxe";
  return {
    files: [script, ...images].map((name) => listedFile(sums, name, tag)),
    scripts: [{
      from: script,
      name: local,
      locate: (uri) => images.has(nameOf(uri)) ? encodeURIComponent(nameOf(uri)) : undefined,
    }],
  };
}

/** A file SHA256SUMS lists, with the checksum it gives it. */
function listedFile(sums: Map<string, string>, name: string, tag: string): BootFile {
  const sha256 = sums.get(name);
  if (sha256 === undefined) throw new ReleaseError(`${tag}'s ${SUMS_NAME} does not list ${name}`);
  return { name, sha256 };
}

const KERNEL_NAME = /bzImage|vmlinuz|(^|[-_.])Image([-_.]|$)|kernel/;
const INITRD_NAME = /initrd|initramfs/;

/** No manifest.json, no iPXE script: one kernel and one initrd, told by their names. */
export function bootFilesByName(sums: Map<string, string>, tag: string): BootSet {
  const kernels = [...sums.keys()].filter((name) => KERNEL_NAME.test(name));
  const initrds = [...sums.keys()].filter((name) => INITRD_NAME.test(name));
  if (kernels.length !== 1 || initrds.length !== 1) {
    throw new ReleaseError(
      `${tag} has no ${MANIFEST_NAME}, no iPXE script, and not one kernel and one initrd by name (${
        [...sums.keys()].join(", ") || "no files"
      }): cannot tell what to boot`,
    );
  }
  return {
    files: [kernels[0], initrds[0]].map((name) => listedFile(sums, name, tag)),
    scripts: [],
  };
}

// --- The boot directory: DIR/<tag>/ per release, DIR/current and DIR/previous point at them --

const CURRENT = "current";
const PREVIOUS = "previous";
const LOCK_NAME = ".release-boot.lock";
/** In every tag directory release-boot made: its tag, and by its mtime when it was fetched. */
const TAG_MARK = ".release-boot-tag";

/** A tag as one directory name: `/` (valid in a tag) cannot make a subdirectory. */
function tagDirectoryName(tag: string): string {
  const name = tag.replaceAll("/", "%2F");
  if (name === CURRENT || name === PREVIOUS || name.startsWith(".")) {
    throw new ReleaseError(`a release tagged ${tag} cannot get a directory of its own in DIR`);
  }
  return name;
}

/** Thrown for anything in DIR release-boot did not make: it is never written through. */
function notOurs(file: string, what: string): ReleaseError {
  return new ReleaseError(
    `${file} is ${what}, which release-boot did not make: nothing was written through it; remove it, or fetch into another --out`,
  );
}

async function lstatOrUndefined(file: string) {
  return await fs.lstat(file).catch((error: NodeJS.ErrnoException) => {
    if (error.code === "ENOENT") return undefined;
    throw new ReleaseError(`cannot read ${file} (${error.code ?? error.message})`);
  });
}

/**
 * One fetch at a time per DIR: a lock file holding the pid, created exclusively. A lock whose
 * process is gone is taken over; a live one makes this fetch stop at once.
 */
async function withBootLock<T>(out: string, work: () => Promise<T>): Promise<T> {
  const root = await lstatOrUndefined(out);
  if (root && !root.isDirectory()) {
    const real = await fs.stat(out).catch(() => undefined);
    if (!real?.isDirectory()) throw new ReleaseError(`--out ${out} is not a directory`);
  }
  await fs.mkdir(out, { recursive: true }).catch((error: NodeJS.ErrnoException) => {
    throw new ReleaseError(`cannot make --out ${out} (${error.code ?? error.message})`);
  });
  const lock = path.join(out, LOCK_NAME);
  await takeLock(lock);
  try {
    await removeHalfMade(out);
    return await work();
  } finally {
    await fs.rm(lock, { force: true });
  }
}

async function takeLock(lock: string): Promise<void> {
  for (let attempt = 1;; attempt++) {
    try {
      await fs.writeFile(lock, `${process.pid}\n`, { flag: "wx" });
      return;
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code !== "EEXIST") {
        throw new ReleaseError(
          `cannot lock ${path.dirname(lock)} (${(error as NodeJS.ErrnoException).code})`,
        );
      }
    }
    const stat = await lstatOrUndefined(lock);
    if (stat && !stat.isFile()) throw notOurs(lock, "not a lock file");
    const pid = Number((await fs.readFile(lock, "utf8").catch(() => "")).trim());
    if (attempt > 2 || (Number.isInteger(pid) && pid > 0 && isRunning(pid))) {
      throw new ReleaseError(
        `another fetch (pid ${pid || "unknown"}) is writing ${
          path.dirname(lock)
        }: let it finish and rerun; if no such process runs, remove ${lock}`,
      );
    }
    // Moved aside, not deleted: if another fetch took it over first, the moved file is
    // that fetch's live lock and goes straight back.
    const aside = `${lock}.${process.pid}.stale`;
    if (!await fs.rename(lock, aside).then(() => true, () => false)) continue;
    const moved = Number((await fs.readFile(aside, "utf8").catch(() => "")).trim());
    if (moved !== pid) {
      await fs.link(aside, lock).catch(() => undefined);
      await fs.rm(aside, { force: true });
      throw new ReleaseError(
        `another fetch (pid ${moved}) is writing ${path.dirname(lock)}: let it finish and rerun`,
      );
    }
    await fs.rm(aside, { force: true });
    log(`Taking over ${lock}: its fetch (pid ${pid || "unknown"}) is gone`);
  }
}

/** Under the lock, what a killed fetch left half-made (`.NAME.PID.new`, `.stale`) goes. */
async function removeHalfMade(out: string): Promise<void> {
  for (const entry of await fs.readdir(out)) {
    if (/^\..+\.\d+\.new$/.test(entry) || /^\.release-boot\.lock\.\d+\.stale$/.test(entry)) {
      await fs.rm(path.join(out, entry), { recursive: true, force: true });
    }
  }
}

function isRunning(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (error) {
    return (error as NodeJS.ErrnoException).code === "EPERM";
  }
}

/**
 * DIR/<tag>: made here, or made by an earlier fetch (it holds the mark). A link, a file, a
 * directory without the mark, or a link planted inside it is refused before anything is written.
 */
async function openTagDirectory(out: string, name: string): Promise<string> {
  const dir = path.join(out, name);
  const mark = path.join(dir, TAG_MARK);
  const stat = await lstatOrUndefined(dir);
  if (!stat) {
    // Made beside it and renamed into place, so DIR/<tag> never exists without its mark.
    const fresh = path.join(out, `.${name}.${process.pid}.new`);
    await fs.rm(fresh, { recursive: true, force: true });
    await fs.mkdir(fresh);
    await fs.writeFile(path.join(fresh, TAG_MARK), `${name}\n`, { flag: "wx" });
    await fs.rename(fresh, dir);
    return dir;
  }
  if (!stat.isDirectory()) {
    throw notOurs(dir, stat.isSymbolicLink() ? "a symbolic link" : "not a directory");
  }
  const marked = await lstatOrUndefined(mark);
  if (!marked?.isFile()) throw notOurs(dir, "a directory without release-boot's mark");
  for (const entry of await fs.readdir(dir)) {
    const file = path.join(dir, entry);
    const entryStat = await lstatOrUndefined(file);
    if (entryStat && !entryStat.isFile()) {
      throw notOurs(file, entryStat.isSymbolicLink() ? "a symbolic link" : "not a regular file");
    }
  }
  const now = new Date();
  await fs.utimes(mark, now, now);
  return dir;
}

/**
 * Downloads into `<name>.<sha>.part` (resuming one left by an interrupted run), hashing the
 * bytes as they are written, and only when they match SHA256SUMS renames the part to its
 * final name. A part that does not match is deleted; an existing file with other bytes is
 * refused, never replaced.
 */
async function downloadVerified(
  forgejo: Forgejo,
  release: Release,
  file: BootFile,
  dir: string,
): Promise<void> {
  const final = path.join(dir, file.name);
  const existing = await lstatOrUndefined(final);
  if (existing) {
    if (!existing.isFile()) throw notOurs(final, "not a regular file");
    if ((await hashFile(final)).sha256 === file.sha256) {
      log(`${file.name}: already here and verified`);
      return;
    }
    throw notOurs(final, `a file whose bytes ${SUMS_NAME} does not list`);
  }
  const copy = release.assets.find((a) => a.name === file.name);
  if (!copy) throw new ReleaseError(`${release.tag_name} lists ${file.name} but does not hold it`);
  // The checksum is in the name, so a part left by another release is never resumed.
  const part = `${final}.${file.sha256.slice(0, 16)}.part`;
  await removeStaleParts(dir, file.name, part);
  const got = await downloadToPart(forgejo, copy, part);
  if (got.sha256 !== file.sha256) {
    await fs.rm(part, { force: true });
    throw new ReleaseError(
      `${file.name} does not match ${SUMS_NAME} (expected ${file.sha256}, got ${got.sha256} for ${got.size} bytes); the download was deleted: rerun, and if it persists the release's file is damaged`,
    );
  }
  await renameNew(part, final);
  log(`${file.name}: ${formatBytes(got.size)}, sha256 verified`);
}

/** Renames only onto a name nothing holds: a file planted meanwhile is refused, not replaced. */
async function renameNew(from: string, to: string): Promise<void> {
  if (await lstatOrUndefined(to)) throw notOurs(to, "already there");
  await fs.rename(from, to);
}

async function removeStaleParts(dir: string, name: string, keep: string): Promise<void> {
  for (const entry of await fs.readdir(dir)) {
    const file = path.join(dir, entry);
    if (entry.startsWith(`${name}.`) && entry.endsWith(".part") && file !== keep) {
      // openTagDirectory refused links: this unlinks a regular file release-boot named.
      await fs.rm(file, { force: true });
    }
  }
}

const { O_WRONLY, O_APPEND, O_TRUNC, O_RDONLY, O_NOFOLLOW } = fsConstants;

/**
 * One GET of an asset into `part`, from where an earlier run stopped, hashed in the same pass
 * that writes it (a resumed part's bytes are hashed first). The part is opened never through
 * a link: a new one exclusively, a resumed one with O_NOFOLLOW. The client's interceptors
 * follow redirects (without the token off the Forgejo origin) and retry.
 */
async function downloadToPart(
  forgejo: Forgejo,
  copy: Attachment,
  part: string,
): Promise<{ sha256: string; size: number }> {
  const have = (await lstatOrUndefined(part))?.size ?? 0;
  const response = await forgejo.assets.open(copy, have).catch((error: Error) => {
    throw new ReleaseError(
      `the download of ${copy.name} failed (${error.message}); rerun to resume`,
    );
  });
  const hash = createHash("sha256");
  if (response.statusCode === 416 && have > 0) {
    await response.body.dump();
    return { sha256: await hashPart(part, hash), size: have }; // The part has every byte.
  }
  if (response.statusCode !== 200 && response.statusCode !== 206) {
    const text = await readCapped(response.body, MAX_API_BODY, `GET ${copy.name}`);
    throw new ReleaseError(
      explainStatus(forgejo, { status: response.statusCode, text }, `download of ${copy.name}`),
    );
  }
  const range = String(response.headers["content-range"] ?? "");
  if (response.statusCode === 206 && !range.startsWith(`bytes ${have}-`)) {
    await response.body.dump();
    await fs.rm(part, { force: true });
    throw new ReleaseError(
      `the server resumed ${copy.name} at ${
        range || "an unknown offset"
      }, not at ${have}; rerun to download it whole`,
    );
  }
  const resuming = have > 0 && response.statusCode === 206;
  if (resuming) {
    log(`${copy.name}: resuming after ${formatBytes(have)}`);
    await hashPart(part, hash);
  }
  const flags = have === 0 ? "wx" : O_WRONLY | O_NOFOLLOW | (resuming ? O_APPEND : O_TRUNC);
  const handle = await fs.open(part, flags).catch((error: NodeJS.ErrnoException) => {
    throw error.code === "ELOOP" || error.code === "EEXIST"
      ? notOurs(part, "a symbolic link or a file planted meanwhile")
      : new ReleaseError(`cannot write ${part} (${error.code ?? error.message})`);
  });
  let size = resuming ? have : 0;
  try {
    for await (const chunk of response.body) {
      hash.update(chunk);
      size += chunk.length;
      await handle.write(chunk);
    }
  } catch (error) {
    throw new ReleaseError(
      `the download of ${copy.name} stopped (${(error as Error).message}); rerun to resume`,
    );
  } finally {
    await handle.close();
  }
  return { sha256: hash.digest("hex"), size };
}

/** Feeds a part's bytes into `hash`, read never through a link; returns the digest's hex. */
async function hashPart(part: string, hash: ReturnType<typeof createHash>): Promise<string> {
  const handle = await fs.open(part, O_RDONLY | O_NOFOLLOW).catch(() => {
    throw notOurs(part, "a symbolic link");
  });
  try {
    for await (const chunk of handle.createReadStream({ highWaterMark: READ_SIZE })) {
      hash.update(chunk);
    }
  } finally {
    await handle.close();
  }
  return hash.copy().digest("hex");
}

/**
 * Makes the directory servable as it is: its own SHA256SUMS, and netboot.ipxe rewritten
 * from the script as published so that kernel and initrd load from beside it.
 */
async function writeBootDirectory(dir: string, boot: BootSet): Promise<void> {
  await writeOwnFile(path.join(dir, SUMS_NAME), renderSums(boot.files));
  for (const script of boot.scripts) {
    const handle = await fs.open(path.join(dir, script.from), O_RDONLY | O_NOFOLLOW);
    const text = await handle.readFile("utf8").finally(() => handle.close());
    await writeOwnFile(path.join(dir, script.name), rewriteIpxe(text, script.locate));
    log(`${script.name}: loads its kernel and initrd from the same directory`);
  }
}

/** Writes a file release-boot makes; one already there with other bytes is not ours. */
async function writeOwnFile(file: string, text: string): Promise<void> {
  const existing = await lstatOrUndefined(file);
  if (existing) {
    if (existing.isFile() && await fs.readFile(file, "utf8") === text) return;
    throw notOurs(file, existing.isFile() ? "a file with other contents" : "not a regular file");
  }
  const part = `${file}.part`;
  await fs.rm(part, { force: true });
  await fs.writeFile(part, text, { flag: "wx" });
  await renameNew(part, file);
}

/** The tag directory a link in DIR names, if it is one release-boot made; else undefined. */
async function linkTarget(out: string, name: string): Promise<string | undefined> {
  const link = path.join(out, name);
  const stat = await lstatOrUndefined(link);
  if (!stat) return undefined;
  if (!stat.isSymbolicLink()) throw notOurs(link, "not a symbolic link");
  const target = await fs.readlink(link);
  if (target.includes("/") || target.startsWith(".")) {
    throw notOurs(link, `a link to ${target}`);
  }
  return target;
}

/** Replaces (or makes) the link DIR/<name> -> <target> in one rename: never half-pointed. */
async function pointLink(out: string, name: string, target: string): Promise<void> {
  const fresh = path.join(out, `.${name}.${process.pid}.new`);
  await fs.rm(fresh, { force: true });
  await fs.symlink(target, fresh);
  await fs.rename(fresh, path.join(out, name));
}

/** DIR/current -> the new tag; DIR/previous -> what current was, when that differs. */
async function pointCurrentAt(out: string, directory: string): Promise<void> {
  const before = await linkTarget(out, CURRENT);
  await linkTarget(out, PREVIOUS);
  if (before === directory) return;
  if (before) await pointLink(out, PREVIOUS, before);
  await pointLink(out, CURRENT, directory);
  log(`${path.join(out, CURRENT)} -> ${directory}${before ? ` (previous: ${before})` : ""}`);
}

/** fetch --rollback: current and previous swap, so a second rollback rolls forward again. */
async function rollBack(out: string): Promise<void> {
  const current = await linkTarget(out, CURRENT);
  const previous = await linkTarget(out, PREVIOUS);
  if (!previous) {
    throw new ReleaseError(
      `${out} has no previous release to roll back to: fetch at least two releases into it first`,
    );
  }
  const stat = await lstatOrUndefined(path.join(out, previous));
  if (!stat?.isDirectory()) {
    throw new ReleaseError(`${path.join(out, previous)} is gone: fetch that release again`);
  }
  if (current) await pointLink(out, PREVIOUS, current);
  await pointLink(out, CURRENT, previous);
  log(
    `Rolled back: ${path.join(out, CURRENT)} -> ${previous}${current ? ` (was ${current})` : ""}`,
  );
  result(path.join(out, previous));
}

/** Keeps the `keep` most recently fetched tag directories, and always current and previous. */
async function removeOldReleases(out: string, keep: number): Promise<void> {
  const pinned = new Set([await linkTarget(out, CURRENT), await linkTarget(out, PREVIOUS)]);
  const fetched: { name: string; at: number }[] = [];
  for (const name of await fs.readdir(out)) {
    if (name.startsWith(".") || name === CURRENT || name === PREVIOUS) continue;
    const stat = await lstatOrUndefined(path.join(out, name));
    const mark = stat?.isDirectory() && await lstatOrUndefined(path.join(out, name, TAG_MARK));
    if (mark && mark.isFile()) fetched.push({ name, at: mark.mtimeMs });
  }
  fetched.sort((a, b) => b.at - a.at);
  const kept = new Set([...pinned].filter((name) => name !== undefined));
  for (const { name } of fetched) {
    if (kept.size < keep) kept.add(name);
  }
  for (const { name } of fetched.filter(({ name }) => !kept.has(name))) {
    await fs.rm(path.join(out, name), { recursive: true });
    log(`Removed ${path.join(out, name)} (--keep ${keep})`);
  }
}

// ---------------------------------------------------------------------------------------------
// 9. verify: rebuild a release from its commit and compare every file with SHA256SUMS
// ---------------------------------------------------------------------------------------------

async function verifyRelease(options: VerifyOptions, env: Env): Promise<void> {
  // Read like fetch: a mirror serves public files, and never sees the primary's token.
  const token = mirrorOf(options.site.server, options.mirrors) ? undefined : readToken(env);
  const trusted = options.trust === undefined ? undefined : await readTrust(options.trust);
  const forgejo = connectForgejo(options.site, token, options);
  const release = await step("Find the release", () => findBootRelease(forgejo, options.tag));
  const { manifest, sums } = await step(
    "Read SHA256SUMS and manifest.json",
    () => readIndexToVerify(forgejo, release, trusted),
  );
  const scope = rebuildScope(manifest, sums, options.system);
  const repository = await forgejo.repository();
  const flake = options.flake ?? releaseFlake(repository, manifest);
  log(`Rebuilding ${release.tag_name} from ${flake}`);
  await step("Check the flake", () => checkFlakeCommit(flake, manifest));
  const rebuilt = await step("Rebuild", () =>
    rebuildRelease({
      flake,
      system: scope.system,
      targets: scope.targets,
      downloadBase: releaseDownloadBase(repository, manifest.tag),
    }));
  const checks = compareRebuild(scope.expected, rebuilt);
  await reportVerification(
    { tag: release.tag_name, commit: manifest.commit, system: scope.system, checks },
    options,
    env,
  );
}

/**
 * The release's newest SHA256SUMS and its manifest. With `trusted` keys SHA256SUMS must carry
 * a valid signature, and when it lists manifest.json only that exact copy is believed.
 */
async function readIndexToVerify(
  forgejo: Forgejo,
  release: Release,
  trusted: TrustedKey[] | undefined,
): Promise<{ manifest: Manifest; sums: Map<string, string> }> {
  const index = await readIndex(forgejo, release);
  const union = unionManifest(index);
  if (index.sums.length === 0 || !union) {
    throw new ReleaseError(
      `${release.tag_name} has no ${SUMS_NAME} and ${MANIFEST_NAME}: it was not made by release-boot, or not finished; nothing can be verified`,
    );
  }
  const sums = await authenticSums(index, release.tag_name, trusted);
  const manifestSha = sums.get(MANIFEST_NAME);
  sums.delete(MANIFEST_NAME);
  const manifest = manifestSha === undefined
    ? union
    : index.manifests.find((copy) => copy.sha256 === manifestSha)?.manifest;
  if (!manifest) {
    throw new ReleaseError(
      `no ${MANIFEST_NAME} of ${release.tag_name} has the checksum its ${SUMS_NAME} gives it: the release is inconsistent, refusing to trust it`,
    );
  }
  // The tag is in the download URLs of the .ipxe: a manifest of another release cannot match.
  if (manifest.tag.toLowerCase() !== release.tag_name.toLowerCase()) {
    throw new ReleaseError(
      `the ${MANIFEST_NAME} of ${release.tag_name} describes ${manifest.tag}: the release is inconsistent, refusing to trust it`,
    );
  }
  return { manifest, sums };
}

/**
 * Without --flake, the release's own commit from the repository it was published to, reached
 * through its tag (nix fetches a ref, then checks out the rev). Public repositories only: nix
 * is never given the token.
 */
function releaseFlake(repository: Repository, manifest: Pick<Manifest, "tag" | "commit">): string {
  const url = new URL(`git+${repository.html_url.replace(/\/+$/, "")}`);
  url.searchParams.set("ref", `refs/tags/${manifest.tag}`);
  url.searchParams.set("rev", manifest.commit);
  return url.toString();
}

/** The iPXE scripts' download base, as publishing wrote it (`downloadBase`). */
function releaseDownloadBase(repository: Repository, tag: string): string {
  return `${repository.html_url.replace(/\/+$/, "")}/releases/download/${encodeURIComponent(tag)}/`;
}

/** One line per asset (or the JSON) on stdout, the step summary, and the verdict on stderr. */
async function reportVerification(
  verification: Verification,
  options: Pick<VerifyOptions, "json">,
  env: Env,
): Promise<void> {
  result(
    options.json
      ? JSON.stringify(verificationJson(verification), null, 2)
      : renderVerification(verification).trimEnd(),
  );
  if (env.GITHUB_STEP_SUMMARY) {
    await fs.appendFile(env.GITHUB_STEP_SUMMARY, verificationSummary(verification));
  }
  const verdict = verificationVerdict(verification);
  if (verificationExitCode(verification) !== 0) {
    throw new ReleaseError(
      `${verdict}; find what differs with diffoscope or nix store diff-closures (docs/RUNNER_IMAGES.md)`,
    );
  }
  log(verdict);
}

/** What to rebuild for a release: one system's targets, and the sums their files must have. */
interface RebuildScope {
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
  const unlisted = [...sums.keys()].find((name) =>
    name !== MANIFEST_NAME && !manifest.assets.some((a) => a.name === name)
  );
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
interface RebuiltAsset {
  name: string;
  size: number;
  sha256: string;
  /** Set when nix's check rebuilt the file differently from the copy already in the store. */
  storeSha256?: string;
}

interface RebuildRequest {
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
function verificationVerdict(verification: Verification): string {
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

async function pruneReleases(options: PruneOptions, env: Env): Promise<void> {
  const token = readToken(env);
  if (!token) {
    throw new UsageError(
      `prune deletes releases: set FORGEJO_TOKEN to a token that can write releases of ${options.site.repo} (in a workflow: FORGEJO_TOKEN: \${{ secrets.GITHUB_TOKEN }})`,
    );
  }
  const forgejo = connectForgejo(refuseMirror(options.site, options.mirrors), token, options);
  await step("Check Forgejo", () => checkForgejo(forgejo));
  // Tags first: a release published meanwhile then has its tag listed, never as an orphan.
  const plan = await step("Plan", async () => {
    const tags = await forgejo.tags.list();
    const releases = await forgejo.releases.list();
    return planPrune(releases, tags, new Date(), options.keep, options.staleDays);
  });
  for (const kept of plan.kept) log(`Keeping ${kept.tag}: ${kept.why}`);
  const done: PruneDeletion[] = [];
  for (const deletion of plan.deletions) {
    try {
      done.push(options.dryRun ? deletion : await deleteForPrune(forgejo, deletion));
    } catch (error) {
      if (!(error instanceof ReleaseError)) throw error;
      throw new ReleaseError(
        `${error.message} (prune stopped after ${done.length} of ${plan.deletions.length} deletions; the releases it did not reach are untouched: rerun to continue)`,
      );
    }
    result(renderPruneDeletion(done[done.length - 1], options.dryRun));
  }
  result(renderPruneTotal(done, options.dryRun));
}

/** The release (with its assets), then its tag; a tag a release holds again is kept. */
async function deleteForPrune(forgejo: Forgejo, deletion: PruneDeletion): Promise<PruneDeletion> {
  if (deletion.releaseId !== undefined) await forgejo.releases.remove(deletion.releaseId);
  if (!deletion.deleteTag) return deletion;
  if (await forgejo.tags.remove(deletion.tag) !== "held") return deletion;
  log(`Kept the tag ${deletion.tag}: a release holds it again`);
  return { ...deletion, deleteTag: false };
}

/** The parts of a release that prune judges. */
export type PruneRelease =
  & Pick<Release, "id" | "tag_name" | "draft" | "created_at" | "published_at">
  & { assets: Pick<Attachment, "size" | "created_at">[] };

/** One deletion: the release first (which deletes its assets), then its tag. */
interface PruneDeletion {
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

interface PrunePlan {
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
    if (output.ci) log(`::error::${message.split("\n")[0]}`);
    Deno.exit(error instanceof UsageError ? 2 : 1);
  }
}

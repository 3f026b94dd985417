/**
 * The command line: option types, the flag table, --help, input rules and `readOptions`, which
 * turns flags and environment into one command's options or a UsageError before any work.
 * It does no work itself: it never talks to Forgejo, builds, reads or writes files, or runs
 * git (the caller reads the checkout's commit for it).
 */
import * as path from "node:path";
import * as v from "valibot";
import { minimist } from "zx";
import { type Env, UsageError } from "./run.ts";

const DEFAULT_MIRRORS = "https://codeberg.org";

/** prune's retention: the newest boot-dev releases kept, and when a draft is abandoned. */
const PRUNE_KEEP = 5;

const PRUNE_STALE_DAYS = 7;

/** Assets uploaded at once, unless RELEASE_BOOT_UPLOAD_CONCURRENCY says otherwise. */
const DEFAULT_UPLOADS = 2;

/** More uploads at once only split the same link and server between them. */
const MAX_UPLOADS = 8;

/** Where releases live: a Forgejo base URL and a repository on it. */
export interface Site {
  server: string;
  /** OWNER/NAME, each part valid as Forgejo names them. */
  repo: string;
}

/** How every HTTP request behaves, and how long a run waits between looks: tests shrink these. */
export interface HttpSettings {
  /** A request making no progress for this long fails (then is retried). */
  timeoutMs: number;
  /** The first retry waits about this long; each further one twice as long. */
  retryDelayMs: number;
  /** Publishing waits this long between looks at a release another job is completing. */
  pollMs: number;
  /** Jobs whose index writes collide wait between one and five times this before the next round. */
  indexWaitMs: number;
}

export interface CommonOptions {
  /** Servers never published to and never sent the token. */
  mirrors: string[];
  http: HttpSettings;
}

/** Build the images and stage them in `out`, or publish them to `site`. */
export interface ReleaseOptions extends CommonOptions {
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
  /** The CI run this release is made in, for its provenance; absent when run by hand. */
  ci?: CiJob;
  /** --signing-key FILE: the key signs SHA256SUMS wherever this run writes it. */
  signingKeyFile?: string;
  /** The iPXE code-signing key and its certificate chain: where this run reads them from. */
  ipxeSigning?: IpxeSigningSource;
  /** Assets uploaded at once (RELEASE_BOOT_UPLOAD_CONCURRENCY). */
  uploads: number;
}

/** A secret's text: in the file a flag names, or in an environment variable (a CI secret). */
export type TextSource = { flag: string; file: string } | { variable: string };

/** --ipxe-signing-key and --ipxe-signing-cert, each a file or its variable: both or neither. */
export interface IpxeSigningSource {
  key: TextSource;
  cert: TextSource;
}

const IPXE_SIGNING_KEY_ENV = "RELEASE_BOOT_IPXE_SIGNING_KEY";

const IPXE_SIGNING_CERT_ENV = "RELEASE_BOOT_IPXE_SIGNING_CERT";

/** Where a run in CI is, from Forgejo's GITHUB_* variables. */
export interface CiJob {
  server: string;
  /** OWNER/NAME */
  repository: string;
  /** The URL of the CI run. */
  runUrl: string;
  /** GITHUB_WORKFLOW_REF: `OWNER/NAME/PATH@REF` of the workflow file; older servers omit it. */
  workflowRef?: string;
}

/** Download a published release's boot files into `out/<tag>`, then point `out/current` at it. */
export interface DownloadOptions extends CommonOptions {
  command: "fetch";
  rollback: false;
  site: Site;
  /** A tag, or "latest": the newest published boot-v* release. */
  tag: string;
  out: string;
  targets: string[];
  system: string;
  /** An allowed_signers file: SHA256SUMS.sig must verify against one of its keys, or nothing is changed. */
  trust?: string;
  /** Tag directories kept in `out`, current and previous always among them. */
  keep: number;
}

/** Rebuild a published release from its commit and compare its files with SHA256SUMS. */
export interface VerifyOptions extends CommonOptions {
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
export interface PruneOptions extends CommonOptions {
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

export type FetchOptions = DownloadOptions | RollbackOptions;

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
  "ipxe-signing-key",
  "ipxe-signing-cert",
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

export const HELP =
  `release-boot: build a flake's NixOS boot images and publish them as a Forgejo release.

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
--out: every asset, SHA256SUMS, manifest.json and the provenance, exactly as it would be
published.

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
  --signing-key FILE sign SHA256SUMS (SHA256SUMS.sig, an SSH signature) and the provenance
                     (provenance.intoto.jsonl) with this unencrypted ssh-ed25519 key; or give
                     the key's text in RELEASE_BOOT_SIGNING_KEY
  --ipxe-signing-key FILE, --ipxe-signing-cert FILE
                     sign for iPXE's imgverify (docs/PXE.md, Verified boot): each file a
                     booting machine loads (kernel, initrd, each .ipxe script) gets a
                     <name>.sig, and the scripts verify every image they load. PEM: an RSA
                     (2048 bits or more) or ECDSA P-256 key; its certificate, then the chain
                     up to the root. Both or neither; a --draft job does not sign, --finalize
                     does; or give their text in RELEASE_BOOT_IPXE_SIGNING_KEY and _CERT
  --allow-dirty      publish even from a git checkout with uncommitted changes or a flake
                     whose inputs are not locked (recorded in manifest.json)
  --timeout SECONDS  a request making no progress this long fails, then is retried (default
                     600); a whole request, tries included, ends after five times this plus
                     1 s per MiB it carries
  --mirrors LIST     comma-separated hosts or http(s) URLs never published to and never
                     sent the token (default "${DEFAULT_MIRRORS}": the mirror only distributes)
  --help             this text

fetch downloads a published release's files for the targets (default netboot) into DIR/TAG,
checks each against the release's SHA256SUMS before it gets its final name (a mismatch is
deleted), resumes an interrupted download, writes netboot.ipxe to load kernel and initrd from
beside it, and only then points the symlink DIR/current at DIR/TAG (DIR/previous keeps the
one before), so an HTTP server serving DIR/current never sees a half-made directory.
"latest" is the newest published boot-v* release. A token is optional for a public repository.
  --trust FILE       allowed_signers (or ssh-ed25519 public key lines): SHA256SUMS.sig and the
                     provenance must be signed by its keys, else nothing under DIR changes
  --keep N           tag directories to keep in DIR (default 3; current and previous stay)
  --rollback         point DIR/current back at DIR/previous; no network

verify rebuilds a published release from the commit its manifest.json names and compares
every file with its SHA256SUMS: one line per file on stdout (identical, different with both
sums, missing), the JSON with --json, the verdict on stderr. --flake (default: the release's
tag and commit fetched from the repository, git+URL?ref=refs/tags/TAG&rev=COMMIT) must be
at that commit: a clean checkout of it, or a reference pinned with ?rev=. --trust FILE
(allowed_signers) requires SHA256SUMS.sig and the provenance signed by its keys. Exit 0 when
every file is identical, 1 when any differs or is missing (or the release cannot be checked).

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
  GITHUB_WORKFLOW_REF the workflow file and ref, named as the builder in the provenance
  GITHUB_OUTPUT      receives release-url, tag and release-id
  GITHUB_STEP_SUMMARY receives a table of the assets
  RELEASE_BOOT_SIGNING_KEY  the signing key's text (a CI secret), instead of --signing-key
  RELEASE_BOOT_IPXE_SIGNING_KEY, RELEASE_BOOT_IPXE_SIGNING_CERT  the iPXE signing key's and
                     its certificate chain's text (CI secrets), instead of the two flags
  RELEASE_BOOT_RETRY_DELAY_MS  first retry delay in milliseconds (default 500)
  RELEASE_BOOT_POLL_MS  wait between looks at a release another job completes (default 1000)
  RELEASE_BOOT_INDEX_WAIT_MS  least wait after colliding SHA256SUMS writes (default 100)
  RELEASE_BOOT_UPLOAD_CONCURRENCY  assets uploaded at once, 1 to ${MAX_UPLOADS} (default ${DEFAULT_UPLOADS})

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

/** The CI server names the builder in a release's provenance, so it must be a URL. */
const CiServerSchema = v.pipe(
  v.string(),
  v.url("it is not a URL"),
  v.transform((url) => url.replace(/\/+$/, "")),
);

const RunIdSchema = v.pipe(v.string(), v.regex(/^[0-9]+$/, "a CI run's id is digits"));

const WorkflowRefSchema = v.pipe(
  v.string(),
  v.regex(
    /^[^/\s@]+\/[^/\s@]+\/[^\s@]+@\S+$/,
    "a workflow ref is OWNER/NAME/PATH@REF, e.g. ops/runners/.forgejo/workflows/boot-images.yml@refs/tags/boot-v1.2.0",
  ),
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

const DelaySchema = WholeNumberSchema("milliseconds", 0);

const UploadsSchema = v.pipe(
  WholeNumberSchema("uploads", 1),
  v.maxValue(MAX_UPLOADS, `give 1 to ${MAX_UPLOADS} uploads at a time`),
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

/** An entry that names its scheme; any other is a bare host. */
const SCHEME = /^[A-Za-z][A-Za-z0-9+.-]*:\/\//;

/** A bare host ("codeberg.org", "localhost:3000") as the https URL mirrorOf compares. */
function mirrorUrl(entry: string): string {
  return SCHEME.test(entry) ? entry : `https://${entry}`;
}

/**
 * A --mirrors entry mirrorOf can compare: a bare host or an http(s) URL of one. An entry it
 * could not read would match no server, and the token would go to the mirror it meant.
 */
function mirrorProblem(entry: string): string | undefined {
  if (entry === "") return "an entry is empty";
  const url = URL.canParse(mirrorUrl(entry)) ? new URL(mirrorUrl(entry)) : undefined;
  if (!url || !url.hostname) return `${JSON.stringify(entry)} is neither a host nor a URL`;
  if (url.protocol !== "https:" && url.protocol !== "http:") {
    return `${JSON.stringify(entry)} is not an http(s) URL`;
  }
  if (url.username || url.password || url.search || url.hash) {
    return `${JSON.stringify(entry)} has credentials, a query or a fragment`;
  }
  return undefined;
}

const MirrorsFlagSchema = v.pipe(
  v.string(),
  v.transform((list) => list.split(",").map((entry) => entry.trim())),
  v.rawCheck(({ dataset, addIssue }) => {
    const found = dataset.typed ? dataset.value.map(mirrorProblem).find(Boolean) : undefined;
    if (found) {
      addIssue({
        message: `${found}; give hosts or http(s) URLs, e.g. codeberg.org,git.example.org`,
      });
    }
  }),
  v.transform((entries) => entries.map(mirrorUrl)),
);

export function isLoopback(url: URL): boolean {
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

/**
 * Flags and environment become Options, or a UsageError before any work is done. Without
 * --commit or GITHUB_SHA a release is of the checkout's commit, which `checkoutCommit` reads
 * then and only then (undefined: not a git checkout; a caller without one leaves it out).
 */
export async function readOptions(
  argv: string[],
  env: Env,
  checkoutCommit: () => Promise<string | undefined> = () => Promise.resolve(undefined),
): Promise<Options> {
  const command = COMMANDS.find((name) => name === argv[0]);
  const fetching = command === "fetch";
  const flags = readFlags(command ? argv.slice(1) : argv);
  const common: CommonOptions = {
    mirrors: parseFlag("mirrors", MirrorsFlagSchema, flags.value("mirrors") ?? DEFAULT_MIRRORS),
    http: {
      timeoutMs: 1000 * parseFlag("timeout", TimeoutFlagSchema, flags.value("timeout") ?? "600"),
      retryDelayMs: parseFlag(
        "retry delay",
        DelaySchema,
        env.RELEASE_BOOT_RETRY_DELAY_MS || "500",
        "RELEASE_BOOT_RETRY_DELAY_MS",
      ),
      pollMs: parseFlag(
        "poll",
        DelaySchema,
        env.RELEASE_BOOT_POLL_MS || "1000",
        "RELEASE_BOOT_POLL_MS",
      ),
      indexWaitMs: parseFlag(
        "index wait",
        DelaySchema,
        env.RELEASE_BOOT_INDEX_WAIT_MS || "100",
        "RELEASE_BOOT_INDEX_WAIT_MS",
      ),
    },
  };
  refuseForeignFlags(command ?? "release", flags);
  if (command === "verify") return verifyOptions(flags, env, common);
  if (command === "prune") return pruneOptions(flags, env, common);
  return fetching
    ? fetchOptions(flags, env, common)
    : await releaseOptions(flags, env, common, checkoutCommit);
}

/** The commands named by the first argument; without one, release. */
const COMMANDS = ["fetch", "verify", "prune"] as const;

const COMMON_FLAGS = ["server", "repo", "timeout", "mirrors"];

/** The flags each command takes; any other is refused rather than silently ignored. */
const COMMAND_FLAGS: Record<"release" | typeof COMMANDS[number], string[]> = {
  release: [
    ...COMMON_FLAGS,
    ...["flake", "targets", "system", "tag", "commit", "out", "signing-key"],
    ...["ipxe-signing-key", "ipxe-signing-cert"],
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
  checkoutCommit: () => Promise<string | undefined>,
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
    parseFlag("commit", CommitFlagSchema, await requireCheckoutCommit(checkoutCommit), "commit");
  const tag = (flags.value("tag") === undefined && env.GITHUB_REF_TYPE !== "tag")
    ? `boot-dev-${commit.slice(0, 12)}`
    : flagOrEnv(flags, "tag", env, "GITHUB_REF_NAME", TagFlagSchema) ??
      `boot-dev-${commit.slice(0, 12)}`;
  const ci = ciJob(env);
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
    signingKeyFile: flags.value("signing-key"),
    ipxeSigning: ipxeSigningSource(flags, env),
    uploads: parseFlag(
      "upload concurrency",
      UploadsSchema,
      env.RELEASE_BOOT_UPLOAD_CONCURRENCY || String(DEFAULT_UPLOADS),
      "RELEASE_BOOT_UPLOAD_CONCURRENCY",
    ),
    ciRun: ci?.runUrl,
    ci,
    ...common,
  };
}

/**
 * Where the iPXE signing key and its certificate chain come from: each from its flag's file or
 * its variable's text (an empty variable is an unset CI secret). One without the other would
 * sign nothing, and is refused.
 */
function ipxeSigningSource(flags: Flags, env: Env): IpxeSigningSource | undefined {
  const key = textSource(flags, "ipxe-signing-key", env, IPXE_SIGNING_KEY_ENV);
  const cert = textSource(flags, "ipxe-signing-cert", env, IPXE_SIGNING_CERT_ENV);
  if (key && cert) return { key, cert };
  if (!key && !cert) return undefined;
  const [given, missing] = key
    ? [nameOf(key), `--ipxe-signing-cert or ${IPXE_SIGNING_CERT_ENV}`]
    : [nameOf(cert!), `--ipxe-signing-key or ${IPXE_SIGNING_KEY_ENV}`];
  throw new UsageError(
    `${given} is set without ${missing}: iPXE signing needs the key and its certificate chain, give both or neither`,
  );
}

function textSource(
  flags: Flags,
  flag: StringFlag,
  env: Env,
  variable: string,
): TextSource | undefined {
  const file = flags.value(flag);
  const inEnv = env[variable]?.trim() ? variable : undefined;
  if (file !== undefined && inEnv) {
    throw new UsageError(`both --${flag} and ${variable} are set: give it one way only`);
  }
  if (file !== undefined) return { flag: `--${flag}`, file };
  return inEnv === undefined ? undefined : { variable: inEnv };
}

/** How a source is named in messages: `--flag FILE`, or the variable. */
export function nameOf(source: TextSource): string {
  return "file" in source ? `${source.flag} ${source.file}` : source.variable;
}

/** The CI run, when Forgejo Actions' variables say there is one; each goes into its URL. */
function ciJob(env: Env): CiJob | undefined {
  if (!env.GITHUB_SERVER_URL || !env.GITHUB_REPOSITORY || !env.GITHUB_RUN_ID) return undefined;
  const server = parseFlag("server", CiServerSchema, env.GITHUB_SERVER_URL, "GITHUB_SERVER_URL");
  const repository = parseFlag(
    "repository",
    RepoFlagSchema,
    env.GITHUB_REPOSITORY,
    "GITHUB_REPOSITORY",
  );
  const runId = parseFlag("run", RunIdSchema, env.GITHUB_RUN_ID, "GITHUB_RUN_ID");
  return {
    server,
    repository,
    runUrl: `${server}/${repository}/actions/runs/${runId}`,
    workflowRef: env.GITHUB_WORKFLOW_REF
      ? parseFlag("workflow", WorkflowRefSchema, env.GITHUB_WORKFLOW_REF, "GITHUB_WORKFLOW_REF")
      : undefined,
  };
}

/** The server and repository a command other than release cannot do without. */
function siteOf(flags: Flags, env: Env, command: "fetch" | "verify" | "prune"): Site {
  const server = flagOrEnv(flags, "server", env, "GITHUB_SERVER_URL", ServerFlagSchema);
  const repo = flagOrEnv(flags, "repo", env, "GITHUB_REPOSITORY", RepoFlagSchema);
  if (!server) throw new UsageError(`${command} needs --server URL (or GITHUB_SERVER_URL)`);
  if (!repo) throw new UsageError(`${command} needs --repo OWNER/NAME (or GITHUB_REPOSITORY)`);
  return { server, repo };
}

/** `fetch` reads a published release: it needs where, which tag, and where to put it. */
function fetchOptions(flags: Flags, env: Env, common: CommonOptions): FetchOptions {
  if (flags.on("rollback")) {
    const extra = flags.given.find((name) => !["rollback", "out"].includes(name));
    if (extra) throw new UsageError(`--rollback takes only --out DIR, not --${extra}`);
    const out = flags.value("out");
    if (!out) throw new UsageError("fetch --rollback needs --out DIR: the boot directory");
    return { command: "fetch", rollback: true, out, ...common };
  }
  const site = siteOf(flags, env, "fetch");
  const tag = flags.value("tag") ??
    (env.GITHUB_REF_TYPE === "tag" && env.GITHUB_REF_NAME ? env.GITHUB_REF_NAME : undefined);
  if (!tag) {
    throw new UsageError("fetch needs --tag TAG, or --tag latest for the newest boot-v* release");
  }
  const out = flags.value("out");
  if (!out) {
    throw new UsageError("fetch needs --out DIR: the directory to lay the boot files out in");
  }
  return {
    command: "fetch",
    rollback: false,
    site,
    tag: tag === "latest" ? tag : parseFlag("tag", TagFlagSchema, tag),
    out,
    targets: parseFlag("targets", TargetsFlagSchema, flags.value("targets") ?? "netboot"),
    system: parseFlag("system", SystemFlagSchema, flags.value("system") ?? "x86_64-linux"),
    trust: flags.value("trust"),
    keep: parseFlag("keep", KeepTagsFlagSchema, flags.value("keep") ?? "3"),
    ...common,
  };
}

const KeepReleasesFlagSchema = WholeNumberSchema("releases", 0);

const StaleDraftsFlagSchema = WholeNumberSchema("days", 1);

/** `verify` rebuilds one published release: where it is, which tag, and from what flake. */
function verifyOptions(flags: Flags, env: Env, common: CommonOptions): VerifyOptions {
  const site = siteOf(flags, env, "verify");
  const tag = flags.value("tag");
  if (!tag) {
    throw new UsageError("verify needs --tag TAG, or --tag latest for the newest boot-v* release");
  }
  const flake = flags.value("flake");
  const system = flags.value("system");
  return {
    command: "verify",
    site,
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
  const site = siteOf(flags, env, "prune");
  return {
    command: "prune",
    site,
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

async function requireCheckoutCommit(
  checkoutCommit: () => Promise<string | undefined>,
): Promise<string> {
  const head = await checkoutCommit();
  if (head === undefined) {
    throw new UsageError(
      "no commit to release: this is not a git checkout and GITHUB_SHA is unset; pass --commit SHA",
    );
  }
  return head;
}

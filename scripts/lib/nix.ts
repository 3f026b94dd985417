/**
 * Nix: reading the flake, building the targets in one call, and naming the build products as
 * release assets. Publishing and verify both build through here, so it must not know where
 * the assets go.
 */
import * as fs from "node:fs/promises";
import * as path from "node:path";
import * as v from "valibot";
import { Buffer } from "node:buffer";
import { type ProcessOutput } from "zx";
import { ASSET_NAME, type ManifestAsset } from "../../types/manifest.ts";
import {
  type BuildResult,
  BuildResultsSchema,
  type FlakeMetadata,
  FlakeMetadataSchema,
  OutPathsSchema,
  PathInfoSchema,
  TargetListingSchema,
} from "../../types/nix.ts";
import { formatBytes, ReleaseError, type Run, UsageError } from "./run.ts";
import { type ReleaseOptions } from "./cli.ts";
import { parseJson } from "./json.ts";
import { hashFiles } from "./hash.ts";

const NIX_FEATURES = ["--extra-experimental-features", "nix-command flakes"];

// Never change the operator's flake: an unlocked input is locked in memory, not on disk.
// (Nix takes this flag only after the subcommand.)
export const KEEP_LOCK = "--no-write-lock-file";

export interface FlakeInfo {
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

// Nix 2.8 keeps one evaluation cache (a SQLite file) per flake. When another nix process holds
// it (a second run, or anyone's nix evaluating the same flake), nix prints "SQLite database
// '…eval-cache…' is busy", ignores it, and can then fail wrongly: "attribute
// 'packages.x86_64-linux.packages' is unexpectedly missing" for an attribute that exists. A
// call that failed that way is repeated once without the cache: slower, never wrong.
const EVAL_CACHE_BUSY = /SQLite database '[^']*eval-cache[^']*' is busy/;
const WITHOUT_EVAL_CACHE = ["--option", "eval-cache", "false"];

interface NixCall {
  /** Sees nix's stderr as it comes (every attempt's). */
  onStderr?: (chunk: Buffer) => void;
  /** Leaves the evaluation cache alone: for an evaluation made beside another of this run. */
  withoutCache?: boolean;
}

/** Runs `nix ARGS` (never throwing on its exit code), repeated without the cache if it was busy. */
async function runNix(run: Run, args: string[], call: NixCall = {}): Promise<ProcessOutput> {
  const attempt = async (options: string[]) => {
    const child = run.$`nix ${NIX_FEATURES} ${options} ${args}`.quiet().nothrow();
    if (call.onStderr) child.stderr.on("data", call.onStderr);
    return await child;
  };
  if (call.withoutCache) return await attempt(WITHOUT_EVAL_CACHE);
  const first = await attempt([]);
  if (first.exitCode === 0 || !EVAL_CACHE_BUSY.test(first.stderr)) return first;
  run.log(
    `nix ${args[0]} met a busy evaluation cache (another nix on this flake); once more without it`,
  );
  return await attempt(WITHOUT_EVAL_CACHE);
}

export async function nixJson<T>(
  run: Run,
  schema: v.GenericSchema<unknown, T>,
  args: string[],
  what: string,
  call: NixCall = {},
): Promise<T> {
  const result = await runNix(run, args, call);
  if (result.exitCode !== 0) {
    throw new ReleaseError(`${what} failed: ${nixErrorTail(result.stderr, 1)}`);
  }
  return parseJson(schema, result.stdout, `nix ${args[0]} ${args[1] ?? ""}`.trim());
}

/** The last error lines nix printed, without its progress noise. */
export function nixErrorTail(stderr: string, lines = 12): string {
  const all = stderr.split("\n").map((line) => line.trimEnd()).filter(Boolean);
  const start = all.findLastIndex((line) => line.startsWith("error:"));
  const tail = start >= 0 ? all.slice(start) : all;
  return tail.slice(0, lines).join("\n").replace(/^error: /, "");
}

export async function readFlake(run: Run, options: ReleaseOptions): Promise<FlakeInfo> {
  // Two reads that need nothing of each other, started together and judged in this order.
  // Without KEEP_LOCK: nix then fails, instead of warning, when flake.lock is not complete.
  const [checked, strict] = await Promise.allSettled([
    checkTargets(run, options),
    runNix(run, ["flake", "metadata", "--json", "--no-update-lock-file", options.flake]),
  ]);
  const nixVersion = settled(checked);
  const metadataRun = settled(strict);
  const locked = metadataRun.exitCode === 0;
  if (!locked && !/requires lock file changes/.test(metadataRun.stderr)) {
    throw new ReleaseError(
      `cannot read the flake's metadata: ${nixErrorTail(metadataRun.stderr, 1)}`,
    );
  }
  const metadata = locked
    ? parseJson(FlakeMetadataSchema, metadataRun.stdout, "nix flake metadata")
    : await nixJson(
      run,
      FlakeMetadataSchema,
      ["flake", "metadata", KEEP_LOCK, "--json", options.flake],
      "reading the flake's metadata",
    );
  const dirty = metadata.locked.type === "git" && !metadata.revision;
  return { metadata, locked, dirty, nixVersion };
}

/** The value of a settled promise, or its failure thrown. */
function settled<T>(result: PromiseSettledResult<T>): T {
  if (result.status === "rejected") throw result.reason;
  return result.value;
}

/**
 * Refuses a target the flake does not have for the system, naming those it has. The same
 * evaluation reads the evaluating nix's version, which the manifest records: one nix process
 * fewer than asking `nix --version`.
 */
async function checkTargets(run: Run, options: ReleaseOptions): Promise<string> {
  const result = await runNix(run, [
    "eval",
    KEEP_LOCK,
    "--json",
    installable(options),
    "--apply",
    "ps: { names = builtins.attrNames ps; nixVersion = builtins.nixVersion; }",
  ]);
  if (result.exitCode !== 0 && !/does not provide attribute/.test(result.stderr)) {
    throw new UsageError(
      `cannot read the flake ${options.flake}: ${nixErrorTail(result.stderr, 1)}`,
    );
  }
  const listing = result.exitCode === 0
    ? parseJson(TargetListingSchema, result.stdout, "nix eval")
    : { names: [], nixVersion: "" }; // No packages for the system: refused just below.
  const unknown = options.targets.filter((target) => !listing.names.includes(target));
  if (unknown.length > 0) {
    throw new UsageError(
      `unknown target ${unknown.join(", ")} in --targets: the flake ${options.flake} has ${
        listing.names.length ? listing.names.join(", ") : "no packages"
      } for ${options.system}`,
    );
  }
  return listing.nixVersion;
}

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
export async function buildTargets(run: Run, options: BuildRequest): Promise<TargetBuild[]> {
  const installables = options.targets.map((target) => installable(options, target));
  const build = runNix(
    run,
    ["build", KEEP_LOCK, "--json", "--no-link", ...installables],
    { onStderr: (chunk) => run.io.stderr(chunk) },
  );
  // One target has one result: only several need their derivations to be told apart, read
  // while nix builds.
  const [derivations, built] = await Promise.allSettled([
    options.targets.length > 1 ? targetDerivations(run, options) : undefined,
    build,
  ]);
  const drvPaths = settled(derivations);
  const result = settled(built);
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
async function targetDerivations(run: Run, options: BuildRequest): Promise<Record<string, string>> {
  const apply = `ps: builtins.mapAttrs (name: _: ps.\${name}.drvPath) (builtins.fromJSON ''${
    JSON.stringify(Object.fromEntries(options.targets.map((t) => [t, null])))
  }'')`;
  return await nixJson(
    run,
    OutPathsSchema,
    ["eval", KEEP_LOCK, "--json", installable(options), "--apply", apply],
    `evaluating the targets ${options.targets.join(", ")}`,
    // Made beside the build, which evaluates the same flake through the cache.
    { withoutCache: true },
  );
}

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
  "kpxe",
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

export async function collectProducts(builds: TargetBuild[]): Promise<Product[]> {
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

export interface FileAsset extends Product {
  size: number;
  sha256: string;
  /** nix's narHash of the store path holding `path`, from its database: what a rerun compares. */
  narHash?: string;
  /** Content made by release-boot from `path` (a rewritten iPXE script) instead of the file. */
  bytes?: Uint8Array;
}

export async function hashProducts(run: Run, products: Product[]): Promise<FileAsset[]> {
  const hashes = await hashFiles(products.map((product) => product.path));
  const assets = products.map((product, index) => ({ ...product, ...hashes[index] }));
  for (const asset of assets) {
    run.log(`${asset.sha256}  ${asset.name} (${formatBytes(asset.size)})`);
  }
  return assets;
}

/**
 * The products' sizes and checksums for publishing, each with its store path's narHash. A
 * product that `recorded` (manifest.json of an earlier run) lists under its name and file,
 * whose store path nix's database still gives the narHash recorded then, and whose size is
 * the recorded one, keeps the recorded checksum unread: nix vouches that the store path's
 * bytes are the ones hashed then. Every other product is hashed.
 */
export async function checksumProducts(
  run: Run,
  products: Product[],
  recorded: ManifestAsset[],
): Promise<FileAsset[]> {
  // A derivation lies in the store directory its outputs do.
  const storePaths = products.map((product) =>
    storePathOf(product.path, path.dirname(product.drvPath))
  );
  const narHashes = await storeNarHashes(run, storePaths);
  const narHashOf = (index: number) => narHashes.get(storePaths[index] ?? "");
  const reused = await Promise.all(
    products.map((product, index) => recordedSum(product, narHashOf(index), recorded)),
  );
  const unread = products.filter((_, index) => !reused[index]);
  const hashed = await hashProducts(run, unread);
  const assets = products.map((product, index): FileAsset => {
    const { sha256, size } = reused[index] ?? hashed[unread.indexOf(product)];
    return { ...product, narHash: narHashOf(index), sha256, size };
  });
  for (const [index, asset] of assets.entries()) {
    if (reused[index]) {
      run.log(`${asset.sha256}  ${asset.name} (${formatBytes(asset.size)}, as recorded)`);
    }
  }
  const kept = products.length - hashed.length;
  run.log(
    `Reused ${kept} recorded checksum${kept === 1 ? "" : "s"}, hashed ${hashed.length} file${
      hashed.length === 1 ? "" : "s"
    }`,
  );
  return assets;
}

/** The size and checksum `recorded` gives a product, when nix vouches for its bytes. */
async function recordedSum(
  product: Product,
  narHash: string | undefined,
  recorded: ManifestAsset[],
): Promise<{ sha256: string; size: number } | undefined> {
  const earlier = recorded.find((asset) =>
    asset.name === product.name && asset.storePath === product.path &&
    asset.narHash !== undefined && asset.narHash === narHash
  );
  if (!earlier || (await fs.stat(product.path)).size !== earlier.size) return undefined;
  return { sha256: earlier.sha256, size: earlier.size };
}

/** The store path `file` lies in (`<store>/<hash>-<name>`), if it lies in `storeDir`. */
export function storePathOf(file: string, storeDir: string): string | undefined {
  const relative = path.relative(storeDir, file);
  if (relative === "" || relative.startsWith("..") || path.isAbsolute(relative)) return undefined;
  return path.join(storeDir, relative.split(path.sep)[0]);
}

/** narHash by store path, as nix's database records it: no file of the paths is read. */
async function storeNarHashes(
  run: Run,
  storePaths: (string | undefined)[],
): Promise<Map<string, string>> {
  const paths = [...new Set(storePaths.filter((storePath) => storePath !== undefined))];
  if (paths.length === 0) return new Map();
  return await nixJson(
    run,
    PathInfoSchema,
    ["path-info", "--json", ...paths],
    "reading nix's record of the built store paths",
  );
}

/** Built iPXE script of a target: `<target>-<system>.built.ipxe`, kept as nix built it. */
function builtScriptName(name: string): string {
  return name.replace(/\.ipxe$/, ".built.ipxe");
}

/**
 * `release-boot verify`: rebuild a published release from its commit and compare every file
 * with its SHA256SUMS, and report the verdict. It reads the release and never changes it.
 */
import * as fs from "node:fs/promises";
import * as path from "node:path";
import { type Release, type Repository } from "../../types/forgejo.ts";
import { INDEX_NAMES, type Manifest, MANIFEST_NAME, SUMS_NAME } from "../../types/manifest.ts";
import { type FlakeMetadata, FlakeMetadataSchema } from "../../types/nix.ts";
import {
  buildTargets,
  collectProducts,
  hashProducts,
  KEEP_LOCK,
  nixErrorTail,
  nixJson,
  type Product,
  storePathOf,
} from "./nix.ts";
import { type Env, ReleaseError, type Run, UsageError } from "./run.ts";
import { type VerifyOptions } from "./cli.ts";
import { connectForgejo, type Forgejo, mirrorOf, readToken } from "./forgejo.ts";
import { hashFiles } from "./hash.ts";

import {
  IPXE_SIGNATURE_SUFFIX,
  madeForIpxe,
  pointIpxeAtRelease,
  verifyingScripts,
  withIpxeFiles,
} from "./ipxe.ts";
import { type TrustedKey } from "./sshsig.ts";
import { readTrust } from "./allowed_signers.ts";
import { markdownText, readIndex, unionManifest } from "./release_index.ts";
import {
  authenticSums,
  chooseAssets,
  findBootRelease,
  releaseManifest,
} from "./trusted_release.ts";

export async function verifyRelease(run: Run, options: VerifyOptions, env: Env): Promise<void> {
  // Read like fetch: a mirror serves public files, and never sees the primary's token.
  const token = mirrorOf(options.site.server, options.mirrors) ? undefined : readToken(env, run);
  const trusted = options.trust === undefined ? undefined : await readTrust(options.trust, run);
  const forgejo = connectForgejo(run, options.site, token, options);
  const release = await run.step("Find the release", () => findBootRelease(forgejo, options.tag));
  const { manifest, sums } = await run.step(
    "Read SHA256SUMS and manifest.json",
    () => readIndexToVerify(run, forgejo, release, trusted),
  );
  const scope = rebuildScope(manifest, sums, options.system);
  // Only the iPXE key makes a signature: what a rebuild can check is the file it signs.
  const signatures = [...scope.expected.keys()].filter((name) =>
    madeForIpxe(name) && name.endsWith(IPXE_SIGNATURE_SUFFIX)
  );
  for (const name of signatures) scope.expected.delete(name);
  if (signatures.length > 0) {
    run.log(
      `${signatures.length} iPXE signatures (.sig) are not rebuilt, only the files they sign: check them with openssl cms -verify (docs/PXE.md, Verified boot)`,
    );
  }
  const repository = await forgejo.repository();
  const flake = options.flake ??
    releaseFlake(repositoryOn(repository, forgejo.origin), manifest);
  run.log(`Rebuilding ${release.tag_name} from ${flake}`);
  await run.step("Check the flake", () => checkFlakeCommit(run, flake, manifest));
  const rebuilt = await run.step("Rebuild", () =>
    rebuildRelease(run, {
      flake,
      system: scope.system,
      targets: scope.targets,
      downloadBase: releaseDownloadBase(repository, manifest.tag),
      signedForIpxe: signatures.length > 0,
    }));
  const checks = compareRebuild(scope.expected, rebuilt);
  await reportVerification(
    run,
    { tag: release.tag_name, commit: manifest.commit, system: scope.system, checks },
    options,
    env,
  );
}

/**
 * The release's newest SHA256SUMS and its manifest (releaseManifest). With `trusted` keys
 * SHA256SUMS must carry a valid signature and list manifest.json.
 */
async function readIndexToVerify(
  run: Run,
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
  const sums = await authenticSums(run, index, release.tag_name, trusted);
  const manifest = releaseManifest(index, sums, release.tag_name, {
    signed: trusted !== undefined,
    command: "verify",
  }) ?? union;
  sums.delete(MANIFEST_NAME);
  return { manifest, sums };
}

/** The repository as the server describes it, refused unless it is on `origin` over http(s). */
function repositoryOn(repository: Repository, origin: string): Repository {
  const home = URL.canParse(repository.html_url) ? new URL(repository.html_url) : undefined;
  if (!home || !["http:", "https:"].includes(home.protocol) || home.origin !== origin) {
    throw new ReleaseError(
      `the repository's html_url ${repository.html_url} is not on ${origin}, where verify reads the release: refusing to build from it; pass --flake with the release's repository`,
    );
  }
  return repository;
}

/**
 * Without --flake, the release's own commit from the repository it was published to, reached
 * through its tag (nix fetches a ref, then checks out the rev). Public repositories only: nix
 * is never given the token. The repository must be on `origin`, the server verify reads:
 * nix would otherwise evaluate and build whatever the server's answer points at.
 */
export function releaseFlake(
  repository: Pick<Repository, "html_url">,
  manifest: Pick<Manifest, "tag" | "commit">,
): string {
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
  run: Run,
  verification: Verification,
  options: Pick<VerifyOptions, "json">,
  env: Env,
): Promise<void> {
  run.result(
    options.json
      ? JSON.stringify(verificationJson(verification), null, 2)
      : renderVerification(verification).trimEnd(),
  );
  if (env.GITHUB_STEP_SUMMARY) {
    await fs.appendFile(run.resolve(env.GITHUB_STEP_SUMMARY), verificationSummary(verification));
  }
  const verdict = verificationVerdict(verification);
  if (verificationExitCode(verification) !== 0) {
    throw new ReleaseError(
      `${verdict}; find what differs with diffoscope or nix store diff-closures (docs/RUNNER_IMAGES.md)`,
    );
  }
  run.log(verdict);
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
    !INDEX_NAMES.has(name) && !manifest.assets.some((a) => a.name === name)
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
  run: Run,
  flake: string,
  release: Pick<Manifest, "tag" | "commit">,
): Promise<void> {
  const metadata = await nixJson(
    run,
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
  /** The release is signed for iPXE: its scripts are the verifying ones. */
  signedForIpxe?: boolean;
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
 * `downloadBase`, exactly as publishing wrote it (in a release signed for iPXE, the verifying
 * scripts, `.dir.ipxe` too).
 */
export async function rebuildRelease(run: Run, request: RebuildRequest): Promise<RebuiltAsset[]> {
  const builds = await buildTargets(run, request);
  const products = await collectProducts(builds);
  const storeDir = path.dirname(builds[0].outPath);
  const outputOf = (file: string) => storeOutput(file, storeDir);
  const derivers = await queryDerivers(run, [...new Set(products.map((p) => outputOf(p.path)))]);
  const leftovers: CheckLeftovers = { storeCopies: [], buildDirs: [] };
  try {
    const rebuiltAt = new Map<string, string>();
    for (const drv of new Set(derivers.values())) {
      for (const [out, copy] of await checkDerivation(run, drv, leftovers)) {
        rebuiltAt.set(out, copy);
      }
    }
    const rebuilt: Product[] = [];
    for (const product of products) {
      const out = outputOf(product.path);
      const copy = rebuiltAt.get(out);
      const file = copy ? copy + product.path.slice(out.length) : product.path;
      // A rebuild that came out different may lack the file: then it is missing, not an error.
      if (copy && !(await fs.lstat(file).catch(() => undefined))?.isFile()) {
        run.log(
          `${product.name}: the rebuild of ${out} made no file ${file.slice(copy.length + 1)}`,
        );
        continue;
      }
      rebuilt.push({ ...product, path: file });
    }
    const changed = products.filter((product) => rebuiltAt.has(outputOf(product.path)));
    const storeSums = await hashFiles(changed.map((product) => product.path));
    const storeSha256 = new Map(changed.map((product, i) => [product.name, storeSums[i].sha256]));
    const pointed = await pointIpxeAtRelease(
      run,
      await hashProducts(run, rebuilt),
      request.downloadBase,
    );
    const assets = request.signedForIpxe
      ? withIpxeFiles(
        pointed,
        (await verifyingScripts(pointed, (b) => fs.readFile(b.path, "utf8"), request.downloadBase))
          .scripts,
      )
      : pointed;
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
    await removeLeftovers(run, leftovers);
  }
}

/** The top-level store path a file lives in: `<store>/<hash>-<name>`. */
function storeOutput(file: string, storeDir: string): string {
  const storePath = storePathOf(file, storeDir);
  if (!storePath) {
    throw new ReleaseError(`${file} is not in the nix store ${storeDir}, so it cannot be rebuilt`);
  }
  return storePath;
}

/** Output path -> the derivation that built it. */
async function queryDerivers(run: Run, outputs: string[]): Promise<Map<string, string>> {
  const result = await run.$`nix-store --query --deriver ${outputs}`.quiet().nothrow();
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
  run: Run,
  drv: string,
  leftovers: CheckLeftovers,
): Promise<Map<string, string>> {
  run.log(`Rebuilding ${drv}`);
  const result = await run.$`nix-store --realise --check --keep-failed ${drv}`.quiet().nothrow();
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
async function removeLeftovers(run: Run, leftovers: CheckLeftovers): Promise<void> {
  if (leftovers.storeCopies.length > 0) {
    const result = await run.$`nix-store --delete ${leftovers.storeCopies}`.quiet().nothrow();
    for (const copy of leftovers.storeCopies) {
      if (await fs.lstat(copy).catch(() => undefined)) {
        run.log(`Could not remove the rebuilt copy ${copy} (${nixErrorTail(result.stderr, 1)})`);
      }
    }
  }
  for (const dir of leftovers.buildDirs) {
    await fs.rm(dir, { recursive: true, force: true }).catch((error: Error) =>
      run.log(`Could not remove the build directory ${dir}: ${error.message}`)
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

/**
 * A table for GITHUB_STEP_SUMMARY. The tag, the system and the asset names are the release's
 * words, shown as text (markdownText) so none can break the table or add Markdown or HTML.
 */
export function verificationSummary(verification: Verification): string {
  const sum = (sha256: string | undefined) => sha256 ? `\`${sha256}\`` : "";
  const rows = verification.checks.map((check) => {
    const name = markdownText(check.name);
    switch (check.result) {
      case "identical":
        return `| ${name} | identical | ${sum(check.sha256)} | ${sum(check.sha256)} |`;
      case "different":
        return `| ${name} | **different** | ${sum(check.expected)} | ${sum(check.actual)} |`;
      case "missing":
        return `| ${name} | **missing** | ${sum(check.expected)} | |`;
      case "unlisted":
        return `| ${name} | not in the release | | ${sum(check.actual)} |`;
    }
  });
  return [
    `### Verify ${markdownText(verification.tag)} (${markdownText(verification.system)})`,
    "",
    // Escaped whole: its own words hold nothing Markdown reads; its tag is the release's.
    markdownText(verificationVerdict(verification)),
    "",
    "| asset | result | release sha256 | rebuilt sha256 |",
    "|---|---|---|---|",
    ...rows,
    "",
  ].join("\n");
}

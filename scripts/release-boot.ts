#!/usr/bin/env -S deno run --allow-read --allow-write --allow-run --allow-env --allow-net --allow-sys
/**
 * release-boot: build a flake's NixOS boot images and publish them as a verified Forgejo
 * release (or stage the same bundle locally when no server is configured).
 *
 * The runbook this replaces, in order (see runbook()):
 *   1. read flags and environment; refuse bad input before any work
 *   2. check the Forgejo server, repository and token (when publishing)
 *   3. read the flake: its targets and locked inputs
 *   4. nix build every target in one call
 *   5. collect the build products and name them as release assets
 *   6. hash them; write SHA256SUMS, manifest.json and the provenance
 *   7. stage locally, or: draft release -> upload what is missing -> checksums -> publish
 *
 * `release-boot fetch` is the way back: a published release, verified, laid out for PXE.
 *
 * This file is the one executable and holds the release pipeline's own steps; every other
 * subsystem is a module under scripts/lib/ that never imports this file (docs/ARCHITECTURE.md).
 */
import * as fs from "node:fs/promises";
import { sleep } from "zx";
import { type EditReleaseOption, type Release, type Repository } from "../types/forgejo.ts";
import { type Manifest, MANIFEST_NAME, SIGNATURE_NAME, SUMS_NAME } from "../types/manifest.ts";
import {
  type Env,
  formatBytes,
  type Io,
  processIo,
  ReleaseError,
  type Run,
  startRun,
  stepOutputs,
  Stopped,
  UsageError,
} from "./lib/run.ts";
import { HELP, readOptions, type ReleaseOptions } from "./lib/cli.ts";
import {
  type BundleAsset,
  checkForgejo,
  connectForgejo,
  deleteAsset,
  type Forgejo,
  refuseMirror,
  requireToken,
  uploadAsset,
} from "./lib/forgejo.ts";

import {
  buildTargets,
  checksumProducts,
  collectProducts,
  type FileAsset,
  type FlakeInfo,
  readFlake,
} from "./lib/nix.ts";
import {
  describeAsset,
  describeRelease,
  judgeRelease,
  listsIndexAsRead,
  mergeManifests,
  type PlannedAction,
  planUploads,
  problemsOf,
  readIndex,
  readListedText,
  readUploadRecord,
  recordedAssets,
  recordedSums,
  releaseBody,
  type RemoteIndex,
  renderSums,
  stepSummary,
  unionManifest,
  withUploadRecord,
} from "./lib/release_index.ts";
import { sha256Hex } from "./lib/hash.ts";
import { asBuiltForIpxe, pointIpxeAtRelease, signForIpxe, withIpxeFiles } from "./lib/ipxe.ts";
import { type IpxeSigningIdentity, readIpxeSigningIdentity } from "./lib/ipxe_sign.ts";
import { readSigningKey, SIGNING_KEY_ENV, type SigningKey, signSums } from "./lib/sshsig.ts";
import { buildStatement, provenanceFile, runDetailsOf, signerOf } from "./lib/provenance.ts";
import { fetchForBoot } from "./lib/fetch.ts";
import { releaseFlake, verifyRelease } from "./lib/verify.ts";
import { pruneReleases } from "./lib/prune.ts";
import { sayingWhatIsLeft, uploadPlanned } from "./lib/uploads.ts";
import { refuseUnusableOut, writeStage } from "./lib/stage.ts";

/**
 * One run of release-boot: its exit status (0 done, 1 failed, 2 bad usage, 130 or 143 stopped
 * by SIGINT or SIGTERM), and on failure the one line that says why (and, in CI, the same line
 * as an error annotation). Relative paths mean paths under `cwd`; nothing of the run
 * (connections, listeners) outlives it.
 */
export async function main(
  argv: string[],
  env: Env,
  io: Io,
  cwd: string = Deno.cwd(),
): Promise<number> {
  const run = startRun(env, io, cwd);
  try {
    await runbook(run, argv, env);
    return 0;
  } catch (error) {
    // The stopped step has cleaned up, and whoever sent the signal knows why the run ended.
    if (error instanceof Stopped) return error.exitCode;
    const known = error instanceof UsageError || error instanceof ReleaseError;
    const message = known
      ? (error as Error).message
      : `unexpected error: ${(error as Error)?.stack ?? error}`;
    run.log(`release-boot: ${message}`);
    if (run.ci) run.log(`::error::${message.split("\n")[0]}`);
    return error instanceof UsageError ? 2 : 1;
  } finally {
    await run.end();
  }
}

/** What a run does, in order: the commands, then the release pipeline step by step. */
async function runbook(run: Run, argv: string[], env: Env): Promise<void> {
  if (argv.includes("--help") || argv.includes("-h")) return run.result(HELP);
  const options = await readOptions(argv, env, () => checkoutCommit(run));
  if (options.command === "fetch") return await fetchForBoot(run, options, env);
  if (options.command === "verify") return await verifyRelease(run, options, env);
  if (options.command === "prune") return await pruneReleases(run, options, env);

  // A bad key is refused before any work, as a bad flag is.
  const key = await readSigningKey(options.signingKeyFile, env, run);
  const ipxe = await readIpxeSigningIdentity(options.ipxeSigning, env, run);
  const forgejo = options.site && !options.dryRun
    ? connectForgejo(
      run,
      refuseMirror(options.site, options.mirrors),
      requireToken(options.site, env, run),
      options,
    )
    : undefined;
  if (!forgejo && !options.dryRun) await refuseUnusableOut(options.out, run.resolve(options.out));
  const repository = forgejo && await run.step("Check Forgejo", () => checkForgejo(run, forgejo));
  if (forgejo && options.finalize) {
    return await finalizeRelease(run, forgejo, repository, options, { key, ipxe }, env);
  }

  const flake = await run.step("Read the flake", () => readFlake(run, options));
  if (forgejo) refuseUntrustedFlake(flake, options);
  const builds = await run.step("Build", () => buildTargets(run, options));
  const products = await collectProducts(builds);
  const recorded = await recordedAssets(forgejo, options, key?.fingerprint);
  const hashed = await run.step("Hash", () => checksumProducts(run, products, recorded));
  const base = downloadBase(options, repository);
  const built = await pointIpxeAtRelease(run, hashed, base);
  const ipxeSigned = await signBuildForIpxe(run, options, built, base, ipxe);
  const assets = withIpxeFiles(built, ipxeSigned);
  const manifest = describeRelease(options, flake, assets);
  const provenance = await attest(run, options, manifest, repository, key);
  const bundle = bundleRelease(assets, manifest, provenance);

  if (options.dryRun) return printPlan(run, bundle, options);
  if (!forgejo) return await stageLocally(run, bundle, options);

  await run.step("Check the tag", () => refuseTagOnOtherCommit(forgejo, options));
  const draft = await run.step(
    "Find or create the draft",
    () => findOrCreateDraft(run, forgejo, options, bundle),
  );
  // Read once, to plan and to start writing the index from: the uploads add no index copy.
  const index = await readIndex(forgejo, draft, key);
  const plan = planUploads(
    bundle.files,
    draft.assets,
    recordedSums(draft, index),
    draft.draft,
    options.replace,
  );
  refuseConflicts(plan, draft, options);
  await run.step("Upload", () => uploadPlanned(run, forgejo, draft, plan, options.uploads));
  await run.step(
    "Write checksums",
    () => writeIndex(run, forgejo, repository, draft, index, bundle.manifest, plan, options, key),
  );
  const release = await run.step(
    "Publish",
    () => publishWhenComplete(run, forgejo, draft, options, key, ipxeSigned),
  );
  await reportRelease(run, release, bundle.manifest, env);
}

/** HEAD of the git checkout the run is in: a release's commit by default; undefined outside one. */
async function checkoutCommit(run: Run): Promise<string | undefined> {
  const head = await run.$`git rev-parse HEAD`.quiet().nothrow();
  return head.exitCode === 0 ? head.stdout.trim() : undefined;
}

// ---------------------------------------------------------------------------------------------
// What is published: the flake checked, the assets described and bundled
// ---------------------------------------------------------------------------------------------

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

interface Bundle {
  files: BundleAsset[];
  manifest: Manifest;
  sums: BytesAsset;
  manifestAsset: BytesAsset;
  provenance: BytesAsset;
}

/** An asset made of bytes release-boot wrote (SHA256SUMS, manifest.json, the provenance). */
type BytesAsset = BundleAsset & { bytes: Uint8Array };

function bytesAsset(name: string, content: string | Uint8Array): BytesAsset {
  const bytes = typeof content === "string" ? new TextEncoder().encode(content) : content;
  return { name, bytes, size: bytes.length, sha256: sha256Hex(bytes) };
}

/**
 * SHA256SUMS lists every asset, manifest.json and the provenance, so the records of where the
 * assets came from are vouched for too.
 */
function bundleRelease(assets: FileAsset[], manifest: Manifest, provenance: BytesAsset): Bundle {
  const manifestAsset = bytesAsset(MANIFEST_NAME, `${JSON.stringify(manifest, null, 2)}\n`);
  return {
    files: assets.map((asset) => ({
      name: asset.name,
      size: asset.size,
      sha256: asset.sha256,
      ...(asset.bytes ? { bytes: asset.bytes } : { path: asset.path }),
    })),
    manifest,
    sums: bytesAsset(SUMS_NAME, renderSums([...manifest.assets, manifestAsset, provenance])),
    manifestAsset,
    provenance,
  };
}

/**
 * The SLSA provenance of `manifest`, as this run attests it (docs/PROVENANCE.md): signed in
 * an envelope with the release key when one is held.
 */
async function attest(
  run: Run,
  options: ReleaseOptions,
  manifest: Manifest,
  repository: Repository | undefined,
  key: SigningKey | undefined,
): Promise<BytesAsset> {
  const statement = buildStatement({
    manifest,
    flake: rebuildFlake(options, repository, manifest),
    ...runDetailsOf(options.ci, run),
  });
  const file = await provenanceFile(statement, key && signerOf(key));
  return bytesAsset(file.name, file.bytes);
}

/** Where a rebuild starts: the release's tag and commit in its repository; a stage's flake. */
function rebuildFlake(
  options: ReleaseOptions,
  repository: Repository | undefined,
  manifest: Manifest,
): string {
  if (!options.site) return manifest.flake.url;
  const html_url = repository?.html_url ?? `${options.site.server}/${options.site.repo}`;
  return releaseFlake({ html_url }, manifest);
}

/**
 * The verifying scripts and `.sig`s this run adds for iPXE, made where it writes the final
 * index: a single publish or a stage, not a --draft job (the --finalize job signs for it).
 */
async function signBuildForIpxe(
  run: Run,
  options: ReleaseOptions,
  assets: FileAsset[],
  base: string,
  identity: IpxeSigningIdentity | undefined,
): Promise<FileAsset[]> {
  if (!identity) return [];
  if (options.draft) {
    run.log("--draft: not signing for iPXE in this job; --finalize with the iPXE key signs");
    return [];
  }
  return await signForIpxe(run, assets, (built) => fs.readFile(built.path, "utf8"), base, identity);
}

/** Where the release's files will be downloadable from; relative for a local stage. */
function downloadBase(options: ReleaseOptions, repository: Repository | undefined): string {
  if (!options.site) return "";
  const repoUrl = repository?.html_url.replace(/\/+$/, "") ??
    `${options.site.server}/${options.site.repo}`;
  return `${repoUrl}/releases/download/${encodeURIComponent(options.tag)}/`;
}

// ---------------------------------------------------------------------------------------------
// Dry run and local stage
// ---------------------------------------------------------------------------------------------

function printPlan(run: Run, bundle: Bundle, options: ReleaseOptions): void {
  const where = options.site ? `${options.site.server}/${options.site.repo}` : options.out;
  run.result(`Plan for ${options.tag} (commit ${options.commit}) -> ${where}; nothing written:`);
  for (const asset of [...bundle.files, bundle.sums, bundle.manifestAsset, bundle.provenance]) {
    run.result(`  ${asset.sha256}  ${asset.name}  ${formatBytes(asset.size)}`);
  }
}

/**
 * Stages the bundle in --out, whole or not at all (stage.ts says how), then tells the operator
 * how to check and publish it.
 */
async function stageLocally(run: Run, bundle: Bundle, options: ReleaseOptions): Promise<void> {
  const out = run.resolve(options.out);
  await writeStage(run, out, [
    ...bundle.files,
    bundle.sums,
    bundle.manifestAsset,
    bundle.provenance,
  ]);
  run.log(
    `Staged ${bundle.files.length} assets, ${SUMS_NAME}, ${MANIFEST_NAME} and ${bundle.provenance.name} in ${out}`,
  );
  run.log(`Check them: (cd ${out} && sha256sum -c ${SUMS_NAME})`);
  run.log(
    `Publish them: FORGEJO_TOKEN=... deno task release --server https://FORGEJO --repo OWNER/NAME --tag ${options.tag} --commit ${options.commit} --flake ${options.flake} --targets ${
      options.targets.join(",")
    }`,
  );
  run.result(out);
}

// ---------------------------------------------------------------------------------------------
// The release: find or create the draft, refuse what would change history
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
  run: Run,
  forgejo: Forgejo,
  options: ReleaseOptions,
  bundle: Bundle,
): Promise<Release> {
  const existing = await forgejo.releases.byTag(options.tag);
  if (existing) return await adoptRelease(run, forgejo, existing, options);
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
    run.log(`Created draft release ${created.tag_name} (id ${created.id})`);
    return created;
  }
  // Another job created it between our lookup and our POST: continue with theirs.
  const raced = await forgejo.releases.byTag(options.tag);
  if (!raced) {
    throw new ReleaseError(
      `Forgejo says a release for ${options.tag} exists but does not show it; rerun`,
    );
  }
  run.log(`Another run created ${options.tag} at the same time; continuing with it`);
  return await adoptRelease(run, forgejo, raced, options);
}

/**
 * Takes over a release made earlier (by a killed run, another job, or another tool). A draft
 * makes its tag from target_commitish only when published, so a draft that names a branch or
 * nothing is pinned to the built SHA first; one naming another SHA is refused.
 */
async function adoptRelease(
  run: Run,
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
  run.log(
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
    run.log(
      `Pinned the draft to commit ${options.commit} (it named ${
        JSON.stringify(release.target_commitish)
      }, where its tag would land when published)`,
    );
  }
  return await forgejo.releases.edit(release.id, edit);
}

// ---------------------------------------------------------------------------------------------
// What to upload: the plan (release_index's planUploads) refused when it would change history
// ---------------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------------
// The index: the union of every job's assets, written until it holds
// ---------------------------------------------------------------------------------------------

/**
 * Writes SHA256SUMS, manifest.json and the provenance covering every asset, re-reading until
 * exactly one of each is there and lists what every job built; then removes the copies this
 * run replaced. Jobs writing at once converge: each writes the union of every copy it sees,
 * and deletes only older manifest copies whose every name its own lists, so no job's entries
 * are lost. `read`: the index of `draft` as this run last read it (with `key`).
 */
async function writeIndex(
  run: Run,
  forgejo: Forgejo,
  repository: Repository | undefined,
  draft: Release,
  read: RemoteIndex,
  manifest: Manifest,
  plan: PlannedAction[],
  options: ReleaseOptions,
  key: SigningKey | undefined,
): Promise<void> {
  await sayingWhatIsLeft(run, forgejo, draft, async () => {
    let roundMs = 0;
    for (let round = 1; round <= 8; round++) {
      // Jobs that collide back off by different amounts, so one of them settles first; the
      // amounts are on the scale of a round, or a slow server keeps them colliding.
      if (round > 1) {
        await sleep(Math.max(options.http.indexWaitMs, roundMs) * (1 + Math.random() * 4));
      }
      const started = performance.now();
      const release = await forgejo.releases.get(draft.id);
      // The first round starts from `read` while the release lists exactly its copies: a copy
      // another job wrote or deleted since shows in the listing, and then all are read again.
      const index = round === 1 && listsIndexAsRead(release, read)
        ? read
        : await readIndex(forgejo, release, key);
      const merged = mergeManifests(unionManifest(index), manifest);
      if (judgeRelease(release.assets, index, merged.assets, key?.fingerprint).index.length === 0) {
        // Only now, with the new SHA256SUMS in, may the copies it no longer lists go.
        const replaced = plan.flatMap((action) => action.kind === "conflict" ? [] : action.remove);
        for (const copy of replaced) {
          await deleteAsset(run, forgejo, release.id, copy, "a stray or replaced copy");
        }
        await updateBody(forgejo, release, index.manifests[0].manifest, options);
        return;
      }
      // The newest copies may already cover everything; their signature is kept or made below.
      const newest = {
        manifests: index.manifests.slice(-1),
        sums: index.sums.slice(-1),
        provenances: index.provenances.slice(-1),
      };
      const written = judgeRelease([], newest, merged.assets, key?.fingerprint).index.length === 0
        ? {
          manifest: newest.manifests[0].copy.id,
          sums: newest.sums[0].copy.id,
          provenance: newest.provenances[0].copy.id,
          signature: await keepOrSign(run, forgejo, release, index, key),
        }
        : await uploadIndex(run, forgejo, repository, release, merged, options, key);
      const older = [
        ...index.manifests.filter((m) =>
          m.copy.id < written.manifest &&
          m.manifest.assets.every((asset) => merged.assets.some((mine) => mine.name === asset.name))
        ),
        // Older SHA256SUMS and provenance copies only restate manifests that were merged above.
        ...index.sums.filter((s) => s.copy.id < written.sums),
        ...index.provenances.filter((p) => p.copy.id < written.provenance),
        // A signature goes with the SHA256SUMS it signs.
        ...index.signatures.filter((s) => s.copy.id !== written.signature),
      ];
      for (const { copy } of older) {
        await deleteAsset(run, forgejo, release.id, copy, "an older index");
      }
      roundMs = performance.now() - started;
    }
    throw new ReleaseError(
      `${SUMS_NAME} of ${options.tag} kept changing under this run (other jobs writing)`,
    );
  });
}

/**
 * manifest.json first, then the provenance of the merged manifest, then SHA256SUMS, which
 * lists both their checksums too, then (with a key) SHA256SUMS.sig over exactly those bytes.
 */
async function uploadIndex(
  run: Run,
  forgejo: Forgejo,
  repository: Repository | undefined,
  release: Release,
  merged: Manifest,
  options: ReleaseOptions,
  key: SigningKey | undefined,
): Promise<{ manifest: number; provenance: number; sums: number; signature?: number }> {
  const fresh = bundleRelease([], merged, await attest(run, options, merged, repository, key));
  const manifest = await uploadAsset(run, forgejo, release.id, fresh.manifestAsset, release.assets);
  const provenance = await uploadAsset(run, forgejo, release.id, fresh.provenance, release.assets);
  const sums = await uploadAsset(run, forgejo, release.id, fresh.sums, release.assets);
  run.log(
    `Wrote ${SUMS_NAME}, ${MANIFEST_NAME} and ${fresh.provenance.name} covering ${merged.assets.length} assets`,
  );
  const signature = key && await uploadSignature(run, forgejo, release, fresh.sums.bytes, key);
  return { manifest: manifest.id, provenance: provenance.id, sums: sums.id, signature };
}

/**
 * The signature to keep beside the newest SHA256SUMS: the newest one over its bytes (by
 * `key`, when a key is held), else, holding a key, a new one. Undefined: none is kept.
 */
async function keepOrSign(
  run: Run,
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
  return await uploadSignature(run, forgejo, release, new TextEncoder().encode(sums.text), key);
}

async function uploadSignature(
  run: Run,
  forgejo: Forgejo,
  release: Release,
  sums: Uint8Array,
  key: SigningKey,
): Promise<number> {
  const asset = bytesAsset(SIGNATURE_NAME, await signSums(key, sums));
  const stored = await uploadAsset(run, forgejo, release.id, asset, release.assets);
  run.log(`Signed ${SUMS_NAME} with ${key.fingerprint} (${SIGNATURE_NAME})`);
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

// ---------------------------------------------------------------------------------------------
// Publish once everything is there, then confirm it
// ---------------------------------------------------------------------------------------------

/**
 * Publishes the draft once it is complete. When another job's assets are there but not yet
 * covered, that job is still writing: wait (up to --timeout) for it to cover them.
 */
async function publishWhenComplete(
  run: Run,
  forgejo: Forgejo,
  draft: Release,
  options: ReleaseOptions,
  key: SigningKey | undefined,
  ipxeSigned: FileAsset[],
): Promise<Release> {
  const deadline = Date.now() + options.http.timeoutMs;
  let publishes = 0;
  for (let waited = false;; waited = true) {
    if (waited) await sleep(options.http.pollMs);
    const release = await forgejo.releases.get(draft.id);
    const problems = problemsOf(
      judgeRelease(
        release.assets,
        await readIndex(forgejo, release, key),
        undefined,
        key?.fingerprint,
        ipxeSigned,
      ),
    );
    if (problems.length === 0) {
      if (release.draft && !options.draft) {
        const published = await publishDraft(run, forgejo, release);
        if (!published.draft) return published;
        // Another job's edit, written from the release as it read it before, can undo ours
        // once; a server that never publishes is told apart by asking a few times only.
        if (++publishes === MAX_PUBLISHES || Date.now() > deadline) throw notPublished(release);
        run.log(`${options.tag} still reads as a draft after publishing it: publishing it again`);
        continue;
      }
      if (release.draft) {
        run.log(
          `Left ${options.tag} a draft (--draft): publish it with --finalize --tag ${options.tag}`,
        );
      }
      return release;
    }
    if (release.draft && options.draft) {
      run.log(`${options.tag} stays a draft until every job is in: ${problems.join("; ")}`);
      return release;
    }
    if (Date.now() > deadline) {
      throw new ReleaseError(
        `release ${options.tag} ${release.draft ? "stays a draft" : "is incomplete"} because ${
          problems.join("; ")
        }: if another job is still adding assets, it completes the release when it finishes; otherwise rerun with every target, or delete what does not belong`,
      );
    }
    if (!waited) {
      run.log(`Waiting for another job to finish ${options.tag}: ${problems.join("; ")}`);
    }
  }
}

/** How many times a publish is asked for before a draft that stays one is reported. */
const MAX_PUBLISHES = 3;

/** Publishes the draft, and returns the release as Forgejo then reads it. */
async function publishDraft(run: Run, forgejo: Forgejo, release: Release): Promise<Release> {
  await forgejo.releases.edit(release.id, { draft: false });
  const published = await forgejo.releases.get(release.id);
  if (!published.draft) run.log(`Published ${published.tag_name}`);
  return published;
}

function notPublished(release: Release): ReleaseError {
  return new ReleaseError(`Forgejo did not publish ${release.tag_name}; rerun to try again`);
}

/**
 * The last job of a matrix: no build, just check the assembled draft and publish it. Holding
 * the keys (which build jobs need not hold), it first signs the draft for iPXE and writes the
 * complete index again, signed.
 */
async function finalizeRelease(
  run: Run,
  forgejo: Forgejo,
  repository: Repository | undefined,
  options: ReleaseOptions,
  { key, ipxe }: { key?: SigningKey; ipxe?: IpxeSigningIdentity },
  env: Env,
): Promise<void> {
  const found = await forgejo.releases.byTag(options.tag);
  if (!found) {
    throw new ReleaseError(
      `there is no release ${options.tag} to finalize: run the build jobs first (with --draft)`,
    );
  }
  await refuseTagOnOtherCommit(forgejo, options);
  const adopted = await adoptRelease(run, forgejo, found, options);
  const read = await readIndex(forgejo, adopted, key);
  const union = unionManifest(read);
  // Complete but for its signatures (build jobs need not hold the keys): written again, signed.
  const { signatures: _, ...unsignedParts } = read;
  const built = ipxe && union ? asBuiltForIpxe(adopted.assets, union) : adopted.assets;
  const complete = union !== undefined &&
    problemsOf(judgeRelease(built, unsignedParts)).length === 0;
  const signed = complete && ipxe
    ? await signDraftForIpxe(
      run,
      forgejo,
      adopted,
      read,
      union,
      downloadBase(options, repository),
      { identity: ipxe, uploads: options.uploads },
    )
    : undefined;
  if (complete && (key || ipxe)) {
    const { manifest = union, plan = [] } = signed ?? {};
    await writeIndex(run, forgejo, repository, adopted, read, manifest, plan, options, key);
  }
  const release = await forgejo.releases.get(adopted.id);
  const index = await readIndex(forgejo, release, key);
  const problems = problemsOf(
    judgeRelease(release.assets, index, undefined, key?.fingerprint, signed?.files),
  );
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
  const published = release.draft ? await publishDraft(run, forgejo, release) : release;
  if (published.draft) throw notPublished(release);
  await reportRelease(run, published, index.manifests[0].manifest, env);
}

/**
 * Signs a complete draft for iPXE: its scripts made from the built ones (read back from the
 * release: they are small, and the images need not be downloaded, their digests are signed),
 * uploaded where they differ from what the draft holds. Returns the signed files, the
 * manifest listing them and the plan whose replaced copies go once the index lists them. A
 * published release is never changed: it gets neither, and the judgement says what it lacks.
 */
async function signDraftForIpxe(
  run: Run,
  forgejo: Forgejo,
  release: Release,
  index: RemoteIndex,
  union: Manifest,
  base: string,
  { identity, uploads }: { identity: IpxeSigningIdentity; uploads: number },
): Promise<{ files: FileAsset[]; manifest: Manifest; plan: PlannedAction[] }> {
  const readBuilt = async (built: FileAsset) => {
    const text = await readListedText(forgejo, release, built);
    if (text !== undefined) return text;
    throw new ReleaseError(
      `${built.name} of ${release.tag_name} is not the script ${MANIFEST_NAME} lists, so it cannot be signed for iPXE: rerun the job that builds it`,
    );
  };
  const assets = union.assets.map((asset) => ({ ...asset, path: asset.storePath }));
  const files = await signForIpxe(run, assets, readBuilt, base, identity);
  const plan = planUploads(
    files,
    release.assets,
    recordedSums(release, index),
    release.draft,
    true,
  );
  const changes = plan.some((action) => action.kind !== "skip" || action.remove.length > 0);
  if (changes && !release.draft) return { files, manifest: union, plan: [] };
  await uploadPlanned(run, forgejo, release, plan, uploads);
  const signed = { ...union, assets: files.map(describeAsset) };
  return { files, manifest: mergeManifests(union, signed), plan };
}

async function reportRelease(
  run: Run,
  release: Release,
  manifest: Manifest,
  env: Env,
): Promise<void> {
  if (env.GITHUB_OUTPUT) {
    await fs.appendFile(
      run.resolve(env.GITHUB_OUTPUT),
      stepOutputs({
        "release-url": release.html_url,
        tag: release.tag_name,
        "release-id": String(release.id),
      }),
    );
  }
  if (env.GITHUB_STEP_SUMMARY) {
    await fs.appendFile(run.resolve(env.GITHUB_STEP_SUMMARY), stepSummary(release, manifest));
  }
  run.log(`Release ${release.tag_name}${release.draft ? " (draft)" : ""}: ${release.html_url}`);
  run.result(release.html_url);
}

if (import.meta.main) {
  Deno.exit(await main(Deno.args, Deno.env.toObject(), processIo(), Deno.cwd()));
}

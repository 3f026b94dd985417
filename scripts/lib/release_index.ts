/**
 * A release's index, the one home every command reads it from: SHA256SUMS and manifest.json
 * rendered and parsed, read back from a release with who signed them, merged across jobs, and
 * judged complete or not; which copy holds which bytes (the upload record in the release body);
 * and the published release and checksums fetch and verify start from. It reads releases and
 * renders what is written to them; it never uploads, edits or deletes.
 */
import * as fs from "node:fs/promises";
import * as path from "node:path";
import * as v from "valibot";
import { type Attachment, type Release } from "../../types/forgejo.ts";
import {
  ASSET_NAME,
  INDEX_NAMES,
  type Manifest,
  MANIFEST_NAME,
  type ManifestAsset,
  ManifestSchema,
  SIGNATURE_NAME,
  SUMS_NAME,
} from "../../types/manifest.ts";
import { ReleaseError, type Run, UsageError } from "./run.ts";
import { type Forgejo } from "./forgejo.ts";
import { type ReleaseOptions } from "./cli.ts";
import { parseJson, safeJson } from "./json.ts";
import { sha256Hex } from "./hash.ts";
import { signatureKey, type TrustedKey, verifySums } from "./sshsig.ts";

/** Index copies read from one release: racing jobs leave a few, never dozens. */
const MAX_INDEX_COPIES = 24;

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

/** Every copy of SHA256SUMS, its signature and manifest.json in a release, oldest first. */
export interface RemoteIndex {
  manifests: { copy: Attachment; manifest: Manifest; sha256: string }[];
  sums: { copy: Attachment; text: string }[];
  /**
   * `signer`: the fingerprint of the key that made this signature over the newest SHA256SUMS
   * (checked with the key the signature names); undefined when it signs other bytes.
   */
  signatures: { copy: Attachment; text: string; signer?: string }[];
}

export async function readIndex(forgejo: Forgejo, release: Release): Promise<RemoteIndex> {
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
    const key = signatureKey(signature.text);
    return (await verifySums([key], sums, signature.text)).fingerprint;
  } catch (error) {
    if (error instanceof ReleaseError || error instanceof UsageError) return undefined;
    throw error;
  }
}

/** The union of every manifest.json copy (a newer copy wins per name), if any. */
export function unionManifest(index: RemoteIndex): Manifest | undefined {
  return index.manifests.reduce<Manifest | undefined>(
    (union, next) => mergeManifests(union, next.manifest),
    undefined,
  );
}

/**
 * What a release recorded of its assets, for a rerun to reuse the checksums nix still vouches
 * for. On Forgejo: the manifest.json the release's SHA256SUMS lists, and when this run signs
 * (`signer`), only under this run's signature, so a record someone else wrote is never signed
 * as built. Staged locally (no `forgejo`): the earlier stage's manifest.json in `out`.
 */
export async function recordedAssets(
  forgejo: Forgejo | undefined,
  options: Pick<ReleaseOptions, "tag" | "out">,
  signer: string | undefined,
): Promise<ManifestAsset[]> {
  if (!forgejo) return await stagedAssets(options.out);
  const release = await forgejo.releases.byTag(options.tag);
  if (!release) return [];
  const index = await readIndex(forgejo, release);
  const listed = index.sums.length === 1
    ? parseSums(index.sums[0].text).get(MANIFEST_NAME)
    : undefined;
  const signed = !signer || index.signatures.some((signature) => signature.signer === signer);
  const manifest = index.manifests.find((copy) => copy.sha256 === listed);
  return signed && manifest ? manifest.manifest.assets : [];
}

async function stagedAssets(dir: string): Promise<ManifestAsset[]> {
  const text = await fs.readFile(path.join(dir, MANIFEST_NAME), "utf8").catch(() => undefined);
  const parsed = v.safeParse(ManifestSchema, safeJson(text ?? ""));
  return parsed.success ? parsed.output.assets : [];
}

/** What the release says a stored copy holds: its sha256, or undefined when unknown. */
export type RecordedSha = (copy: Attachment) => string | undefined;

/**
 * Which attachment holds which bytes, kept in the release body as an HTML comment (invisible
 * on the release page) and updated after each upload. It lets a rerun trust a copy by its id
 * instead of uploading it again, and tells a replaced copy from the new one.
 */
export type UploadRecord = Record<string, { id: number; size: number; sha256: string }>;

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
export async function readRecordedSums(forgejo: Forgejo, release: Release): Promise<RecordedSha> {
  const record = readUploadRecord(release.body);
  const manifest = unionManifest(await readIndex(forgejo, release));
  return (copy) => {
    const entry = record[copy.name];
    if (entry) return entry.id === copy.id ? entry.sha256 : undefined;
    return manifest?.assets.find((asset) => asset.name === copy.name)?.sha256;
  };
}

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
export function problemsOf(judgement: Judgement): string[] {
  return [...judgement.index, ...judgement.assets];
}

/** `latest` is the newest published boot-v* release: never a draft, pre-release or boot-dev. */
export async function findBootRelease(forgejo: Forgejo, tag: string): Promise<Release> {
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
export async function authenticSums(
  run: Run,
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
    run.log(`${tag}: ${SUMS_NAME} is signed by ${signer.principal} (${signer.fingerprint})`);
  } else {
    run.log(
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
export function assetsOfTargets(
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

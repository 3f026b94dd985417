/**
 * A release's index, the one home every command reads it from: manifest.json described from a
 * build; SHA256SUMS, manifest.json and the provenance rendered, parsed and read back from a
 * release with who signed them, merged across jobs, and judged complete or not; which copy
 * holds which bytes (the upload record in the release body); what to upload (the plan) and the
 * release page. It reads releases and renders what is written to them; it never uploads, edits
 * or deletes, and never decides which published files to trust (trusted_release.ts does).
 */
import * as fs from "node:fs/promises";
import * as path from "node:path";
import * as v from "valibot";
import { type Attachment, type Release } from "../../types/forgejo.ts";
import {
  type FlakeInput,
  INDEX_NAMES,
  type Manifest,
  MANIFEST_NAME,
  type ManifestAsset,
  ManifestSchema,
  SIGNATURE_NAME,
  SUMS_NAME,
} from "../../types/manifest.ts";
import { formatBytes, ReleaseError, UsageError } from "./run.ts";
import { type BundleAsset, type Forgejo } from "./forgejo.ts";
import { type ReleaseOptions } from "./cli.ts";
import { type FileAsset, type FlakeInfo } from "./nix.ts";
import { type FlakeMetadata } from "../../types/nix.ts";
import { parseJson, safeJson } from "./json.ts";
import { sha256Hex } from "./hash.ts";
import { signatureKey, type SigningKey, verifySums } from "./sshsig.ts";
import { ENVELOPE_NAME, type ProvenanceName, STATEMENT_NAME } from "../../types/provenance.ts";
import { checkSubjects, readStatement, signerOf, verifyEnvelope } from "./provenance.ts";

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

/** Every copy of each index file in a release, oldest first. */
export interface RemoteIndex {
  manifests: { copy: Attachment; manifest: Manifest; sha256: string }[];
  sums: { copy: Attachment; text: string }[];
  /**
   * `signer`: the fingerprint of the key that made this signature over the newest SHA256SUMS
   * (checked with the key the signature names); undefined when it signs other bytes.
   */
  signatures: { copy: Attachment; text: string; signer?: string }[];
  /**
   * provenance.intoto.json or .jsonl. `signer`: the fingerprint of the key readIndex was given,
   * when this envelope verifies with it.
   */
  provenances: ProvenanceCopy[];
}

export interface ProvenanceCopy {
  copy: Attachment;
  name: ProvenanceName;
  bytes: Uint8Array;
  sha256: string;
  signer?: string;
}

/**
 * Reads every index file of `release`. `key`, the signing key this run holds, is what each
 * provenance envelope is checked against (its `signer`).
 */
export async function readIndex(
  forgejo: Forgejo,
  release: Release,
  key?: SigningKey,
): Promise<RemoteIndex> {
  const copies = release.assets.filter((copy) => INDEX_NAMES.has(copy.name)).length;
  if (copies > MAX_INDEX_COPIES) {
    const kinds = [...INDEX_NAMES];
    throw new ReleaseError(
      `${release.tag_name} holds ${copies} copies of ${kinds.slice(0, -1).join(", ")} and ${
        kinds.at(-1)
      }, more than racing jobs ever leave (${MAX_INDEX_COPIES}): refusing to read them; delete the extra copies in Forgejo`,
    );
  }
  const index: RemoteIndex = { manifests: [], sums: [], signatures: [], provenances: [] };
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
    } else if (copy.name === STATEMENT_NAME || copy.name === ENVELOPE_NAME) {
      const bytes = new TextEncoder().encode(text);
      index.provenances.push({ copy, name: copy.name, bytes, sha256: sha256Hex(bytes) });
    }
  }
  if (key) {
    for (const provenance of index.provenances) {
      provenance.signer = await envelopeSigner(provenance, key);
    }
  }
  const newest = index.sums.at(-1);
  for (const signature of index.signatures) {
    signature.signer = newest && await signerOver(new TextEncoder().encode(newest.text), signature);
  }
  return index;
}

/**
 * True when the index copies `release` lists are exactly those `index` was read from: no job
 * wrote, deleted or renamed one since, and a copy's bytes never change under its id.
 */
export function listsIndexAsRead(
  release: Pick<Release, "assets">,
  index: RemoteIndex,
): boolean {
  const read = [...index.manifests, ...index.sums, ...index.signatures, ...index.provenances]
    .map(({ copy }) => copy);
  const listed = release.assets.filter((copy) => INDEX_NAMES.has(copy.name));
  return listed.length === read.length &&
    listed.every((copy) =>
      read.some((same) => same.id === copy.id && same.name === copy.name && same.size === copy.size)
    );
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

/** `key`'s fingerprint when it signed this provenance envelope; undefined otherwise. */
async function envelopeSigner(
  provenance: ProvenanceCopy,
  key: SigningKey,
): Promise<string | undefined> {
  if (provenance.name !== ENVELOPE_NAME) return undefined;
  const own = { publicKey: signerOf(key).publicKey, principal: key.fingerprint };
  try {
    return (await verifyEnvelope(provenance.bytes, [own])).keyid;
  } catch (error) {
    if (error instanceof ReleaseError) return undefined;
    throw error;
  }
}

/** A small file of `release` (1 MiB at most) as text: a copy with `sha256`, else undefined. */
export async function readListedText(
  forgejo: Forgejo,
  release: Release,
  { name, sha256 }: { name: string; sha256: string },
): Promise<string | undefined> {
  for (const copy of release.assets.filter((asset) => asset.name === name)) {
    const text = await forgejo.assets.text(copy);
    if (text !== undefined && sha256Hex(new TextEncoder().encode(text)) === sha256) return text;
  }
  return undefined;
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

/**
 * A copy's sha256 from the upload record, else (for older copies) from manifest.json: from
 * `release` and its `index` as read.
 */
export function recordedSums(release: Release, index: RemoteIndex): RecordedSha {
  const record = readUploadRecord(release.body);
  const manifest = unionManifest(index);
  return (copy) => {
    const entry = record[copy.name];
    if (entry) return entry.id === copy.id ? entry.sha256 : undefined;
    return manifest?.assets.find((asset) => asset.name === copy.name)?.sha256;
  };
}

/**
 * What to upload: a pure plan from the local bundle and the release's current state, each
 * copy judged by what the upload record says it holds.
 */
export type PlannedAction =
  /** Already there with the same size and checksum: `remove` lists stray copies to delete. */
  | { kind: "skip"; asset: BundleAsset; keep: Attachment; remove: Attachment[] }
  /** Not there (or only partial/unverifiable copies, removed once the new index is in). */
  | { kind: "upload"; asset: BundleAsset; remove: Attachment[] }
  /** There with other bytes: refused unless --replace, which uploads then removes. */
  | { kind: "conflict"; asset: BundleAsset; remote: Attachment[]; remoteSha256?: string };

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

/**
 * manifest.json of this run's build: the tag and commit, the flake with its locked inputs,
 * the nix that built it, and every asset with the derivation it came from.
 */
export function describeRelease(
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
    assets: assets.map(describeAsset),
  };
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

/**
 * Words from a server (a tag, an asset name) as Markdown text in a step summary: on one line,
 * with every character Markdown or HTML would read (a table's `|`, a code span's backtick, a
 * tag's `<`) escaped, so they show as written and add nothing of their own. What opens a
 * block (a heading's `#`, a list's `-`, `+` or `1.`, a rule's `=`) is escaped where it
 * would open one, at the start, since the text may begin a line.
 */
export function markdownText(text: string): string {
  return text.replace(/\s+/g, " ").replace(/[\\`*_[\]<>&|~]/g, "\\$&")
    .replace(/^( ?)([#+=-])/, "$1\\$2").replace(/^( ?\d+)([.)])/, "$1\\$2");
}

/**
 * The job's summary: the release, linked, and a table of its assets. The tag and the URL are
 * the server's words, so neither can add Markdown or HTML of its own: the tag is escaped as
 * text, and the URL (absolute http(s), as read) is percent-encoded where a link would end.
 */
export function stepSummary(
  release: Pick<Release, "tag_name" | "html_url" | "draft">,
  manifest: Pick<Manifest, "assets">,
): string {
  const tag = markdownText(release.tag_name);
  const url = new URL(release.html_url).href.replace(
    /[()\\]/g,
    (char) => `%${char.charCodeAt(0).toString(16).toUpperCase()}`,
  );
  const rows = manifest.assets.map((a) =>
    `| ${a.name} | ${formatBytes(a.size)} | \`${a.sha256}\` |`
  );
  return [
    `### Release [${tag}](${url})${release.draft ? " (draft)" : ""}`,
    "",
    "| asset | size | sha256 |",
    "|---|---|---|",
    ...rows,
    "",
  ].join("\n");
}

/** One asset as manifest.json records it. */
export function describeAsset(asset: FileAsset): ManifestAsset {
  return {
    name: asset.name,
    size: asset.size,
    sha256: asset.sha256,
    target: asset.target,
    system: asset.system,
    storePath: asset.path,
    // Bytes release-boot made (a rewritten script) are not the store file nix vouches for.
    narHash: asset.bytes ? undefined : asset.narHash,
    drvPath: asset.drvPath,
  };
}

/** What keeps a release from being complete, in two kinds; both empty: it is complete. */
interface Judgement {
  /**
   * SHA256SUMS and manifest.json: once each, agreeing, listing what is wanted; SHA256SUMS.sig
   * at most once and over the current SHA256SUMS (once, by `signer`, when that is given); the
   * provenance once, listed in SHA256SUMS, attesting exactly what it lists (an envelope by
   * `signer`, when that is given).
   */
  index: string[];
  /** The other assets: each there once, listed, with its listed size. */
  assets: string[];
}

/**
 * The one completeness judgement. `wanted`: the assets the index must list exactly (the
 * union of every job's), or undefined to accept what manifest.json lists. `signer`: the
 * fingerprint of the signing key this run holds; then the release must carry its signature
 * and its signed provenance. Signatures or provenances left out of `index` are not judged.
 * `ipxeSigned`: what signing for iPXE makes of the release with the iPXE key this run holds
 * (verifying scripts and `.sig`s, the same bytes each time): the index must list each as made.
 */
export function judgeRelease(
  assets: Pick<Attachment, "name" | "size">[],
  index:
    & Pick<RemoteIndex, "manifests" | "sums">
    & Partial<Pick<RemoteIndex, "signatures" | "provenances">>,
  wanted?: Pick<ManifestAsset, "name" | "sha256">[],
  signer?: string,
  ipxeSigned?: Pick<ManifestAsset, "name" | "sha256">[],
): Judgement {
  const problems: Judgement = { index: [], assets: [] };
  if (index.signatures) problems.index.push(...signatureProblems(index.signatures, signer));
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
  if (index.provenances) {
    problems.index.push(...provenanceProblems(index.provenances, sums?.text, signer));
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
  for (const file of ipxeSigned ?? []) {
    if (!listed.some((entry) => same(entry, file))) {
      problems.index.push(`${SUMS_NAME} does not list ${file.name} as signed for iPXE`);
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

/**
 * The provenance: there once, listed in SHA256SUMS as it is, attesting what SHA256SUMS lists;
 * with `signer`, an envelope by that key.
 */
function provenanceProblems(
  provenances: Pick<ProvenanceCopy, "name" | "bytes" | "sha256" | "signer">[],
  sums: string | undefined,
  signer: string | undefined,
): string[] {
  if (provenances.length !== 1) {
    return [
      provenances.length === 0
        ? `it has no provenance (${STATEMENT_NAME} or ${ENVELOPE_NAME})`
        : `the provenance is there ${provenances.length} times`,
    ];
  }
  const [{ name, bytes, sha256, signer: by }] = provenances;
  const problems: string[] = [];
  if (signer && by !== signer) problems.push(`${name} is not signed by the signing key ${signer}`);
  if (sums === undefined) return problems;
  const listed = parseSums(sums);
  if (listed.get(name) !== sha256) {
    return [...problems, `${SUMS_NAME} does not list ${name} as it is`];
  }
  try {
    return [...problems, ...checkSubjects(readStatement(name, bytes), listed, INDEX_NAMES)];
  } catch (error) {
    if (error instanceof ReleaseError) return [...problems, error.message];
    throw error;
  }
}

/**
 * SHA256SUMS lists every asset and manifest.json (releases before that did not list it), and
 * whichever provenance it lists (judged on its own, by provenanceProblems).
 */
function sumsAgree(text: string, assets: ManifestAsset[], manifestSha: string): boolean {
  const provenance = [...parseSums(text)]
    .filter(([name]) => name === STATEMENT_NAME || name === ENVELOPE_NAME)
    .map(([name, sha256]) => ({ name, sha256 }));
  const manifest = { name: MANIFEST_NAME, sha256: manifestSha };
  return text === renderSums([...assets, manifest, ...provenance]) || text === renderSums(assets);
}

/** All problems of a judgement, as one list. */
export function problemsOf(judgement: Judgement): string[] {
  return [...judgement.index, ...judgement.assets];
}

/**
 * SLSA v1 provenance for a release: the in-toto Statement made from manifest.json's facts, its
 * DSSE envelope signed with the release key, and the checks that read both back. It reads no
 * files and speaks no HTTP: callers hand it facts and bytes, and the key only to sign with.
 */
import * as v from "valibot";
import type { Manifest } from "../../types/manifest.ts";
import {
  BUILD_TYPE,
  type Envelope,
  ENVELOPE_NAME,
  EnvelopeSchema,
  IN_TOTO_PAYLOAD_TYPE,
  type ProvenanceName,
  type ResourceDescriptor,
  SLSA_PROVENANCE_V1,
  type Statement,
  STATEMENT_NAME,
  STATEMENT_TYPE,
  StatementSchema,
  type Workflow,
} from "../../types/provenance.ts";
import { ReleaseError } from "./run.ts";
import type { CiJob } from "./cli.ts";
import { ed25519Blob, readEd25519Blob, type SigningKey, sshFingerprint } from "./sshsig.ts";

/** builder.id of a release made by hand, outside CI: nothing vouches for the machine. */
export const BY_HAND_BUILDER = "https://release-boot.invalid/builders/by-hand";
/** A statement is kilobytes; a provenance file larger than this is not one release-boot wrote. */
export const MAX_PROVENANCE_BYTES = 1 << 20;

/** Who ran the build and when. */
export interface RunDetails {
  /** A workflow's URL in CI (see builderOf), BY_HAND_BUILDER otherwise. */
  builderId: string;
  /** The CI run's URL, or an id made for a run by hand. */
  invocationId: string;
  startedOn: Date;
  finishedOn: Date;
}

export interface ProvenanceFacts {
  /** The release's manifest.json: with several jobs, the union of every job's. */
  manifest: Pick<Manifest, "flake" | "nixVersion" | "assets">;
  /** The flake reference a rebuild starts from, pinned to the release's commit. */
  flake: string;
  run: RunDetails;
  /** The CI workflow, when run in CI. */
  workflow?: Workflow;
}

/** The release key's two halves, as the caller holds them (the private one never leaves it). */
export interface Signer {
  sign: (bytes: Uint8Array) => Promise<Uint8Array>;
  /** The raw 32-byte Ed25519 public key. */
  publicKey: Uint8Array;
}

/** The release's signing key as a Signer: the key that signs SHA256SUMS signs the envelope. */
export function signerOf(key: SigningKey): Signer {
  return {
    sign: async (bytes) => new Uint8Array(await key.sign(bytes)),
    publicKey: readEd25519Blob(
      key.publicBlob,
      (problem) => new ReleaseError(`the signing key ${key.fingerprint} is damaged (${problem})`),
    ),
  };
}

/**
 * Who ran this build and when: in CI its workflow (builderOf) and the run's URL; by hand
 * BY_HAND_BUILDER and the id this run made for itself. It finishes now.
 */
export function runDetailsOf(
  ci: CiJob | undefined,
  started: { id: string; startedOn: Date },
): Pick<ProvenanceFacts, "run" | "workflow"> {
  const { builderId, workflow } = ci ? builderOf(ci) : { builderId: BY_HAND_BUILDER };
  return {
    run: {
      builderId,
      invocationId: ci?.runUrl ?? started.id,
      startedOn: started.startedOn,
      finishedOn: new Date(),
    },
    ...(workflow ? { workflow } : {}),
  };
}

/** A key the reader trusts; release-boot's --trust keys have this shape. */
export interface TrustedEnvelopeKey {
  /** The raw 32-byte Ed25519 public key. */
  publicKey: Uint8Array;
  principal: string;
}

/**
 * The statement for a release. Its subjects are manifest.json's assets: every image and script
 * SHA256SUMS lists, and none of the index files. Arrays are sorted and keys written in one
 * order, so the same facts always give the same bytes.
 */
export function buildStatement(facts: ProvenanceFacts): Statement {
  const { manifest, run } = facts;
  const assets = [...manifest.assets].sort((a, b) => compare(a.name, b.name));
  const attribute = (asset: { system: string; target: string }) =>
    `packages.${asset.system}.${asset.target}`;
  const statement = {
    _type: STATEMENT_TYPE,
    subject: assets.map((asset) => ({ name: asset.name, digest: { sha256: asset.sha256 } })),
    predicateType: SLSA_PROVENANCE_V1,
    predicate: {
      buildDefinition: {
        buildType: BUILD_TYPE,
        externalParameters: {
          flake: facts.flake,
          attributes: sortedUnique(assets.map(attribute)),
          ...(facts.workflow ? { workflow: facts.workflow } : {}),
        },
        internalParameters: {
          nixVersion: manifest.nixVersion,
          systems: sortedUnique(assets.map((asset) => asset.system)),
        },
        resolvedDependencies: [
          sourceOf(facts),
          ...inputsOf(manifest.flake.inputs),
          ...derivationsOf(assets, attribute),
        ],
      },
      runDetails: {
        builder: { id: run.builderId },
        metadata: {
          invocationId: run.invocationId,
          startedOn: run.startedOn.toISOString(),
          finishedOn: run.finishedOn.toISOString(),
        },
      },
    },
  };
  const checked = v.safeParse(StatementSchema, statement);
  if (!checked.success) {
    throw new ReleaseError(`the provenance statement would be invalid: ${firstIssue(checked)}`);
  }
  return checked.output;
}

/** The statement's bytes: indented JSON and a newline, like manifest.json. */
export function renderStatement(statement: Statement): Uint8Array {
  return new TextEncoder().encode(`${JSON.stringify(statement, null, 2)}\n`);
}

/**
 * The provenance file of a release: the statement in a signed envelope when a key is held,
 * the bare statement otherwise.
 */
export async function provenanceFile(
  statement: Statement,
  signer: Signer | undefined,
): Promise<{ name: string; bytes: Uint8Array }> {
  const bytes = renderStatement(statement);
  if (!signer) return { name: STATEMENT_NAME, bytes };
  return { name: ENVELOPE_NAME, bytes: await signEnvelope(bytes, signer.sign, signer.publicKey) };
}

/**
 * A DSSE envelope of `statementBytes`, signed over DSSE's pre-authentication encoding with
 * Ed25519, as one JSON line. The keyid is the key's SSH fingerprint (keyIdOf).
 */
export async function signEnvelope(
  statementBytes: Uint8Array,
  sign: (bytes: Uint8Array) => Promise<Uint8Array>,
  publicKey: Uint8Array,
): Promise<Uint8Array> {
  const signed = preAuthEncoding(IN_TOTO_PAYLOAD_TYPE, statementBytes);
  const signature = await sign(signed);
  // A sign function of another key would publish an envelope no one can verify.
  if (!await ed25519Verifies(publicKey, signed, signature)) {
    throw new ReleaseError(
      `the provenance signature does not verify with ${
        keyIdOf(publicKey)
      }: sign and publicKey are not one key pair`,
    );
  }
  const envelope: Envelope = {
    payload: statementBytes.toBase64(),
    payloadType: IN_TOTO_PAYLOAD_TYPE,
    signatures: [{ keyid: keyIdOf(publicKey), sig: signature.toBase64() }],
  };
  return new TextEncoder().encode(`${JSON.stringify(envelope)}\n`);
}

/**
 * The keyid of an Ed25519 key: its SSH SHA256 fingerprint, as `ssh-keygen -lf KEY.pub` prints
 * it (and as go-securesystemslib's dsse.SHA256KeyID computes it).
 */
export function keyIdOf(publicKey: Uint8Array): string {
  return sshFingerprint(ed25519Blob(publicKey));
}

/**
 * Checks an envelope against the trusted keys only and returns its statement and signer.
 * Refuses, each in one line: an envelope that is not DSSE, a payload type other than in-toto,
 * a signature by a key not trusted, a payload or signature changed since signing, a payload
 * that is not release-boot's provenance.
 */
export async function verifyEnvelope(
  bytes: Uint8Array,
  trusted: TrustedEnvelopeKey[],
): Promise<{ statement: Statement; keyid: string; principal: string }> {
  const envelope = parseEnvelope(bytes);
  const payload = Uint8Array.fromBase64(envelope.payload);
  const signed = preAuthEncoding(envelope.payloadType, payload);
  const signers = envelope.signatures.map((signature) => signature.keyid || "a key with no keyid");
  let failed: TrustedEnvelopeKey | undefined;
  for (const signature of envelope.signatures) {
    const keys = trusted.filter((key) =>
      !signature.keyid || keyIdOf(key.publicKey) === signature.keyid
    );
    for (const key of keys) {
      if (await ed25519Verifies(key.publicKey, signed, Uint8Array.fromBase64(signature.sig))) {
        return {
          statement: parseStatementBytes(payload, ENVELOPE_NAME),
          keyid: keyIdOf(key.publicKey),
          principal: key.principal,
        };
      }
      failed ??= key;
    }
  }
  if (failed) {
    throw new ReleaseError(
      `${ENVELOPE_NAME} does not verify with ${
        keyIdOf(failed.publicKey)
      } (${failed.principal}): its statement or signature was changed after it was signed; download it again, and if it persists the release was tampered with`,
    );
  }
  throw new ReleaseError(
    `${ENVELOPE_NAME} is signed by ${
      signers.join(", ")
    }, a key the trust file does not list: add its public key if you trust it, or find out who signed this release`,
  );
}

/**
 * The statement in a provenance file, without checking any signature: for judging whether a
 * release is complete. `verifyEnvelope` is the check a reader who trusts a key makes.
 */
export function readStatement(name: ProvenanceName, bytes: Uint8Array): Statement {
  return name === ENVELOPE_NAME
    ? parseStatementBytes(Uint8Array.fromBase64(parseEnvelope(bytes).payload), name)
    : parseStatementBytes(bytes, name);
}

/**
 * What keeps the statement's subjects from being exactly the release files SHA256SUMS lists:
 * every entry but `index`, the index files' names (INDEX_NAMES, the provenance's among them).
 * Empty when they agree.
 */
export function checkSubjects(
  statement: Statement,
  sums: ReadonlyMap<string, string>,
  index: ReadonlySet<string>,
): string[] {
  const problems: string[] = [];
  const attested = new Map<string, string>();
  for (const { name, digest } of statement.subject) {
    if (attested.has(name)) problems.push(`the provenance names ${name} twice`);
    attested.set(name, digest.sha256);
    const listed = sums.get(name);
    if (listed === undefined || index.has(name)) {
      problems.push(
        `the provenance attests ${name}, which SHA256SUMS does not list as a release file`,
      );
    } else if (listed !== digest.sha256) {
      problems.push(
        `the provenance gives ${name} sha256 ${digest.sha256}, SHA256SUMS gives ${listed}`,
      );
    }
  }
  for (const name of sums.keys()) {
    if (!index.has(name) && !attested.has(name)) {
      problems.push(`SHA256SUMS lists ${name}, which the provenance does not attest`);
    }
  }
  return problems;
}

/**
 * builder.id and the workflow for a run in CI. `workflowRef` is Forgejo's GITHUB_WORKFLOW_REF
 * (`ops/runners/.forgejo/workflows/boot-images.yml@refs/tags/boot-v1`): the builder is that
 * workflow at that ref, named as GitHub names builders. Servers that do not set it (before
 * forgejo-runner passed workflow_ref on) leave the repository's Actions as the builder.
 */
export function builderOf(
  ci: { server: string; repository: string; workflowRef?: string },
): { builderId: string; workflow?: Workflow } {
  const server = ci.server.replace(/\/+$/, "");
  const at = ci.workflowRef?.lastIndexOf("@") ?? -1;
  const [owner, name, ...file] = ci.workflowRef?.slice(0, at).split("/") ?? [];
  if (!ci.workflowRef || at < 0 || !owner || !name || file.length === 0) {
    return { builderId: `${server}/${ci.repository}/actions` };
  }
  return {
    builderId: `${server}/${ci.workflowRef}`,
    workflow: {
      repository: `${server}/${owner}/${name}`,
      path: file.join("/"),
      ref: ci.workflowRef.slice(at + 1),
    },
  };
}

/** The flake itself: the commit nix built (when the tree was clean) and its NAR hash. */
function sourceOf(facts: ProvenanceFacts): ResourceDescriptor {
  const flake = facts.manifest.flake;
  return {
    name: "flake",
    uri: facts.flake,
    ...digestOf(flake.revision, flake.narHash),
    annotations: { dirty: flake.dirty, locked: flake.locked },
  };
}

/** Each locked input of flake.lock, by its revision and NAR hash. */
function inputsOf(inputs: Manifest["flake"]["inputs"]): ResourceDescriptor[] {
  return Object.keys(inputs).sort(compare).map((name) => ({
    name: `inputs.${name}`,
    ...(inputs[name].url === undefined ? {} : { uri: inputs[name].url }),
    ...digestOf(inputs[name].rev, inputs[name].narHash),
  }));
}

/** Each derivation built, once, named by the attribute that gave it. */
function derivationsOf<T extends { drvPath: string; system: string; target: string }>(
  assets: T[],
  attribute: (asset: T) => string,
): ResourceDescriptor[] {
  const byPath = new Map(assets.map((asset) => [asset.drvPath, attribute(asset)]));
  return [...byPath]
    .sort(([pathA, a], [pathB, b]) => compare(a, b) || compare(pathA, pathB))
    .map(([drvPath, name]) => ({ name, digest: { nixStorePath: drvPath } }));
}

/** gitCommit for a git revision, narHash as nix writes it in flake.lock. */
function digestOf(
  rev: string | undefined,
  narHash: string | undefined,
): { digest?: Record<string, string> } {
  const digest: Record<string, string> = {};
  if (rev && /^(?:[0-9a-f]{40}|[0-9a-f]{64})$/.test(rev)) digest.gitCommit = rev;
  if (narHash) digest.narHash = narHash;
  return Object.keys(digest).length > 0 ? { digest } : {};
}

function parseEnvelope(bytes: Uint8Array): Envelope {
  const envelope = parseJson(EnvelopeSchema, bytes, ENVELOPE_NAME, "a DSSE envelope");
  if (envelope.payloadType !== IN_TOTO_PAYLOAD_TYPE) {
    throw new ReleaseError(
      `${ENVELOPE_NAME} carries "${envelope.payloadType}", not an in-toto statement (${IN_TOTO_PAYLOAD_TYPE})`,
    );
  }
  return envelope;
}

function parseStatementBytes(bytes: Uint8Array, source: string): Statement {
  return parseJson(StatementSchema, bytes, source, "release-boot's SLSA provenance");
}

function parseJson<T>(
  schema: v.GenericSchema<unknown, T>,
  bytes: Uint8Array,
  source: string,
  what: string,
): T {
  if (bytes.length > MAX_PROVENANCE_BYTES) {
    throw new ReleaseError(`${source} is over 1 MiB, so it is not ${what}`);
  }
  let data: unknown;
  try {
    data = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(bytes));
  } catch {
    throw new ReleaseError(`${source} is not JSON, so it is not ${what}`);
  }
  const result = v.safeParse(schema, data);
  if (!result.success) {
    throw new ReleaseError(`${source} is not ${what} (${firstIssue(result)})`);
  }
  return result.output;
}

function firstIssue(result: { issues: [v.BaseIssue<unknown>, ...v.BaseIssue<unknown>[]] }): string {
  return v.summarize(result.issues).split("\n").slice(0, 2).join(" ");
}

/** DSSE v1 PAE: "DSSEv1" SP len(type) SP type SP len(body) SP body, lengths in bytes. */
function preAuthEncoding(payloadType: string, payload: Uint8Array): Uint8Array<ArrayBuffer> {
  const type = new TextEncoder().encode(payloadType);
  return concatBytes(
    new TextEncoder().encode(`DSSEv1 ${type.length} `),
    type,
    new TextEncoder().encode(` ${payload.length} `),
    payload,
  );
}

async function ed25519Verifies(
  publicKey: Uint8Array,
  data: Uint8Array<ArrayBuffer>,
  signature: Uint8Array,
): Promise<boolean> {
  if (publicKey.length !== 32) {
    throw new ReleaseError(`an Ed25519 public key is 32 bytes, not ${publicKey.length}`);
  }
  const key = await crypto.subtle.importKey(
    "raw",
    new Uint8Array(publicKey),
    { name: "Ed25519" },
    false,
    ["verify"],
  );
  return await crypto.subtle.verify("Ed25519", key, new Uint8Array(signature), data);
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

function sortedUnique(values: string[]): string[] {
  return [...new Set(values)].sort(compare);
}

/** Code-unit order, the same on every machine (localeCompare is not). */
function compare(a: string, b: string): number {
  return a < b ? -1 : a > b ? 1 : 0;
}

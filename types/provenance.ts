/**
 * provenance.intoto.json and provenance.intoto.jsonl: the SLSA v1 provenance of a release as
 * an in-toto Statement, bare or signed inside a DSSE envelope. The schemas describe exactly
 * what release-boot writes, and are how it reads the files back: a statement of another type
 * or build type is not one of its own and does not parse. docs/PROVENANCE.md explains the fields.
 */
import * as v from "valibot";

/** Written when no signing key is held: the statement, indented JSON. */
export const STATEMENT_NAME = "provenance.intoto.json";
/** Written when a signing key is held: the statement in a DSSE envelope, one JSON line. */
export const ENVELOPE_NAME = "provenance.intoto.jsonl";
export type ProvenanceName = typeof STATEMENT_NAME | typeof ENVELOPE_NAME;

export const STATEMENT_TYPE = "https://in-toto.io/Statement/v1";
export const SLSA_PROVENANCE_V1 = "https://slsa.dev/provenance/v1";
/** DSSE's payloadType for an in-toto statement; it is part of what the signature covers. */
export const IN_TOTO_PAYLOAD_TYPE = "application/vnd.in-toto+json";
/**
 * release-boot's build type, defined in docs/PROVENANCE.md. A name, not a download location:
 * release-boot has no single home to point at, and no one can register an `.invalid` host
 * (RFC 2606) to serve something else under this name.
 */
export const BUILD_TYPE = "https://release-boot.invalid/buildtypes/nix-flake/v1";

const Sha256Schema = v.pipe(v.string(), v.regex(/^[0-9a-f]{64}$/, "not a lowercase sha256"));
const TimestampSchema = v.pipe(v.string(), v.isoTimestamp("not an RFC 3339 time"));

/** in-toto DigestSet: algorithm -> digest; at least one. */
const DigestSetSchema = v.pipe(
  v.record(v.string(), v.string()),
  v.check((digests) => Object.keys(digests).length > 0, "an empty digest set"),
);

/** in-toto ResourceDescriptor, as release-boot fills it: a uri, a digest, or both. */
export const ResourceDescriptorSchema = v.pipe(
  v.object({
    name: v.string(),
    uri: v.optional(v.string()),
    digest: v.optional(DigestSetSchema),
    annotations: v.optional(v.record(v.string(), v.boolean())),
  }),
  v.check(
    (resource) => resource.uri !== undefined || resource.digest !== undefined,
    "a resource with neither uri nor digest",
  ),
);
export type ResourceDescriptor = v.InferOutput<typeof ResourceDescriptorSchema>;

/** A release file: its asset name and the sha256 SHA256SUMS gives it. */
export const SubjectSchema = v.object({
  name: v.pipe(v.string(), v.minLength(1)),
  digest: v.object({ sha256: Sha256Schema }),
});
export type Subject = v.InferOutput<typeof SubjectSchema>;

/** The CI workflow that ran release-boot, as Forgejo's GITHUB_WORKFLOW_REF names it. */
export const WorkflowSchema = v.object({
  /** `https://git.example.org/ops/runners` */
  repository: v.string(),
  /** `.forgejo/workflows/boot-images.yml` */
  path: v.string(),
  /** `refs/tags/boot-v1.2.0` */
  ref: v.string(),
});
export type Workflow = v.InferOutput<typeof WorkflowSchema>;

// Key order here is the order release-boot writes, so a statement read back renders the same.
export const StatementSchema = v.object({
  _type: v.literal(STATEMENT_TYPE),
  subject: v.pipe(v.array(SubjectSchema), v.minLength(1, "no subjects")),
  predicateType: v.literal(SLSA_PROVENANCE_V1),
  predicate: v.object({
    buildDefinition: v.object({
      buildType: v.literal(BUILD_TYPE),
      externalParameters: v.object({
        /** The flake reference a rebuild starts from, pinned to the release's commit. */
        flake: v.string(),
        /** `packages.<system>.<target>` of every target built, sorted. */
        attributes: v.pipe(v.array(v.string()), v.minLength(1, "no attributes")),
        workflow: v.optional(WorkflowSchema),
      }),
      internalParameters: v.object({
        nixVersion: v.string(),
        systems: v.array(v.string()),
      }),
      resolvedDependencies: v.array(ResourceDescriptorSchema),
    }),
    runDetails: v.object({
      builder: v.object({ id: v.pipe(v.string(), v.url("not a URI")) }),
      metadata: v.object({
        invocationId: v.pipe(v.string(), v.minLength(1)),
        startedOn: TimestampSchema,
        finishedOn: TimestampSchema,
      }),
    }),
  }),
});
export type Statement = v.InferOutput<typeof StatementSchema>;

/** Standard base64 with padding, as DSSE writers emit it; no whitespace, no URL alphabet. */
const Base64Schema = v.pipe(
  v.string(),
  v.regex(
    /^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$/,
    "not standard base64",
  ),
);

/** A DSSE envelope (github.com/secure-systems-lab/dsse, envelope.md). */
export const EnvelopeSchema = v.object({
  payload: Base64Schema,
  payloadType: v.string(),
  signatures: v.pipe(
    v.array(v.object({ keyid: v.optional(v.string()), sig: Base64Schema })),
    v.minLength(1, "no signatures"),
  ),
});
export type Envelope = v.InferOutput<typeof EnvelopeSchema>;

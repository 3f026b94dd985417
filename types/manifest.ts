/**
 * manifest.json: the record that ties every asset of a release to the commit, flake inputs
 * and nix derivation it came from. release-boot writes it and reads it back from a release
 * (to resume, to merge the assets of several jobs, and to verify downloads).
 */
import * as v from "valibot";
import { ENVELOPE_NAME, STATEMENT_NAME } from "./provenance.ts";

const Sha256Schema = v.pipe(v.string(), v.regex(/^[0-9a-f]{64}$/));

/**
 * A plain file name: it becomes a download URL segment and, in `fetch`, a file under --out,
 * so a name from a server must never carry a path.
 */
export const ASSET_NAME = /^[A-Za-z0-9][A-Za-z0-9._+=-]*$/;
export const AssetNameSchema = v.pipe(v.string(), v.regex(ASSET_NAME, "not a plain file name"));

export const ManifestAssetSchema = v.object({
  name: AssetNameSchema,
  size: v.pipe(v.number(), v.integer(), v.minValue(0)),
  sha256: Sha256Schema,
  target: v.string(),
  system: v.string(),
  storePath: v.string(),
  /**
   * nix's narHash of the store path holding storePath, when it was hashed (absent before
   * release-boot recorded it). A rerun whose file has the same store path and narHash reuses
   * sha256 instead of reading the file again.
   */
  narHash: v.optional(v.string()),
  drvPath: v.string(),
});
export type ManifestAsset = v.InferOutput<typeof ManifestAssetSchema>;

export const FlakeInputSchema = v.object({
  type: v.string(),
  url: v.optional(v.string()),
  rev: v.optional(v.string()),
  narHash: v.optional(v.string()),
  lastModified: v.optional(v.number()),
});
export type FlakeInput = v.InferOutput<typeof FlakeInputSchema>;

export const ManifestSchema = v.object({
  schema: v.literal(1),
  tag: v.string(),
  commit: v.string(),
  flake: v.object({
    ref: v.string(),
    url: v.string(),
    revision: v.optional(v.string()),
    narHash: v.optional(v.string()),
    /** True when every input is locked (a flake with no inputs is locked by definition). */
    locked: v.boolean(),
    /** True when the flake is a git checkout with uncommitted changes. */
    dirty: v.boolean(),
    inputs: v.record(v.string(), FlakeInputSchema),
  }),
  nixVersion: v.string(),
  ciRun: v.optional(v.string()),
  createdAt: v.string(),
  assets: v.array(ManifestAssetSchema),
});
export type Manifest = v.InferOutput<typeof ManifestSchema>;

/**
 * The release's index: SHA256SUMS, its signature, manifest.json and the provenance
 * (types/provenance.ts), never listed in itself and never a subject of the provenance.
 */
export const SUMS_NAME = "SHA256SUMS";
export const SIGNATURE_NAME = `${SUMS_NAME}.sig`;
export const MANIFEST_NAME = "manifest.json";
export const INDEX_NAMES: ReadonlySet<string> = new Set([
  SUMS_NAME,
  SIGNATURE_NAME,
  MANIFEST_NAME,
  STATEMENT_NAME,
  ENVELOPE_NAME,
]);

/**
 * The JSON that nix prints and release-boot reads, as valibot schemas with inferred types.
 * Only the fields the script uses are modelled: `v.object` drops the rest, so a newer nix
 * that adds fields still parses.
 */
import * as v from "valibot";

const StorePathSchema = v.pipe(v.string(), v.startsWith("/"));

/** One entry of `nix build --json --no-link`: the same shape from nix 2.8 to current. */
export const BuildResultSchema = v.object({
  drvPath: StorePathSchema,
  outputs: v.object({ out: StorePathSchema }),
});
export type BuildResult = v.InferOutput<typeof BuildResultSchema>;

export const BuildResultsSchema = v.array(BuildResultSchema);

/** `nix eval --json <flake>#packages.<system> --apply builtins.attrNames`. */
export const AttrNamesSchema = v.array(v.string());

/** `nix eval --json ... --apply` mapping target names to their output paths. */
export const OutPathsSchema = v.record(v.string(), StorePathSchema);

/** A node of flake.lock as `nix flake metadata --json` reports it under `locks.nodes`. */
export const LockNodeSchema = v.object({
  inputs: v.optional(v.record(v.string(), v.union([v.string(), v.array(v.string())]))),
  locked: v.optional(
    v.object({
      type: v.string(),
      owner: v.optional(v.string()),
      repo: v.optional(v.string()),
      url: v.optional(v.string()),
      path: v.optional(v.string()),
      ref: v.optional(v.string()),
      rev: v.optional(v.string()),
      narHash: v.optional(v.string()),
      lastModified: v.optional(v.number()),
    }),
  ),
  original: v.optional(v.record(v.string(), v.unknown())),
});
export type LockNode = v.InferOutput<typeof LockNodeSchema>;

/** `nix flake metadata --json <ref>`; `revision` is present only for a clean git checkout. */
export const FlakeMetadataSchema = v.object({
  url: v.string(),
  originalUrl: v.optional(v.string()),
  resolvedUrl: v.optional(v.string()),
  revision: v.optional(v.string()),
  dirtyRevision: v.optional(v.string()),
  locked: v.object({
    type: v.string(),
    narHash: v.optional(v.string()),
    rev: v.optional(v.string()),
    dirtyRev: v.optional(v.string()),
  }),
  locks: v.object({
    root: v.string(),
    nodes: v.record(v.string(), LockNodeSchema),
  }),
});
export type FlakeMetadata = v.InferOutput<typeof FlakeMetadataSchema>;

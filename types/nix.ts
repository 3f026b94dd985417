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

/** `nix eval --json <flake>#packages.<system> --apply` listing the names, and builtins.nixVersion. */
export const TargetListingSchema = v.object({
  names: v.array(v.string()),
  nixVersion: v.pipe(v.string(), v.regex(/^\d+\.\d+\S*$/, "a nix version such as 2.8.0")),
});

/** `nix eval --json ... --apply` mapping target names to their output paths. */
export const OutPathsSchema = v.record(v.string(), StorePathSchema);

/**
 * `nix path-info --json PATH...`: nix's database record of each store path, read without
 * reading the path's files. Nix 2.8 to 2.18 print a list of `{path, narHash}` (`valid: false`
 * and no narHash for a path it does not hold); later versions an object keyed by path, with
 * null for such a path. Either way it becomes narHash by store path.
 */
export const PathInfoSchema = v.pipe(
  v.union([
    v.array(v.object({ path: StorePathSchema, narHash: v.optional(v.string()) })),
    v.record(StorePathSchema, v.nullable(v.object({ narHash: v.optional(v.string()) }))),
  ]),
  v.transform((info) =>
    new Map(
      (Array.isArray(info)
        ? info.map((entry) => [entry.path, entry.narHash] as const)
        : Object.entries(info).map(([path, entry]) => [path, entry?.narHash] as const))
        .filter((entry): entry is readonly [string, string] => entry[1] !== undefined),
    )
  ),
);

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

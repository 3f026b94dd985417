/**
 * The parts of Forgejo's REST API (v1) that release-boot reads and writes, as valibot schemas
 * named after the definitions in Forgejo's OpenAPI document. Only the fields the script uses
 * are modelled: `v.object` drops the rest, so newer servers that add fields still parse.
 */
import * as v from "valibot";

/** `GET /api/v1/version`: every Forgejo (and Gitea) answers this without a token. */
export const ServerVersionSchema = v.object({ version: v.string() });
export type ServerVersion = v.InferOutput<typeof ServerVersionSchema>;

/** Error bodies: `{"message": "...", "url": "..."}`. A proxy in front may send HTML instead. */
export const APIErrorSchema = v.object({
  message: v.optional(v.string()),
  url: v.optional(v.string()),
});
export type APIError = v.InferOutput<typeof APIErrorSchema>;

/** A value from the server, quoted and cut short, for a message naming what is wrong with it. */
function quoted(value: unknown): string {
  const text = JSON.stringify(value) ?? String(value);
  return text.length > 80 ? `${text.slice(0, 77)}...` : text;
}

/**
 * An absolute http(s) URL: a client is sent there (a download, a flake to rebuild, the release
 * page), so an empty, relative or other-scheme value is refused where it is read.
 */
function httpUrl(field: string) {
  return v.pipe(
    v.string(),
    v.check(
      (text) => URL.canParse(text) && /^https?:$/.test(new URL(text).protocol),
      (issue) => `${field} ${quoted(issue.input)} is not an absolute http(s) URL`,
    ),
  );
}

export const PermissionSchema = v.object({
  push: v.optional(v.boolean()),
});

/** `GET /repos/{owner}/{repo}`. */
export const RepositorySchema = v.object({
  full_name: v.string(),
  html_url: httpUrl("the repository's html_url"),
  permissions: v.optional(PermissionSchema),
});
export type Repository = v.InferOutput<typeof RepositorySchema>;

/** `GET /repos/{owner}/{repo}/tags/{tag}`. */
export const TagSchema = v.object({
  name: v.string(),
  commit: v.object({ sha: v.string() }),
});
export type Tag = v.InferOutput<typeof TagSchema>;

/** `GET /repos/{owner}/{repo}/tags`: one page of them. */
export const TagListSchema = v.array(TagSchema);

/** A release asset. `size` is the number of bytes the server stored. */
export const AttachmentSchema = v.object({
  id: v.number(),
  name: v.string(),
  size: v.number(),
  /** Names the download `/attachments/<uuid>`, so it must be a UUID and nothing else. */
  uuid: v.optional(
    v.pipe(v.string(), v.uuid((issue) => `an asset's uuid ${quoted(issue.input)} is not a UUID`)),
  ),
  browser_download_url: httpUrl("an asset's browser_download_url"),
  type: v.optional(v.picklist(["attachment", "external"])),
  /** When the upload finished (RFC 3339); prune dates a draft by its newest upload. */
  created_at: v.optional(v.string()),
});
export type Attachment = v.InferOutput<typeof AttachmentSchema>;

export const AttachmentListSchema = v.array(AttachmentSchema);

export const ReleaseSchema = v.object({
  id: v.number(),
  tag_name: v.string(),
  target_commitish: v.string(),
  name: v.string(),
  body: v.string(),
  html_url: httpUrl("the release's html_url"),
  draft: v.boolean(),
  prerelease: v.boolean(),
  assets: v.array(AttachmentSchema),
  /** RFC 3339 date-times; prune dates a release by the newest of these and its uploads. */
  created_at: v.optional(v.string()),
  published_at: v.optional(v.string()),
});
export type Release = v.InferOutput<typeof ReleaseSchema>;

export const ReleaseListSchema = v.array(ReleaseSchema);

/** Body of `POST /repos/{owner}/{repo}/releases` (CreateReleaseOption). */
export const CreateReleaseOptionSchema = v.object({
  tag_name: v.pipe(v.string(), v.minLength(1)),
  target_commitish: v.string(),
  name: v.string(),
  body: v.string(),
  draft: v.boolean(),
  prerelease: v.boolean(),
});
export type CreateReleaseOption = v.InferOutput<typeof CreateReleaseOptionSchema>;

/** Body of `PATCH /repos/{owner}/{repo}/releases/{id}` (EditReleaseOption): only sent fields change. */
export const EditReleaseOptionSchema = v.partial(CreateReleaseOptionSchema);
export type EditReleaseOption = v.InferOutput<typeof EditReleaseOptionSchema>;

/**
 * A Forgejo release-API emulator on real loopback sockets, for release-boot's end-to-end
 * tests and benchmarks.
 *
 * It follows shared/forgejo/API-FACTS.md (what real Forgejo does) and, for field names and
 * declared statuses, Forgejo's OpenAPI document beside it. Two hosts are served: the
 * Forgejo origin (API and web download routes) and a second "storage" origin that stands
 * for object storage answering SERVE_DIRECT redirects, so tests can check that the token
 * never leaves the Forgejo origin.
 *
 * Run on its own for benchmarks and manual trials:
 *   deno run -A test/forgejo/emulator.ts [--port N] [--storage DIR] [--token T]
 * prints one JSON line {"url","storageUrl","token"} and serves until SIGINT or SIGTERM.
 */
import { Buffer } from "node:buffer";
import { createHmac, randomBytes, randomUUID } from "node:crypto";
import { once } from "node:events";
import { createReadStream, createWriteStream } from "node:fs";
import { mkdir, mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import {
  createServer,
  type IncomingHttpHeaders,
  type IncomingMessage,
  type Server,
  type ServerResponse,
  STATUS_CODES,
} from "node:http";
import type { AddressInfo } from "node:net";
import { tmpdir } from "node:os";
import { dirname, extname, join } from "node:path";
import { Readable, Transform } from "node:stream";
import { pipeline } from "node:stream/promises";
import { parseArgs } from "node:util";
import * as v from "valibot";

// ---------------------------------------------------------------------------------------
// Public API

export type Fault =
  /** Read N bytes of the request body (0 = none), then destroy the socket (no response). */
  | { kind: "reset"; afterBytes?: number }
  /** Answer this status without doing the work: JSON, or nginx's HTML page with `html`. */
  | { kind: "status"; status: number; html?: boolean; retryAfter?: number; message?: string }
  /** Accept and never answer (the socket is destroyed at close()). */
  | { kind: "hang" }
  /** Upload routes only: store the first keepBytes of the body and answer 201 (a broken proxy). */
  | { kind: "truncate"; keepBytes: number }
  /**
   * Do the work and send the normal status and headers at once, then the body a byte (or a
   * few) at a time at bytesPerSecond (default 1), until done or close(): only an overall
   * deadline catches it.
   */
  | { kind: "trickle"; bytesPerSecond?: number }
  /**
   * Answer 200 without doing the work, with `bytes` bytes of body generated as they are sent
   * (`[{"id":1},{"id":1},...`, never complete JSON); chunked, unless declareLength sends a
   * Content-Length up front. contentType defaults to Forgejo's JSON type.
   */
  | { kind: "huge"; bytes: number; contentType?: string; declareLength?: boolean }
  /** Upload routes only: store the whole upload like a success, then destroy the socket. */
  | { kind: "store-then-reset" }
  /** Answer status (default 302) with Location: location, without doing the work. */
  | { kind: "redirect"; location: string; status?: number }
  /** A lying server: answer `body()` as JSON with `status` (default 200), without the work. */
  | { kind: "answer"; body: () => unknown; status?: number }
  /** Do the work, then answer `edit(the JSON answer)` instead, with the same status. */
  | { kind: "edit"; edit: (answer: unknown) => unknown }
  /**
   * Do the work, but hold its answer until `run` has finished: someone else changes things
   * between this read and the caller's next request, which the caller cannot see.
   */
  | { kind: "then"; run: () => void | Promise<void> }
  /** Downloads only: serve the whole file followed by `bytes` more than it holds. */
  | { kind: "pad"; bytes: number };

export interface FaultRule {
  method?: string;
  /** A string matches as a substring of the path; a RegExp is tested against the path. */
  path: string | RegExp;
  /** Query parameters that must all match, e.g. `{ name: "x.iso" }` for one asset's upload. */
  query?: Record<string, string>;
  /** How many requests the rule hits before it is used up (default 1). */
  times?: number;
  /** How many matching requests it lets through untouched before it starts to hit (default 0). */
  after?: number;
  fault: Fault;
}

/** "no-scope" is a personal token of a user with write access but without write:repository. */
export type TokenAccess = "write" | "read" | "no-scope";

export interface EmulatorOptions {
  owner?: string;
  repo?: string;
  /** Private: 404 to anonymous callers. Public (default): anonymous reads are allowed. */
  private?: boolean;
  tokens?: Record<string, TokenAccess>;
  /** The /api/v1/version answer; behaviour that changed between versions follows it. */
  version?: string;
  /** Requests whose Content-Length exceeds it get nginx's HTML 413 (client_max_body_size). */
  proxyBodyLimit?: number;
  /** Once the stored bytes are past it, uploads get JSON 413 "quota exceeded". */
  quotaBytes?: number;
  /** Like [repository.release] ALLOWED_TYPES, e.g. [".iso", ".txt"]. */
  allowedTypes?: string[];
  /** Older servers: GET /releases/tags/{tag} answers 404 for drafts even to writers. */
  draftsHiddenFromTagLookup?: boolean;
  /** Downloads answer 303 to the storage host (object storage with SERVE_DIRECT). */
  serveDirect?: boolean;
  /** Where asset bytes are written (default: a temp dir removed at close()). */
  storageDir?: string;
  /** HEAD of the default branch "main". */
  defaultBranchSha?: string;
  /** Port of the Forgejo origin (default: any free port). The storage host takes another. */
  port?: number;
  /** The clock behind every time the emulator stamps (default: real time); see setNow(). */
  now?: () => Date;
  /**
   * A server that ignores ?page=: GET /releases answers the first page whatever is asked,
   * with X-Total-Count and Link headers as if it had served the page asked for.
   */
  ignorePaging?: boolean;
}

export interface RecordedRequest {
  host: "forgejo" | "storage";
  method: string;
  /** The path as sent (still percent-encoded), without the query. */
  path: string;
  query: Record<string, string>;
  /** Lowercased names; the authorization header is kept so tests can see where a token went. */
  headers: Record<string, string>;
  /** Request body bytes the server read (bodies it refused unread count 0). */
  bodyBytes: number;
  /** 0 if no response was sent. */
  status: number;
  /** Body bytes of a served file (a download) handed to the connection so far. */
  sentBytes: number;
  /** When the request arrived and when its exchange closed (answered or not), in epoch ms. */
  receivedAt: number;
  closedAt?: number;
}

export interface Emulator {
  /** "http://127.0.0.1:PORT", no trailing slash: ROOT_URL without its trailing slash. */
  url: string;
  /** The object-storage host that SERVE_DIRECT downloads redirect to. */
  storageUrl: string;
  /** Every request to either host, in arrival order. */
  requests: RecordedRequest[];
  addFault(rule: FaultRule): void;
  /** A commit that target_commitish may name. */
  addCommit(sha: string): void;
  /** A git tag that exists without a release. */
  addTag(name: string, sha: string): void;
  /** Tag name -> commit sha. */
  tags(): Record<string, string>;
  /** Current Release JSON objects (with assets), newest first, as a writer sees them. */
  releases(): unknown[];
  /** Stored bytes of each asset with that name, oldest first (duplicates are allowed). */
  assetBytes(releaseId: number, name: string): Promise<Uint8Array[]>;
  /**
   * Stops the clock at `date` for every created_at, published_at and commit time stamped
   * from now on; without a date the clock the emulator started with (options.now or real
   * time) runs again. Times already stamped stay as they are.
   */
  setNow(date?: Date): void;
  /** Moves the default branch "main" to a commit (added if new): a push since the build. */
  setDefaultBranchHead(sha: string): void;
  /**
   * A compromised storage bucket: replaces the stored bytes of every file asset with that
   * name in the release, and their size, behind the API's back. Throws if there is none.
   */
  tamper(releaseId: number, name: string, bytes: Uint8Array): Promise<void>;
  close(): Promise<void>;
}

/** The API routes the emulator serves, as method and OpenAPI path (relative to /api/v1). */
export function servedApiRoutes(): { method: string; path: string }[] {
  return API_ROUTES.map(({ method, path }) => ({ method, path }));
}

export async function startForgejo(options: EmulatorOptions = {}): Promise<Emulator> {
  const ownsStorageDir = options.storageDir === undefined;
  const storageDir = options.storageDir ?? await mkdtemp(join(tmpdir(), "forgejo-emulator-"));
  const startClock = options.now ?? (() => new Date());
  const forgejo = new Forgejo(resolveSettings(options), storageDir, startClock);
  const forgejoServer = createServer((req, res) => serve(forgejo, "forgejo", req, res));
  const storageServer = createServer((req, res) => serve(forgejo, "storage", req, res));
  forgejo.url = await listen(forgejoServer, options.port ?? 0);
  forgejo.storageUrl = await listen(storageServer, 0);

  return {
    url: forgejo.url,
    storageUrl: forgejo.storageUrl,
    requests: forgejo.requests,
    addFault: (rule) => {
      checkFault(rule.fault);
      forgejo.faults.push({ rule, left: rule.times ?? 1, pass: rule.after ?? 0 });
    },
    addCommit: (sha) => forgejo.addCommit(sha),
    addTag: (name, sha) => {
      forgejo.addCommit(sha);
      forgejo.gitTags.set(name, sha.toLowerCase());
    },
    tags: () => Object.fromEntries(forgejo.gitTags),
    releases: () => forgejo.releasesNewestFirst().map((rel) => releaseJson(forgejo, rel)),
    assetBytes: (releaseId, name) => readAssetBytes(forgejo, releaseId, name),
    setNow: (date) => {
      const frozen = date && new Date(date.getTime());
      forgejo.clock = frozen ? () => frozen : startClock;
    },
    setDefaultBranchHead: (sha) => {
      forgejo.addCommit(sha);
      forgejo.branchHead = sha.toLowerCase();
    },
    tamper: (releaseId, name, bytes) => tamperAsset(forgejo, releaseId, name, bytes),
    close: async () => {
      await Promise.all([stopServer(forgejoServer), stopServer(storageServer)]);
      if (ownsStorageDir) await rm(storageDir, { recursive: true, force: true });
    },
  };
}

// ---------------------------------------------------------------------------------------
// Settings and state

const DEFAULT_BRANCH = "main";
const DEFAULT_BRANCH_SHA = "3f786850e387550fdab836ed7e6dc881de23001b";
const DEFAULT_VERSION = "11.0.15+gitea-1.22.0";
const DEFAULT_TOKEN = "test-token";
const PAGE_SIZE_DEFAULT = 30;
const PAGE_SIZE_MAX = 50;
const STORAGE_BUCKET = "forgejo";
/** Go's net/http reads at most this much of a form-encoded body in ParseForm. */
const GO_MAX_FORM_BYTES = 10 * 1024 * 1024;
/** nginx's lingering_time: how long it keeps reading a refused body before closing. */
const NGINX_LINGERING_MS = 30_000;

interface Settings {
  owner: string;
  repo: string;
  private: boolean;
  tokens: Record<string, TokenAccess>;
  version: string;
  proxyBodyLimit?: number;
  quotaBytes?: number;
  allowedTypes: string[];
  draftsHiddenFromTagLookup: boolean;
  serveDirect: boolean;
  defaultBranchSha: string;
  ignorePaging: boolean;
}

function resolveSettings(options: EmulatorOptions): Settings {
  return {
    owner: options.owner ?? "ops",
    repo: options.repo ?? "runners",
    private: options.private ?? false,
    tokens: options.tokens ?? { [DEFAULT_TOKEN]: "write" },
    version: options.version ?? DEFAULT_VERSION,
    proxyBodyLimit: options.proxyBodyLimit,
    quotaBytes: options.quotaBytes,
    allowedTypes: options.allowedTypes ?? [],
    draftsHiddenFromTagLookup: options.draftsHiddenFromTagLookup ?? false,
    serveDirect: options.serveDirect ?? false,
    defaultBranchSha: (options.defaultBranchSha ?? DEFAULT_BRANCH_SHA).toLowerCase(),
    ignorePaging: options.ignorePaging ?? false,
  };
}

interface ReleaseRow {
  id: number;
  tagName: string;
  target: string;
  name: string;
  body: string;
  draft: boolean;
  prerelease: boolean;
  hideArchiveLinks: boolean;
  createdAt: string;
  publishedAt: string;
}

interface AssetRow {
  id: number;
  uuid: string;
  releaseId: number;
  name: string;
  size: number;
  downloadCount: number;
  createdAt: string;
  /** Absent for external (link) assets. */
  file?: string;
  externalUrl?: string;
}

type Access = TokenAccess | "anonymous";

/** The emulated instance: one repository, its git refs, releases and stored files. */
class Forgejo {
  url = "";
  storageUrl = "";
  readonly requests: RecordedRequest[] = [];
  readonly faults: { rule: FaultRule; left: number; pass: number }[] = [];
  readonly commits = new Map<string, string>(); // sha -> commit time
  readonly gitTags = new Map<string, string>(); // tag -> sha
  readonly releaseRows = new Map<number, ReleaseRow>();
  readonly assetRows = new Map<number, AssetRow>();
  readonly signingKey = randomBytes(32);
  storedBytes = 0;
  private nextReleaseId = 1;
  // Attachment ids start elsewhere than release ids so that a client mixing them up fails.
  private nextAssetId = 101;

  /** HEAD of the default branch; setDefaultBranchHead() moves it. */
  branchHead: string;

  constructor(
    readonly settings: Settings,
    readonly storageDir: string,
    public clock: () => Date,
  ) {
    this.branchHead = settings.defaultBranchSha;
    this.addCommit(settings.defaultBranchSha);
  }

  /** The clock's time as Forgejo stores (whole seconds) and renders it (RFC 3339). */
  now(): string {
    return rfc3339Seconds(this.clock());
  }

  get repoHtmlUrl(): string {
    return `${this.url}/${this.settings.owner}/${this.settings.repo}`;
  }

  get repoApiUrl(): string {
    return `${this.url}/api/v1/repos/${this.settings.owner}/${this.settings.repo}`;
  }

  /** Forgejo puts setting.API.SwaggerURL in the "url" field of every API error. */
  get swaggerUrl(): string {
    return `${this.url}/api/swagger`;
  }

  addCommit(sha: string): void {
    const key = sha.toLowerCase();
    if (!this.commits.has(key)) this.commits.set(key, this.now());
  }

  /** Resolves a target_commitish like git does: branch, tag, full or abbreviated sha. */
  resolveCommit(ref: string): string | undefined {
    if (ref === DEFAULT_BRANCH) return this.branchHead;
    const tagged = this.gitTags.get(ref);
    if (tagged) return tagged;
    const sha = ref.toLowerCase();
    if (this.commits.has(sha)) return sha;
    if (!/^[0-9a-f]{4,39}$/.test(sha)) return undefined;
    const candidates = [...this.commits.keys()].filter((commit) => commit.startsWith(sha));
    return candidates.length === 1 ? candidates[0] : undefined;
  }

  /** Forgejo looks releases up by lower_tag_name. */
  releaseByTag(tag: string): ReleaseRow | undefined {
    const lower = tag.toLowerCase();
    return [...this.releaseRows.values()].find((rel) => rel.tagName.toLowerCase() === lower);
  }

  /** A tag without a release is a tag-only release row, also found by lower_tag_name. */
  tagIgnoringCase(tag: string): { name: string; sha: string } | undefined {
    const lower = tag.toLowerCase();
    for (const [name, sha] of this.gitTags) {
      if (name.toLowerCase() === lower) return { name, sha };
    }
    return undefined;
  }

  releasesNewestFirst(): ReleaseRow[] {
    // API-FACTS is silent on ties: Forgejo orders by created_unix then id, both descending.
    // created_unix follows the settable clock and publishing resets it, so it can disagree
    // with id order. RFC 3339 times in whole seconds compare as strings.
    return [...this.releaseRows.values()].sort((a, b) =>
      a.createdAt !== b.createdAt ? (a.createdAt < b.createdAt ? 1 : -1) : b.id - a.id
    );
  }

  insertRelease(fields: Omit<ReleaseRow, "id">): ReleaseRow {
    const rel = { id: this.nextReleaseId++, ...fields };
    this.releaseRows.set(rel.id, rel);
    return rel;
  }

  /** The release's assets ordered by name, as the API lists them. */
  assetsOf(releaseId: number): AssetRow[] {
    // API-FACTS is silent on the order of duplicate names: oldest first.
    return [...this.assetRows.values()]
      .filter((asset) => asset.releaseId === releaseId)
      .sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : a.id - b.id));
  }

  insertAsset(fields: Omit<AssetRow, "id" | "downloadCount" | "createdAt">): AssetRow {
    const asset = { id: this.nextAssetId++, downloadCount: 0, createdAt: this.now(), ...fields };
    this.assetRows.set(asset.id, asset);
    this.storedBytes += asset.size;
    return asset;
  }

  async deleteAsset(asset: AssetRow): Promise<void> {
    this.assetRows.delete(asset.id);
    this.storedBytes -= asset.size;
    if (asset.file) await rm(asset.file, { force: true });
  }

  /** Where an attachment's bytes live, laid out like Forgejo's attachments storage. */
  attachmentPath(uuid: string): string {
    return join(this.storageDir, attachmentKey(uuid));
  }

  /** Forgejo's quota allows an upload while usage is at most the limit (rule.Evaluate). */
  quotaExceeded(): boolean {
    // API-FACTS is silent on when: Forgejo checks usage before the upload (it cannot know
    // the size yet), so the upload that crosses the quota lands and the next one gets 413.
    const quota = this.settings.quotaBytes;
    return quota !== undefined && this.storedBytes > quota;
  }

  /** [repository.release] ALLOWED_TYPES, checked like Forgejo's upload.Verify. */
  typeAllowed(name: string): boolean {
    const allowed = this.settings.allowedTypes.map((type) => type.trim().toLowerCase());
    if (allowed.length === 0 || allowed.includes("*/*")) return true;
    // API-FACTS is silent on sniffing: only extension entries are honoured; MIME entries
    // (matched against sniffed content by Forgejo) never match here.
    return allowed.includes(extname(name).toLowerCase());
  }

  /** Messages and defaults that changed between Forgejo versions follow `version`. */
  versionAtLeast(major: number, minor: number, patch: number): boolean {
    const found = this.settings.version.match(/^(\d+)\.(\d+)\.(\d+)/);
    // API-FACTS is silent on odd version strings: they are taken for the newest server.
    if (!found) return true;
    const [a, b, c] = found.slice(1).map(Number);
    return a !== major ? a > major : b !== minor ? b > minor : c >= patch;
  }

  releaseExistsMessage(): string {
    // API-FACTS is silent on which versions between v11 and v15 carry the fixed wording.
    return this.versionAtLeast(12, 0, 0) ? "Release has no Tag" : "Release is has no Tag";
  }
}

// ---------------------------------------------------------------------------------------
// JSON as Forgejo renders it

function releaseJson(f: Forgejo, rel: ReleaseRow) {
  const assets = f.assetsOf(rel.id);
  const namesUnique = new Set(assets.map((asset) => asset.name)).size === assets.length;
  const tagPath = goPathEscapeSegments(rel.tagName);
  return {
    id: rel.id,
    tag_name: rel.tagName,
    target_commitish: rel.target,
    name: rel.name,
    body: rel.body,
    url: `${f.repoApiUrl}/releases/${rel.id}`,
    html_url: `${f.repoHtmlUrl}/releases/tag/${tagPath}`,
    tarball_url: `${f.repoHtmlUrl}/archive/${tagPath}.tar.gz`,
    zipball_url: `${f.repoHtmlUrl}/archive/${tagPath}.zip`,
    hide_archive_links: rel.hideArchiveLinks,
    upload_url: `${f.repoApiUrl}/releases/${rel.id}/assets`,
    draft: rel.draft,
    prerelease: rel.prerelease,
    created_at: rel.createdAt,
    published_at: rel.publishedAt,
    author: actionsUserJson(f),
    assets: assets.map((asset) => attachmentJson(f, rel, asset, namesUnique ? "name" : "uuid")),
    archive_download_count: { zip: 0, tar_gz: 0 },
  };
}

/** `name` links by tag and file name; the upload response and duplicates link by uuid. */
function attachmentJson(f: Forgejo, rel: ReleaseRow, asset: AssetRow, link: "name" | "uuid") {
  return {
    id: asset.id,
    name: asset.name,
    size: asset.size,
    download_count: asset.downloadCount,
    created_at: asset.createdAt,
    uuid: asset.uuid,
    browser_download_url: downloadUrl(f, rel, asset, link),
    type: asset.externalUrl === undefined ? "attachment" : "external",
  };
}

function downloadUrl(f: Forgejo, rel: ReleaseRow, asset: AssetRow, link: "name" | "uuid") {
  // API-FACTS is silent on link assets' URL: Forgejo gives the external URL itself.
  if (asset.externalUrl !== undefined) return asset.externalUrl;
  if (link === "uuid") return `${f.url}/attachments/${asset.uuid}`;
  const tag = goPathEscapeSegments(rel.tagName);
  return `${f.repoHtmlUrl}/releases/download/${tag}/${goPathEscape(asset.name)}`;
}

function tagJson(f: Forgejo, name: string, sha: string) {
  const path = goPathEscapeSegments(name);
  return {
    name,
    // API-FACTS is silent: commits here carry no message, so lightweight tags have none.
    message: "",
    id: sha, // a lightweight tag's id is its commit's
    commit: {
      url: `${f.repoApiUrl}/git/commits/${sha}`,
      sha,
      created: f.commits.get(sha) ?? f.now(),
    },
    zipball_url: `${f.repoHtmlUrl}/archive/${path}.zip`,
    tarball_url: `${f.repoHtmlUrl}/archive/${path}.tar.gz`,
    archive_download_count: { zip: 0, tar_gz: 0 },
  };
}

function repositoryJson(f: Forgejo, access: Access) {
  const { owner, repo } = f.settings;
  const published = [...f.releaseRows.values()].filter((rel) => !rel.draft).length;
  return {
    id: 1,
    owner: userJson(f, 1, owner),
    name: repo,
    full_name: `${owner}/${repo}`,
    description: "",
    empty: false,
    private: f.settings.private,
    fork: false,
    template: false,
    mirror: false,
    size: Math.ceil(f.storedBytes / 1024),
    html_url: f.repoHtmlUrl,
    url: f.repoApiUrl,
    link: "",
    ssh_url: `ssh://git@127.0.0.1/${owner}/${repo}.git`,
    clone_url: `${f.repoHtmlUrl}.git`,
    original_url: "",
    website: "",
    stars_count: 0,
    forks_count: 0,
    watchers_count: 0,
    open_issues_count: 0,
    open_pr_counter: 0,
    release_counter: published,
    default_branch: DEFAULT_BRANCH,
    archived: false,
    created_at: EPOCH,
    updated_at: EPOCH,
    // API-FACTS is silent: permissions are the user's, not the token's scope, so a
    // no-scope personal token of a writer still reads push: true.
    permissions: { admin: false, push: canWrite(access), pull: true },
    has_releases: true,
    has_actions: true,
    object_format_name: "sha1",
    avatar_url: "",
    internal: false,
  };
}

/** Writes are made with the workflow token, whose doer is Forgejo's built-in actions user. */
function actionsUserJson(f: Forgejo) {
  // API-FACTS is silent on the author: every writer token acts as "forgejo-actions" (-2).
  return userJson(f, -2, "forgejo-actions");
}

function userJson(f: Forgejo, id: number, login: string) {
  return {
    id,
    login,
    login_name: "",
    source_id: 0,
    full_name: "",
    email: `${login}@noreply.127.0.0.1`,
    avatar_url: `${f.url}/assets/img/avatar_default.png`,
    html_url: `${f.url}/${login}`,
    language: "",
    is_admin: false,
    last_login: GO_ZERO_TIME,
    created: EPOCH,
    restricted: false,
    active: true,
    prohibit_login: false,
    location: "",
    pronouns: "",
    website: "",
    description: "",
    visibility: "public",
    followers_count: 0,
    following_count: 0,
    starred_repos_count: 0,
  };
}

const EPOCH = "2024-01-01T00:00:00Z";
const GO_ZERO_TIME = "0001-01-01T00:00:00Z";

/** Forgejo stores times in whole seconds and renders them RFC 3339. */
function rfc3339Seconds(date: Date): string {
  return new Date(Math.floor(date.getTime() / 1000) * 1000).toISOString().replace(".000Z", "Z");
}

/** Go's url.PathEscape: like encodeURIComponent, but keeps $&+:=@ and escapes !'()*. */
function goPathEscape(segment: string): string {
  return encodeURIComponent(segment)
    .replace(/%(24|26|2B|3A|3D|40)/g, (escaped) => decodeURIComponent(escaped))
    .replace(/[!'()*]/g, (c) => `%${c.charCodeAt(0).toString(16).toUpperCase()}`);
}

/** Forgejo's util.PathEscapeSegments: escapes each "/"-separated part of a tag. */
function goPathEscapeSegments(path: string): string {
  return path.split("/").map(goPathEscape).join("/");
}

function attachmentKey(uuid: string): string {
  return `attachments/${uuid[0]}/${uuid[1]}/${uuid}`;
}

// ---------------------------------------------------------------------------------------
// HTTP plumbing

interface Exchange {
  req: IncomingMessage;
  res: ServerResponse;
  record: RecordedRequest;
  url: URL;
  access: Access;
  /** Set by a truncate fault for the upload handler. */
  keepBytes?: number;
  /** Set by a trickle fault: the body goes out at this pace. */
  trickleBytesPerSecond?: number;
  /** Set by a store-then-reset fault: the upload is stored and the socket destroyed. */
  resetAfterStore?: boolean;
  /** Set by an edit fault: what the JSON answer becomes. */
  editJson?: (answer: unknown) => unknown;
  /** Set by a pad fault: bytes served after a downloaded file's own. */
  padBytes?: number;
}

async function serve(
  f: Forgejo,
  host: RecordedRequest["host"],
  req: IncomingMessage,
  res: ServerResponse,
): Promise<void> {
  const ex = beginExchange(f, host, req, res);
  // A client that goes away mid-body makes the request stream error; handlers see it.
  req.on("error", () => {});
  try {
    if (applyFault(f, ex, takeFault(f, ex))) return;
    if (host === "storage") return await serveStorage(f, ex);
    if (rejectOversizedBody(ex, f.settings.proxyBodyLimit)) return;
    if (ex.url.pathname.startsWith("/api/v1/")) return await serveApi(f, ex);
    return await serveWeb(f, ex);
  } catch (error) {
    if (!res.headersSent) {
      return sendError(f, ex, 500, error instanceof Error ? error.message : String(error));
    }
    res.destroy();
  }
}

function beginExchange(
  f: Forgejo,
  host: RecordedRequest["host"],
  req: IncomingMessage,
  res: ServerResponse,
): Exchange {
  const url = new URL(req.url ?? "/", "http://127.0.0.1");
  const record: RecordedRequest = {
    host,
    method: req.method ?? "GET",
    path: url.pathname,
    query: Object.fromEntries(url.searchParams),
    headers: flattenHeaders(req.headers),
    bodyBytes: 0,
    status: 0,
    sentBytes: 0,
    receivedAt: epochMs(),
  };
  res.once("close", () => record.closedAt = epochMs());
  f.requests.push(record);
  return { req, res, record, url, access: "anonymous" };
}

/** Sub-millisecond, so that the overlap of two short requests shows. */
function epochMs(): number {
  return performance.timeOrigin + performance.now();
}

function flattenHeaders(headers: IncomingHttpHeaders): Record<string, string> {
  const flat: Record<string, string> = {};
  for (const [name, value] of Object.entries(headers)) {
    if (value !== undefined) flat[name] = Array.isArray(value) ? value.join(", ") : value;
  }
  return flat;
}

function writeHead(ex: Exchange, status: number, headers: Record<string, string | number>) {
  ex.record.status = status;
  ex.res.writeHead(status, headers);
}

function sendJson(
  ex: Exchange,
  status: number,
  value: unknown,
  headers: Record<string, string | number> = {},
): void {
  const body = JSON.stringify(ex.editJson ? ex.editJson(value) : value);
  writeHead(ex, status, {
    "content-type": "application/json;charset=utf-8",
    "content-length": Buffer.byteLength(body),
    ...headers,
  });
  endBody(ex, body);
}

/** Forgejo's API error body: {"message", "url"}. */
function sendError(f: Forgejo, ex: Exchange, status: number, message: string): void {
  sendJson(ex, status, { message, url: f.swaggerUrl });
}

function sendNotFound(f: Forgejo, ex: Exchange): void {
  sendError(f, ex, 404, "The target couldn't be found.");
}

function sendText(
  ex: Exchange,
  status: number,
  contentType: string,
  text: string,
  headers: Record<string, string | number> = {},
): void {
  writeHead(ex, status, {
    "content-type": contentType,
    "content-length": Buffer.byteLength(text),
    ...headers,
  });
  endBody(ex, text);
}

/** Sends the whole body, or drips it out under a trickle fault. */
function endBody(ex: Exchange, body: string): void {
  const rate = ex.trickleBytesPerSecond;
  if (rate === undefined || body === "") return void ex.res.end(body);
  pipeline(Readable.from([Buffer.from(body)]), trickleStream(rate), ex.res).catch(() => {
    // the client stopped listening, or close() destroyed the socket
  });
}

function sendNoContent(ex: Exchange): void {
  writeHead(ex, 204, {});
  ex.res.end();
}

async function readBody(ex: Exchange): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const chunk of ex.req) {
    chunks.push(chunk);
    ex.record.bodyBytes += chunk.length;
  }
  return Buffer.concat(chunks);
}

/** nginx's HTML error page, as a proxy in front of Forgejo answers. */
function nginxPage(status: number): string {
  const title = `${status} ${NGINX_REASONS[status] ?? STATUS_CODES[status] ?? "Error"}`;
  return `<html>\r\n<head><title>${title}</title></head>\r\n<body>\r\n` +
    `<center><h1>${title}</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n`;
}

const NGINX_REASONS: Record<number, string> = {
  413: "Request Entity Too Large",
  502: "Bad Gateway",
  503: "Service Temporarily Unavailable",
  504: "Gateway Time-out",
};

/**
 * client_max_body_size: nginx answers 413 from the Content-Length alone and closes, but
 * keeps reading (discarding) the body for a while first so the client sees the answer.
 */
function rejectOversizedBody(ex: Exchange, limit: number | undefined): boolean {
  const length = Number(ex.req.headers["content-length"] ?? 0);
  if (limit === undefined || !(length > limit)) return false;
  // API-FACTS is silent on chunked bodies: only a declared Content-Length is checked.
  const page = nginxPage(413);
  writeHead(ex, 413, {
    "content-type": "text/html",
    "content-length": Buffer.byteLength(page),
    connection: "close",
  });
  ex.res.write(page);
  const giveUp = setTimeout(() => ex.res.destroy(), NGINX_LINGERING_MS);
  ex.req.on("close", () => clearTimeout(giveUp));
  ex.req.on("end", () => ex.res.end());
  ex.req.resume();
  return true;
}

// ---------------------------------------------------------------------------------------
// Faults

function takeFault(f: Forgejo, ex: Exchange): Fault | undefined {
  for (const entry of f.faults) {
    if (entry.left <= 0 || !faultMatches(entry.rule, ex)) continue;
    // A rule still letting requests through counts this one and leaves it to later rules.
    if (entry.pass > 0) {
      entry.pass--;
      continue;
    }
    entry.left--;
    return entry.rule.fault;
  }
  return undefined;
}

function faultMatches(rule: FaultRule, ex: Exchange): boolean {
  if (rule.method && rule.method.toUpperCase() !== ex.record.method) return false;
  // Faults about stored bytes only matter where bytes are stored, so they wait for an upload.
  const uploadOnly = rule.fault.kind === "truncate" || rule.fault.kind === "store-then-reset";
  if (uploadOnly && !isUpload(ex)) return false;
  const query = Object.entries(rule.query ?? {});
  if (query.some(([key, value]) => ex.url.searchParams.get(key) !== value)) return false;
  const path = ex.url.pathname;
  return typeof rule.path === "string" ? path.includes(rule.path) : rule.path.test(path);
}

function isUpload(ex: Exchange): boolean {
  return ex.record.method === "POST" &&
    /^\/api\/v1\/repos\/[^/]+\/[^/]+\/releases\/\d+\/assets$/.test(ex.url.pathname);
}

/** Carries out a fault; true when the request needs nothing more. */
function applyFault(f: Forgejo, ex: Exchange, fault: Fault | undefined): boolean {
  switch (fault?.kind) {
    case undefined:
      return false;
    case "reset":
      resetAfter(ex, fault.afterBytes ?? 0);
      return true;
    case "status":
      answerFaultStatus(f, ex, fault);
      return true;
    case "hang":
      return true; // stopServer() destroys the socket
    case "truncate":
      ex.keepBytes = fault.keepBytes;
      return false;
    case "trickle":
      ex.trickleBytesPerSecond = fault.bytesPerSecond ?? 1;
      return false;
    case "huge":
      sendHuge(ex, fault);
      return true;
    case "store-then-reset":
      ex.resetAfterStore = true;
      return false;
    case "redirect":
      // API-FACTS is silent: no API route redirects on a sound server; the answer is bare.
      sendText(ex, fault.status ?? 302, "text/plain", "", { location: fault.location });
      return true;
    case "answer":
      sendJson(ex, fault.status ?? 200, fault.body());
      return true;
    case "edit":
      ex.editJson = fault.edit;
      return false;
    case "then":
      holdAnswer(ex, fault.run);
      return false;
    case "pad":
      ex.padBytes = fault.bytes;
      return false;
  }
}

/** The answer's last write waits for `run`, so the caller reads the state from before it. */
function holdAnswer(ex: Exchange, run: () => void | Promise<void>): void {
  const end = ex.res.end.bind(ex.res) as (...args: unknown[]) => ServerResponse;
  ex.res.end = ((...args: unknown[]) => {
    // A failing `run` is the test's own bug: it surfaces as an unhandled rejection.
    Promise.resolve().then(run).finally(() => end(...args));
    return ex.res;
  }) as ServerResponse["end"];
}

/** Refuses fault settings that would make the emulator misbehave in ways nobody meant. */
function checkFault(fault: Fault): void {
  const bad = (what: string) => {
    throw new Error(`emulator fault "${fault.kind}": ${what}`);
  };
  if (fault.kind === "trickle" && fault.bytesPerSecond !== undefined) {
    if (!(fault.bytesPerSecond > 0)) bad("bytesPerSecond must be above 0");
  }
  if (
    (fault.kind === "huge" || fault.kind === "pad") &&
    !(Number.isSafeInteger(fault.bytes) && fault.bytes >= 0)
  ) {
    bad("bytes must be a whole number of bytes");
  }
  if (fault.kind === "redirect" && !URL.canParse(fault.location)) {
    bad("location must be an absolute URL");
  }
}

/** Passes the bytes on a few at a time (one at the default pace), paced to bytesPerSecond. */
function trickleStream(bytesPerSecond: number): Transform {
  const piece = Math.max(1, Math.floor(bytesPerSecond / 10));
  const pauseMs = (1000 * piece) / bytesPerSecond;
  let timer: ReturnType<typeof setTimeout> | undefined;
  return new Transform({
    transform(chunk: Buffer, _encoding, done) {
      let offset = 0;
      const next = () => {
        if (offset >= chunk.length) return done();
        this.push(chunk.subarray(offset, offset + piece));
        offset += piece;
        timer = setTimeout(next, pauseMs);
      };
      next();
    },
    destroy(error, callback) {
      clearTimeout(timer);
      callback(error);
    },
  });
}

/** A 200 whose body, `[{"id":1},{"id":1},...` cut at `bytes`, is made as it is sent. */
function sendHuge(ex: Exchange, fault: Extract<Fault, { kind: "huge" }>): void {
  const headers: Record<string, string | number> = {
    "content-type": fault.contentType ?? "application/json;charset=utf-8",
  };
  // Without a Content-Length, Node sends the body chunked.
  if (fault.declareLength) headers["content-length"] = fault.bytes;
  writeHead(ex, 200, headers);
  if (ex.record.method === "HEAD") return void ex.res.end();
  pipeline(Readable.from(hugeBody(fault.bytes)), ex.res).catch(() => {
    // the client stopped reading, as it should
  });
}

function* hugeBody(bytes: number): Generator<Buffer> {
  // 7282 repetitions of the 9-byte item make a 64 KiB block that the next block continues.
  const block = Buffer.from('{"id":1},'.repeat(7282));
  if (bytes <= 0) return;
  yield Buffer.from("[");
  for (let left = bytes - 1; left > 0; left -= block.length) {
    yield left >= block.length ? block : block.subarray(0, left);
  }
}

function resetAfter(ex: Exchange, afterBytes: number): void {
  const drop = () => {
    ex.req.pause();
    ex.req.socket.destroy();
  };
  if (afterBytes <= 0) return drop();
  const onData = (chunk: Buffer) => {
    ex.record.bodyBytes += chunk.length;
    if (ex.record.bodyBytes < afterBytes) return;
    ex.req.off("data", onData);
    drop();
  };
  ex.req.on("data", onData);
  ex.req.on("end", drop);
}

/** A status answered by Forgejo (JSON) or, with `html`, by the proxy in front of it. */
function answerFaultStatus(
  f: Forgejo,
  ex: Exchange,
  fault: Extract<Fault, { kind: "status" }>,
): void {
  const headers: Record<string, string> = {};
  if (fault.retryAfter !== undefined) headers["retry-after"] = String(fault.retryAfter);
  if (fault.html) return sendText(ex, fault.status, "text/html", nginxPage(fault.status), headers);
  const body = {
    message: fault.message ?? STATUS_CODES[fault.status] ?? "error",
    url: f.swaggerUrl,
  };
  sendJson(ex, fault.status, body, headers);
}

// ---------------------------------------------------------------------------------------
// Auth

/** The caller's access from `Authorization: token T` or `Bearer T`; undefined = bad token. */
function authenticate(f: Forgejo, ex: Exchange): Access | undefined {
  const header = ex.req.headers.authorization;
  if (header === undefined) return "anonymous";
  const token = header.match(/^(?:token|bearer)\s+(\S+)\s*$/i)?.[1];
  // API-FACTS is silent on other schemes (Basic): they are treated as bad credentials.
  return token === undefined ? undefined : f.settings.tokens[token];
}

/** Write access of the user behind the token; the token's scope is checked separately. */
function canWrite(access: Access): boolean {
  return access === "write" || access === "no-scope";
}

function canSeeRepo(f: Forgejo, access: Access): boolean {
  return !f.settings.private || access !== "anonymous";
}

function isThisRepo(f: Forgejo, owner: string, repo: string): boolean {
  // API-FACTS is silent: Forgejo matches owner and repository names case-insensitively.
  return owner.toLowerCase() === f.settings.owner.toLowerCase() &&
    repo.toLowerCase() === f.settings.repo.toLowerCase();
}

// ---------------------------------------------------------------------------------------
// API routes

type Params = Record<string, string>;
type Handler = (f: Forgejo, ex: Exchange, params: Params) => void | Promise<void>;

interface ApiRoute {
  method: string;
  /** OpenAPI path template relative to /api/v1. */
  path: string;
  write: boolean;
  handle: Handler;
  pattern: RegExp;
  names: string[];
}

function apiRoute(method: string, path: string, write: boolean, handle: Handler): ApiRoute {
  const names: string[] = [];
  const source = path.replace(/\{(\w+)\}/g, (_, name: string) => {
    names.push(name);
    return name === "id" || name === "attachment_id" ? "(\\d+)" : "([^/]+)";
  });
  return { method, path, write, handle, pattern: new RegExp(`^${source}$`), names };
}

const RELEASE = "/repos/{owner}/{repo}/releases/{id}";
const ASSET = `${RELEASE}/assets/{attachment_id}`;

const API_ROUTES: ApiRoute[] = [
  apiRoute("GET", "/version", false, getVersion),
  apiRoute("GET", "/repos/{owner}/{repo}", false, getRepository),
  apiRoute("GET", "/repos/{owner}/{repo}/releases", false, listReleases),
  apiRoute("POST", "/repos/{owner}/{repo}/releases", true, createRelease),
  apiRoute("GET", "/repos/{owner}/{repo}/releases/tags/{tag}", false, getReleaseByTag),
  apiRoute("DELETE", "/repos/{owner}/{repo}/releases/tags/{tag}", true, deleteReleaseByTag),
  apiRoute("GET", RELEASE, false, getRelease),
  apiRoute("PATCH", RELEASE, true, editRelease),
  apiRoute("DELETE", RELEASE, true, deleteRelease),
  apiRoute("GET", `${RELEASE}/assets`, false, listAssets),
  apiRoute("POST", `${RELEASE}/assets`, true, createAsset),
  apiRoute("GET", ASSET, false, getAsset),
  apiRoute("PATCH", ASSET, true, editAsset),
  apiRoute("DELETE", ASSET, true, deleteAsset),
  apiRoute("GET", "/repos/{owner}/{repo}/tags", false, listTags),
  apiRoute("GET", "/repos/{owner}/{repo}/tags/{tag}", false, getTag),
  apiRoute("DELETE", "/repos/{owner}/{repo}/tags/{tag}", true, deleteTag),
];

/**
 * Forgejo's middleware order: token check, route, token scope, repository lookup,
 * "token is required", write permission, then the handler.
 */
async function serveApi(f: Forgejo, ex: Exchange): Promise<void> {
  const access = authenticate(f, ex);
  // API-FACTS is silent on bad tokens on read routes: Forgejo's auth middleware answers
  // 401 on every API route, with this message.
  if (access === undefined) return sendError(f, ex, 401, "user does not exist [uid: 0, name: ]");
  ex.access = access;
  const match = matchApiRoute(ex.record.method, ex.url.pathname.slice("/api/v1".length));
  if (match === "wrong-method") return sendText(ex, 405, "text/plain", "");
  if (!match) return sendNotFound(f, ex);
  const { route, params } = match;
  if (params.owner !== undefined) {
    if (ex.record.method !== "GET" && access === "no-scope") {
      return sendError(
        f,
        ex,
        403,
        "token does not have at least one of required scope(s): [write:repository]",
      );
    }
    if (!isThisRepo(f, params.owner, params.repo) || !canSeeRepo(f, access)) {
      return sendNotFound(f, ex);
    }
  }
  if (route.write && access === "anonymous") return sendError(f, ex, 401, "token is required");
  if (route.write && !canWrite(access)) {
    return sendError(f, ex, 403, "user should have a permission to write to a repo");
  }
  await route.handle(f, ex, params);
}

function matchApiRoute(
  method: string,
  path: string,
): { route: ApiRoute; params: Params } | "wrong-method" | undefined {
  let pathKnown = false;
  for (const route of API_ROUTES) {
    const found = route.pattern.exec(path);
    if (!found) continue;
    pathKnown = true;
    if (route.method !== method) continue;
    const params: Params = {};
    route.names.forEach((name, i) => (params[name] = safeDecode(found[i + 1])));
    return { route, params };
  }
  return pathKnown ? "wrong-method" : undefined;
}

function safeDecode(segment: string): string {
  try {
    return decodeURIComponent(segment);
  } catch {
    return segment;
  }
}

function getVersion(f: Forgejo, ex: Exchange): void {
  sendJson(ex, 200, { version: f.settings.version });
}

function getRepository(f: Forgejo, ex: Exchange): void {
  sendJson(ex, 200, repositoryJson(f, ex.access));
}

function listReleases(f: Forgejo, ex: Exchange): void {
  const query = ex.url.searchParams;
  const draft = goOptionalBool(query.get("draft"));
  const prerelease = goOptionalBool(query.get("pre-release"));
  const includeDrafts = canWrite(ex.access);
  const matching = f.releasesNewestFirst().filter((rel) =>
    (includeDrafts || !rel.draft) &&
    (draft === undefined || rel.draft === draft) &&
    (prerelease === undefined || rel.prerelease === prerelease)
  );
  const { page, limit } = listOptions(query);
  // A server that ignores paging serves page 1 but still links as if it served `page`.
  const served = f.settings.ignorePaging ? 1 : page;
  const onPage = matching.slice((served - 1) * limit, served * limit);
  const headers: Record<string, string> = {
    "x-total-count": String(matching.length),
    "access-control-expose-headers": "X-Total-Count, Link",
  };
  const links = paginationLinks(f, ex.url, matching.length, limit, page);
  if (links.length > 0) headers.link = links.join(",");
  sendJson(ex, 200, onPage.map((rel) => releaseJson(f, rel)), headers);
}

/** Go's strconv.ParseBool; anything else means "no filter". */
function goOptionalBool(value: string | null): boolean | undefined {
  if (value === null) return undefined;
  if (["1", "t", "T", "true", "TRUE", "True"].includes(value)) return true;
  if (["0", "f", "F", "false", "FALSE", "False"].includes(value)) return false;
  return undefined;
}

function listOptions(query: URLSearchParams): { page: number; limit: number } {
  const page = Math.max(1, Math.trunc(Number(query.get("page"))) || 1);
  const asked = Math.trunc(Number(query.get("limit"))) || 0;
  const limit = asked <= 0 ? PAGE_SIZE_DEFAULT : Math.min(asked, PAGE_SIZE_MAX);
  return { page, limit };
}

/** Forgejo's Link header: next, last, first, prev, each only where it leads elsewhere. */
function paginationLinks(f: Forgejo, url: URL, total: number, limit: number, page: number) {
  // API-FACTS is silent on the Link header's form: this follows Forgejo's genAPILinks
  // (no header on a single page; query keys sorted like Go's url.Values.Encode).
  const pages = Math.max(1, Math.ceil(total / limit));
  const current = Math.min(page, pages);
  const link = (target: number, rel: string) => {
    const query = new URLSearchParams(url.searchParams);
    query.set("page", String(target));
    query.sort();
    return `<${f.url}${url.pathname}?${query}>; rel="${rel}"`;
  };
  const links: string[] = [];
  if (current < pages) links.push(link(current + 1, "next"));
  if (current !== pages) links.push(link(pages, "last"));
  if (current !== 1) links.push(link(1, "first"));
  if (current > 1) links.push(link(current - 1, "prev"));
  return links;
}

function getReleaseByTag(f: Forgejo, ex: Exchange, params: Params): void {
  const rel = f.releaseByTag(params.tag);
  const hidden = rel?.draft && (!canWrite(ex.access) || f.settings.draftsHiddenFromTagLookup);
  if (!rel || hidden) return sendNotFound(f, ex);
  sendJson(ex, 200, releaseJson(f, rel));
}

/** The release with that id, unless it is a draft and the caller cannot write. */
function visibleRelease(f: Forgejo, ex: Exchange, id: string): ReleaseRow | undefined {
  const rel = f.releaseRows.get(Number(id));
  if (!rel || (rel.draft && !canWrite(ex.access))) return undefined;
  return rel;
}

function getRelease(f: Forgejo, ex: Exchange, params: Params): void {
  const rel = visibleRelease(f, ex, params.id);
  if (!rel) return sendNotFound(f, ex);
  sendJson(ex, 200, releaseJson(f, rel));
}

const CreateReleaseOption = v.object({
  tag_name: v.nullish(v.string(), ""),
  target_commitish: v.nullish(v.string(), ""),
  name: v.nullish(v.string(), ""),
  body: v.nullish(v.string(), ""),
  draft: v.nullish(v.boolean(), false),
  prerelease: v.nullish(v.boolean(), false),
  hide_archive_links: v.nullish(v.boolean(), false),
});

async function createRelease(f: Forgejo, ex: Exchange): Promise<void> {
  const form = await readJsonOption(f, ex, CreateReleaseOption);
  if (!form) return;
  // API-FACTS is silent on the message: Forgejo's binding error names the Go field.
  if (form.tag_name === "") return sendError(f, ex, 422, "[TagName]: Required");
  if (f.releaseByTag(form.tag_name)) return sendError(f, ex, 409, f.releaseExistsMessage());

  const now = f.now();
  const name = form.name === "" && f.versionAtLeast(14, 0, 2) ? form.tag_name : form.name;
  const fields = {
    name,
    body: form.body,
    draft: form.draft,
    prerelease: form.prerelease,
    hideArchiveLinks: form.hide_archive_links,
    createdAt: now,
    publishedAt: now,
  };
  const existingTag = f.tagIgnoringCase(form.tag_name);
  if (existingTag) {
    // The tag-only release row becomes the release; its commit wins. API-FACTS is silent
    // on what target_commitish then reads: Forgejo stores the sent value unchanged.
    const rel = f.insertRelease({
      ...fields,
      tagName: existingTag.name,
      target: form.target_commitish,
    });
    return sendJson(ex, 201, releaseJson(f, rel));
  }
  const target = form.target_commitish === "" ? DEFAULT_BRANCH : form.target_commitish;
  if (!form.draft) {
    const sha = f.resolveCommit(target);
    if (!sha) return sendError(f, ex, 404, `target "${target}" not found`);
    f.gitTags.set(form.tag_name, sha);
  }
  const rel = f.insertRelease({ ...fields, tagName: form.tag_name, target });
  sendJson(ex, 201, releaseJson(f, rel));
}

const EditReleaseOption = v.object({
  tag_name: v.nullish(v.string()),
  target_commitish: v.nullish(v.string()),
  name: v.nullish(v.string()),
  body: v.nullish(v.string()),
  draft: v.nullish(v.boolean()),
  prerelease: v.nullish(v.boolean()),
  hide_archive_links: v.nullish(v.boolean()),
});

async function editRelease(f: Forgejo, ex: Exchange, params: Params): Promise<void> {
  // The row is read once the body is in, as Forgejo binds the form before its handler reads
  // the release: "only the fields sent change" (API-FACTS), even with edits arriving together.
  const form = await readJsonOption(f, ex, EditReleaseOption);
  if (!form) return;
  const rel = visibleRelease(f, ex, params.id);
  if (!rel) return sendNotFound(f, ex);
  // API-FACTS is silent on empty strings: Forgejo changes text fields only when the sent
  // value is non-empty (len > 0), so "" leaves a field as it was.
  const tagName = form.tag_name || rel.tagName;
  const other = f.releaseByTag(tagName);
  // API-FACTS is silent on renaming onto another release's tag: answered 409 here.
  if (other && other.id !== rel.id) return sendError(f, ex, 409, f.releaseExistsMessage());
  const next: ReleaseRow = {
    ...rel,
    tagName,
    target: form.target_commitish || rel.target,
    name: form.name || rel.name,
    body: form.body || rel.body,
    draft: form.draft ?? rel.draft,
    prerelease: form.prerelease ?? rel.prerelease,
    hideArchiveLinks: form.hide_archive_links ?? rel.hideArchiveLinks,
  };
  if (!next.draft && !f.gitTags.has(next.tagName)) {
    // Publishing creates the tag from the stored target, resolved now.
    const sha = f.resolveCommit(next.target);
    // API-FACTS is silent: Forgejo's EditRelease answers every UpdateRelease error with 500.
    if (!sha) return sendError(f, ex, 500, `UpdateRelease: target "${next.target}" not found`);
    f.gitTags.set(next.tagName, sha);
  }
  if (rel.draft && !next.draft) {
    // API-FACTS is silent on timestamps: Forgejo renders published_at from created_unix,
    // which publishing resets, so both read the publish time.
    next.createdAt = next.publishedAt = f.now();
  }
  f.releaseRows.set(rel.id, next);
  sendJson(ex, 200, releaseJson(f, next));
}

async function deleteRelease(f: Forgejo, ex: Exchange, params: Params): Promise<void> {
  const rel = visibleRelease(f, ex, params.id);
  if (!rel) return sendNotFound(f, ex);
  await removeRelease(f, rel);
  sendNoContent(ex);
}

/** Like DELETE /releases/{id} for the release of that tag (found in any case). */
async function deleteReleaseByTag(f: Forgejo, ex: Exchange, params: Params): Promise<void> {
  const rel = f.releaseByTag(params.tag);
  if (!rel) return sendNotFound(f, ex);
  await removeRelease(f, rel);
  sendNoContent(ex);
}

/** Deletes the release and its assets; the git tag stays. */
async function removeRelease(f: Forgejo, rel: ReleaseRow): Promise<void> {
  for (const asset of f.assetsOf(rel.id)) await f.deleteAsset(asset);
  f.releaseRows.delete(rel.id);
}

/** Not paged (the spec declares no page or limit here), so ignorePaging changes nothing. */
function listAssets(f: Forgejo, ex: Exchange, params: Params): void {
  const rel = visibleRelease(f, ex, params.id);
  if (!rel) return sendNotFound(f, ex);
  sendJson(ex, 200, releaseJson(f, rel).assets);
}

async function createAsset(f: Forgejo, ex: Exchange, params: Params): Promise<void> {
  // Forgejo checks the quota in middleware, before it looks at the release or the body.
  if (f.quotaExceeded()) return sendError(f, ex, 413, "quota exceeded");
  const rel = visibleRelease(f, ex, params.id);
  if (!rel) return sendNotFound(f, ex);
  const contentType = (ex.req.headers["content-type"] ?? "").toLowerCase();
  if (contentType.startsWith("multipart/form-data")) return await createAssetFromForm(f, ex, rel);
  await createAssetFromBody(f, ex, rel, contentType);
}

const MISSING_NAME = "Could not determine name of attachment.";
const TYPE_NOT_ALLOWED = "This file extension or type is not allowed to be uploaded.";

/** The raw-body upload: the body is the file, streamed to disk and never held in memory. */
async function createAssetFromBody(
  f: Forgejo,
  ex: Exchange,
  rel: ReleaseRow,
  contentType: string,
): Promise<void> {
  const name = ex.url.searchParams.get("name") ?? "";
  // API-FACTS is silent on the exact 400 message for a missing name.
  if (name === "") return sendError(f, ex, 400, MISSING_NAME);
  if (!f.typeAllowed(name)) return sendError(f, ex, 400, TYPE_NOT_ALLOWED);
  // A form-encoded content type makes Go's ParseForm swallow the start of the body (up to
  // its 10 MiB form limit) while looking for "name"; the rest becomes the file.
  // API-FACTS is silent on how much is lost: Go reads at most 10 MiB + 1 byte.
  const skipBytes = contentType.startsWith("application/x-www-form-urlencoded")
    ? GO_MAX_FORM_BYTES + 1
    : 0;
  const uuid = randomUUID();
  const file = f.attachmentPath(uuid);
  const size = await streamBodyToFile(ex, file, skipBytes, ex.keepBytes ?? Infinity);
  // The client went away mid-body: Forgejo stores nothing and nobody reads an answer.
  if (size === undefined) return void ex.res.destroy();
  const asset = f.insertAsset({ uuid, releaseId: rel.id, name, size, file });
  answerUploaded(f, ex, rel, asset);
}

/** The 201 of an upload, unless a store-then-reset fault loses it after the bytes landed. */
function answerUploaded(f: Forgejo, ex: Exchange, rel: ReleaseRow, asset: AssetRow): void {
  if (ex.resetAfterStore) return void ex.res.destroy();
  sendJson(ex, 201, attachmentJson(f, rel, asset, "uuid"));
}

/** Stores the bytes of the body in [skipBytes, skipBytes + keepBytes); undefined if cut off. */
async function streamBodyToFile(
  ex: Exchange,
  file: string,
  skipBytes: number,
  keepBytes: number,
): Promise<number | undefined> {
  let received = 0;
  let stored = 0;
  const window = new Transform({
    transform(chunk: Buffer, _encoding, done) {
      const start = received;
      received += chunk.length;
      ex.record.bodyBytes = received;
      const from = Math.max(0, skipBytes - start);
      const to = Math.min(chunk.length, skipBytes + keepBytes - start);
      if (to <= from) return done();
      stored += to - from;
      done(null, chunk.subarray(from, to));
    },
  });
  await mkdir(dirname(file), { recursive: true });
  try {
    await pipeline(ex.req, window, createWriteStream(file));
    if (ex.req.complete) return stored;
  } catch {
    // handled below: a cut-off body leaves no file behind
  }
  await rm(file, { force: true });
  return undefined;
}

/** The multipart upload: field `attachment`, or `external_url` for a link asset. */
async function createAssetFromForm(f: Forgejo, ex: Exchange, rel: ReleaseRow): Promise<void> {
  const form = await readMultipart(ex);
  const part = form?.get("attachment");
  const attachment = part instanceof File ? part : undefined;
  const externalField = form?.get("external_url");
  const externalUrl = typeof externalField === "string" ? externalField : "";
  const name = ex.url.searchParams.get("name") || attachment?.name || "";
  if (name === "") return sendError(f, ex, 400, MISSING_NAME);
  if (attachment && externalUrl) {
    return sendError(f, ex, 400, "'attachment' and 'external_url' are mutually exclusive");
  }
  if (attachment) {
    if (!f.typeAllowed(name)) return sendError(f, ex, 400, TYPE_NOT_ALLOWED);
    const bytes = new Uint8Array(await attachment.arrayBuffer());
    const kept = bytes.subarray(0, ex.keepBytes ?? bytes.length);
    const uuid = randomUUID();
    const file = f.attachmentPath(uuid);
    await mkdir(dirname(file), { recursive: true });
    await pipeline([kept], createWriteStream(file));
    const asset = f.insertAsset({ uuid, releaseId: rel.id, name, size: kept.length, file });
    return answerUploaded(f, ex, rel, asset);
  }
  if (externalUrl) {
    if (!isHttpUrl(externalUrl)) return sendError(f, ex, 422, "Invalid external URL");
    const asset = f.insertAsset({
      uuid: randomUUID(),
      releaseId: rel.id,
      name,
      size: 0,
      externalUrl,
    });
    return answerUploaded(f, ex, rel, asset);
  }
  sendError(f, ex, 400, "One of 'attachment' or 'external_url' is required");
}

/** Multipart bodies are buffered, as older Forgejo does; a broken one reads as empty. */
async function readMultipart(ex: Exchange): Promise<FormData | undefined> {
  const body = await readBody(ex);
  const headers = { "content-type": ex.req.headers["content-type"] ?? "" };
  try {
    return await new Response(new Uint8Array(body), { headers }).formData();
  } catch {
    return undefined;
  }
}

function isHttpUrl(text: string): boolean {
  try {
    return ["http:", "https:"].includes(new URL(text).protocol);
  } catch {
    return false;
  }
}

/** The asset with that id, only within the (visible) release named in the path. */
function findAsset(f: Forgejo, ex: Exchange, params: Params) {
  const rel = visibleRelease(f, ex, params.id);
  const asset = f.assetRows.get(Number(params.attachment_id));
  if (!rel || !asset || asset.releaseId !== rel.id) return undefined;
  return { rel, asset };
}

function getAsset(f: Forgejo, ex: Exchange, params: Params): void {
  const found = findAsset(f, ex, params);
  if (!found) return sendNotFound(f, ex);
  sendJson(ex, 200, releaseJson(f, found.rel).assets.find((a) => a.id === found.asset.id));
}

const EditAttachmentOptions = v.object({
  name: v.nullish(v.string()),
  browser_download_url: v.nullish(v.string()),
});

/** Renames (and repoints a link asset); Forgejo answers 201 here, not 200. */
async function editAsset(f: Forgejo, ex: Exchange, params: Params): Promise<void> {
  const found = findAsset(f, ex, params);
  const form = await readJsonOption(f, ex, EditAttachmentOptions);
  if (!form) return;
  if (!found) return sendNotFound(f, ex);
  const { rel, asset } = found;
  if (form.name) asset.name = form.name;
  // API-FACTS is silent on browser_download_url edits: it repoints link assets only, and
  // renames are not checked against ALLOWED_TYPES.
  if (form.browser_download_url && asset.externalUrl !== undefined) {
    if (!isHttpUrl(form.browser_download_url)) {
      return sendError(f, ex, 422, "Invalid external URL");
    }
    asset.externalUrl = form.browser_download_url;
  }
  sendJson(ex, 201, releaseJson(f, rel).assets.find((a) => a.id === asset.id));
}

async function deleteAsset(f: Forgejo, ex: Exchange, params: Params): Promise<void> {
  const found = findAsset(f, ex, params);
  if (!found) return sendNotFound(f, ex);
  await f.deleteAsset(found.asset);
  sendNoContent(ex);
}

/** Every git tag, paged like the release list. */
function listTags(f: Forgejo, ex: Exchange): void {
  // API-FACTS is silent on the order (Forgejo's git for-each-ref sorts by creation date);
  // callers must not depend on it, so names sorted do here.
  const all = [...f.gitTags].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
  const { page, limit } = listOptions(ex.url.searchParams);
  const onPage = all.slice((page - 1) * limit, page * limit);
  const headers: Record<string, string> = {
    "x-total-count": String(all.length),
    "access-control-expose-headers": "X-Total-Count, Link",
  };
  const links = paginationLinks(f, ex.url, all.length, limit, page);
  if (links.length > 0) headers.link = links.join(",");
  sendJson(ex, 200, onPage.map(([name, sha]) => tagJson(f, name, sha)), headers);
}

function getTag(f: Forgejo, ex: Exchange, params: Params): void {
  // API-FACTS is silent: git tag names are case-sensitive, unlike release lookups.
  const sha = f.gitTags.get(params.tag);
  if (sha === undefined) return sendNotFound(f, ex);
  sendJson(ex, 200, tagJson(f, params.tag, sha));
}

/** 409 while any release (a draft too) holds the tag, 404 when there is no tag, else 204. */
function deleteTag(f: Forgejo, ex: Exchange, params: Params): void {
  if (f.releaseByTag(params.tag)) {
    return sendError(f, ex, 409, "a tag attached to a release cannot be deleted directly");
  }
  // API-FACTS is silent on case: Forgejo finds the tag by its release row's lower_tag_name,
  // so DELETE /tags/BOOT-V1 deletes "boot-v1". Protected tags (422) are not emulated.
  const tag = f.tagIgnoringCase(params.tag);
  if (!tag) return sendNotFound(f, ex);
  f.gitTags.delete(tag.name);
  sendNoContent(ex);
}

/** Parses a JSON option body like Forgejo's binding; answers 422 itself when it cannot. */
async function readJsonOption<T extends v.GenericSchema>(
  f: Forgejo,
  ex: Exchange,
  schema: T,
): Promise<v.InferOutput<T> | undefined> {
  const contentType = ex.req.headers["content-type"] ?? "";
  const body = await readBody(ex);
  // API-FACTS is silent: Forgejo's binding reads JSON when the type says json or is
  // missing, and refuses other types with 422.
  if (contentType !== "" && !contentType.toLowerCase().includes("json")) {
    sendError(f, ex, 422, "Unsupported Content-Type");
    return undefined;
  }
  let value: unknown = {};
  try {
    if (body.length > 0) value = JSON.parse(body.toString("utf8"));
  } catch (error) {
    sendError(f, ex, 422, `invalid JSON body: ${(error as Error).message}`);
    return undefined;
  }
  const parsed = v.safeParse(schema, value);
  if (!parsed.success) {
    sendError(f, ex, 422, v.summarize(parsed.issues));
    return undefined;
  }
  return parsed.output;
}

// ---------------------------------------------------------------------------------------
// Web download routes and the storage host

async function serveWeb(f: Forgejo, ex: Exchange): Promise<void> {
  const access = authenticate(f, ex);
  // API-FACTS is silent: Forgejo verifies tokens on download routes too, and a bad one
  // is refused with a bare 401 there.
  if (access === undefined) return sendText(ex, 401, "text/plain;charset=utf-8", "Unauthorized\n");
  ex.access = access;
  const method = ex.record.method;
  // API-FACTS is silent on HEAD: it is answered like GET without the body.
  if (method !== "GET" && method !== "HEAD") return sendWebNotFound(ex);
  const path = ex.url.pathname;
  const byUuid = path.match(/^\/attachments\/([^/]+)$/);
  if (byUuid) return await serveAttachmentByUuid(f, ex, safeDecode(byUuid[1]));
  const byName = path.match(/^\/([^/]+)\/([^/]+)\/releases\/download\/([^/]+)\/([^/]+)$/);
  if (byName) {
    const [owner, repo, tag, name] = byName.slice(1).map(safeDecode);
    if (isThisRepo(f, owner, repo)) return await serveAttachmentByName(f, ex, tag, name);
  }
  sendWebNotFound(ex);
}

function sendWebNotFound(ex: Exchange): void {
  sendText(ex, 404, "text/html;charset=utf-8", "<!DOCTYPE html><title>Page Not Found</title>\n");
}

async function serveAttachmentByUuid(f: Forgejo, ex: Exchange, uuid: string): Promise<void> {
  const asset = [...f.assetRows.values()].find((a) => a.uuid === uuid);
  const rel = asset && f.releaseRows.get(asset.releaseId);
  if (!asset || !rel || !canSeeRepo(f, ex.access)) return sendWebNotFound(ex);
  // API-FACTS is silent on draft downloads: only writers get a draft's files.
  if (rel.draft && !canWrite(ex.access)) return sendWebNotFound(ex);
  await serveAsset(f, ex, asset);
}

async function serveAttachmentByName(f: Forgejo, ex: Exchange, tag: string, name: string) {
  // API-FACTS is silent here: the tag must match exactly, a draft's files are never served
  // by name (only by uuid), and of duplicate names the oldest is served.
  const rel = [...f.releaseRows.values()].find((r) => r.tagName === tag && !r.draft);
  const asset = rel && f.assetsOf(rel.id).find((a) => a.name === name);
  if (!asset || !canSeeRepo(f, ex.access)) return sendWebNotFound(ex);
  await serveAsset(f, ex, asset);
}

/** Sends the bytes, or 303 to the link target or to object storage with SERVE_DIRECT. */
async function serveAsset(f: Forgejo, ex: Exchange, asset: AssetRow): Promise<void> {
  if (ex.record.method === "GET") asset.downloadCount++;
  if (asset.externalUrl !== undefined) {
    return sendText(ex, 303, "text/plain", "", { location: asset.externalUrl });
  }
  if (f.settings.serveDirect) {
    return sendText(ex, 303, "text/plain", "", { location: presignedUrl(f, asset) });
  }
  await sendFile(ex, asset.file!, asset.size, {
    "content-type": "application/octet-stream",
    "content-disposition": contentDisposition(asset.name),
  });
}

function contentDisposition(name: string): string {
  return `attachment; filename="${name.replace(/"/g, "")}"; filename*=UTF-8''${
    encodeURIComponent(name)
  }`;
}

/** An S3-style presigned GET URL; the signature covers the object key. */
function presignedUrl(f: Forgejo, asset: AssetRow): string {
  const key = attachmentKey(asset.uuid);
  const query = new URLSearchParams({
    "X-Amz-Algorithm": "AWS4-HMAC-SHA256",
    "X-Amz-Expires": "300",
    "X-Amz-Signature": sign(f, key),
    "response-content-disposition": contentDisposition(asset.name),
  });
  return `${f.storageUrl}/${STORAGE_BUCKET}/${key}?${query}`;
}

function sign(f: Forgejo, key: string): string {
  return createHmac("sha256", f.signingKey).update(key).digest("hex");
}

/**
 * The object-storage host: it trusts only the presigned URL. Like S3 and MinIO, it refuses
 * a request that also carries an Authorization header.
 */
async function serveStorage(f: Forgejo, ex: Exchange): Promise<void> {
  // API-FACTS is silent on the storage host: S3's answers (XML errors) are emulated.
  if (ex.record.method !== "GET" && ex.record.method !== "HEAD") {
    return sendS3Error(ex, 405, "MethodNotAllowed", "The specified method is not allowed.");
  }
  if (ex.req.headers.authorization !== undefined) {
    return sendS3Error(
      ex,
      400,
      "InvalidArgument",
      "Only one auth mechanism allowed; only the X-Amz-Algorithm query parameter, " +
        "Signature query string parameter or the Authorization header should be specified",
    );
  }
  const key = ex.url.pathname.slice(`/${STORAGE_BUCKET}/`.length);
  if (ex.url.searchParams.get("X-Amz-Signature") !== sign(f, key)) {
    return sendS3Error(ex, 403, "SignatureDoesNotMatch", "The request signature does not match.");
  }
  const asset = [...f.assetRows.values()].find((a) => a.file && attachmentKey(a.uuid) === key);
  if (!asset) return sendS3Error(ex, 404, "NoSuchKey", "The specified key does not exist.");
  const disposition = ex.url.searchParams.get("response-content-disposition");
  await sendFile(ex, asset.file!, asset.size, {
    "content-type": "application/octet-stream",
    ...(disposition ? { "content-disposition": disposition } : {}),
  });
}

function sendS3Error(ex: Exchange, status: number, code: string, message: string): void {
  const xml = `<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>${code}</Code>` +
    `<Message>${message}</Message></Error>`;
  sendText(ex, status, "application/xml", xml);
}

/**
 * Serves a stored file whole, or from `Range: bytes=N-` / `bytes=N-M` with 206. A pad fault
 * makes a whole answer longer than the file, Content-Length included.
 */
async function sendFile(
  ex: Exchange,
  file: string,
  size: number,
  headers: Record<string, string>,
): Promise<void> {
  const range = parseRange(ex.req.headers.range, size);
  if (range === "unsatisfiable") {
    return sendText(ex, 416, "text/plain", "", { "content-range": `bytes */${size}` });
  }
  const { start, end } = range ?? { start: 0, end: size - 1 };
  const partial: Record<string, string> = range
    ? { "content-range": `bytes ${start}-${end}/${size}` }
    : {};
  const pad = range ? 0 : ex.padBytes ?? 0;
  const length = Math.max(0, end - start + 1) + pad;
  writeHead(ex, range ? 206 : 200, {
    ...headers,
    "accept-ranges": "bytes",
    "content-length": length,
    ...partial,
  });
  if (ex.record.method === "HEAD" || length === 0) return void ex.res.end();
  const rate = ex.trickleBytesPerSecond;
  try {
    const bytes = Readable.from(fileThenPadding(ex.record, file, { start, end }, pad));
    await (rate === undefined
      ? pipeline(bytes, ex.res)
      : pipeline(bytes, trickleStream(rate), ex.res));
  } catch {
    // the client stopped reading; nothing to answer any more
  }
}

/** The file's bytes in `range`, then `pad` zero bytes, counted in `sentBytes` as they go. */
async function* fileThenPadding(
  record: RecordedRequest,
  file: string,
  range: { start: number; end: number },
  pad: number,
): AsyncGenerator<Buffer> {
  if (range.end >= range.start) {
    for await (const chunk of createReadStream(file, range)) {
      record.sentBytes += chunk.length;
      yield chunk;
    }
  }
  const zeros = Buffer.alloc(64 * 1024);
  for (let left = pad; left > 0; left -= zeros.length) {
    const chunk = left >= zeros.length ? zeros : zeros.subarray(0, left);
    record.sentBytes += chunk.length;
    yield chunk;
  }
}

/** One byte range as Go's http.ServeContent reads it; several ranges are served whole. */
function parseRange(header: string | undefined, size: number) {
  const match = header?.match(/^bytes=(\d*)-(\d*)$/);
  if (!match || (match[1] === "" && match[2] === "")) return undefined;
  if (match[1] === "") {
    const suffix = Number(match[2]);
    if (suffix === 0 || size === 0) return "unsatisfiable" as const;
    return { start: Math.max(0, size - suffix), end: size - 1 };
  }
  const start = Number(match[1]);
  const end = match[2] === "" ? size - 1 : Math.min(Number(match[2]), size - 1);
  if (start >= size || end < start) return "unsatisfiable" as const;
  return { start, end };
}

async function readAssetBytes(f: Forgejo, releaseId: number, name: string) {
  const assets = [...f.assetRows.values()]
    .filter((asset) => asset.releaseId === releaseId && asset.name === name)
    .sort((a, b) => a.id - b.id);
  return await Promise.all(
    assets.map(async (asset) =>
      asset.file ? new Uint8Array(await readFile(asset.file)) : new Uint8Array()
    ),
  );
}

/** Rewrites stored files as a compromised bucket would; the rows follow the new size. */
async function tamperAsset(f: Forgejo, releaseId: number, name: string, bytes: Uint8Array) {
  const assets = [...f.assetRows.values()].filter((asset) =>
    asset.releaseId === releaseId && asset.name === name && asset.file !== undefined
  );
  if (assets.length === 0) {
    throw new Error(`tamper: release ${releaseId} has no stored asset named "${name}"`);
  }
  for (const asset of assets) {
    await writeFile(asset.file!, bytes);
    f.storedBytes += bytes.length - asset.size;
    asset.size = bytes.length;
  }
}

// ---------------------------------------------------------------------------------------
// Servers

async function listen(server: Server, port: number): Promise<string> {
  server.listen(port, "127.0.0.1");
  await once(server, "listening");
  return `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
}

/** Closes the listener and every connection, hung ones included. */
async function stopServer(server: Server): Promise<void> {
  const closed = new Promise<void>((resolve) => server.close(() => resolve()));
  server.closeAllConnections();
  await closed;
}

// ---------------------------------------------------------------------------------------
// Command line

async function runFromCommandLine(args: string[]): Promise<void> {
  const { values } = parseArgs({
    args,
    options: {
      port: { type: "string" },
      storage: { type: "string" },
      token: { type: "string", default: DEFAULT_TOKEN },
    },
    strict: true,
    allowPositionals: false,
  });
  const port = values.port === undefined ? 0 : Number(values.port);
  if (!Number.isInteger(port) || port < 0 || port > 65535) {
    throw new Error(`--port must be a TCP port number, not "${values.port}".`);
  }
  const token = values.token!;
  const emulator = await startForgejo({
    port,
    storageDir: values.storage,
    tokens: { [token]: "write" },
  });
  console.log(JSON.stringify({ url: emulator.url, storageUrl: emulator.storageUrl, token }));
  const stop = async () => {
    await emulator.close();
    Deno.exit(0);
  };
  Deno.addSignalListener("SIGINT", stop);
  Deno.addSignalListener("SIGTERM", stop);
}

if (import.meta.main) {
  try {
    await runFromCommandLine(Deno.args);
  } catch (error) {
    console.error(`forgejo emulator: ${error instanceof Error ? error.message : error}`);
    Deno.exit(2);
  }
}

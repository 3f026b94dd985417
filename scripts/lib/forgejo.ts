/**
 * The Forgejo API as one client with verb methods (retries, redirects, caps, deadlines), the
 * explanations of its failures, the token and mirror guards, and the upload that looks before
 * it retries. It speaks HTTP only; what a release should hold is decided elsewhere.
 */
import * as v from "valibot";
import { Buffer } from "node:buffer";
import { createReadStream } from "node:fs";
import { Readable } from "node:stream";
import { Agent, type Dispatcher, interceptors, request, type RetryHandler } from "undici";
import { sleep } from "zx";
import {
  APIErrorSchema,
  type Attachment,
  AttachmentListSchema,
  AttachmentSchema,
  type CreateReleaseOption,
  type EditReleaseOption,
  type Release,
  ReleaseListSchema,
  ReleaseSchema,
  type Repository,
  RepositorySchema,
  ServerVersionSchema,
  type Tag,
  TagListSchema,
  TagSchema,
} from "../../types/forgejo.ts";
import { READ_SIZE, sha256Hex } from "./hash.ts";
import { type Env, formatBytes, ReleaseError, type Run, UsageError } from "./run.ts";
import { type CommonOptions, type HttpSettings, isLoopback, type Site } from "./cli.ts";
import { parseJson, safeJson } from "./json.ts";

/**
 * A token is one opaque word. Whitespace or a control character (a pasted newline, a CR from
 * a Windows file) would only ever produce a confusing "invalid header" error, retried.
 */
const TokenSchema = v.pipe(
  v.string(),
  // deno-lint-ignore no-control-regex
  v.regex(/^[^\s\x00-\x1f\x7f]+$/, "contains whitespace or a control character"),
);

/** The token from the environment (FORGEJO_TOKEN, else GITHUB_TOKEN), checked and masked. */
export function readToken(env: Env, run: Pick<Run, "mask">): string | undefined {
  const variable = env.FORGEJO_TOKEN ? "FORGEJO_TOKEN" : "GITHUB_TOKEN";
  const token = env[variable] || undefined;
  if (token === undefined) return undefined;
  const parsed = v.safeParse(TokenSchema, token);
  if (!parsed.success) {
    throw new UsageError(
      `${variable} ${parsed.issues[0].message} (a pasted newline?): set it to the token alone`,
    );
  }
  run.mask(token);
  return token;
}

/** The token of a command that writes releases of `site`; `why` opens the refusal without one. */
export function requireToken(
  site: Site,
  env: Env,
  run: Pick<Run, "mask">,
  why = "no token",
): string {
  const token = readToken(env, run);
  if (!token) {
    throw new UsageError(
      `${why}: set FORGEJO_TOKEN to a token that can write releases of ${site.repo} ` +
        "(in a workflow: FORGEJO_TOKEN: ${{ secrets.GITHUB_TOKEN }})",
    );
  }
  return token;
}

/**
 * The mirror-list entry that `server` falls under. A mirror is its host, whatever the scheme
 * or port, and every subdomain of it; hosts are compared normalised (case, a trailing dot and
 * IDNA spellings are one host, and every loopback name is one host), so no spelling of a
 * mirror gets the token.
 */
export function mirrorOf(server: string, mirrors: string[]): string | undefined {
  const target = new URL(server);
  const host = hostKey(target);
  return mirrors.find((mirror) => {
    const url = URL.canParse(mirror) ? new URL(mirror) : undefined;
    if (!url || !(host === hostKey(url) || host.endsWith(`.${hostKey(url)}`))) return false;
    const base = url.pathname.replace(/\/+$/, "");
    const at = target.pathname.replace(/\/+$/, "");
    return at === base || at.startsWith(`${base}/`);
  });
}

/** The host as a server sees it. URL already lowercases and IDNA-encodes. */
function hostKey(url: URL): string {
  return isLoopback(url) ? "loopback" : url.hostname.replace(/\.$/, "");
}

export function refuseMirror(site: Site, mirrors: string[]): Site {
  const mirror = mirrorOf(site.server, mirrors);
  if (mirror) {
    throw new ReleaseError(
      `refusing to publish to ${site.server}: it is on the mirror list (${mirror}), which only distributes releases; publish to the primary Forgejo or change --mirrors`,
    );
  }
  return site;
}

/** Sizes no real release reaches: a larger body comes from a broken or hostile server. */
export const MAX_API_BODY = 16 << 20;

export const MAX_INDEX_FILE = 1 << 20;

/** Forgejo serves at most 50 per page; 200 pages are 10,000 releases, past any history. */
const PAGE_SIZE = 50;

const MAX_PAGES = 200;

const MAX_REDIRECTS = 5;

/** Tries of one request in all: the first, then four retries. */
const TRIES = 5;

/** Each try of a request carrying a file may take --timeout plus this long per MiB. */
const MS_PER_MIB = 1000;

const RETRY_STATUS = new Set([429, 500, 502, 503, 504]);

/** Failures of the network or the peer, never of this machine (ENAMETOOLONG, bad headers). */
const RETRY_CODES = new Set([
  "ECONNRESET",
  "ECONNREFUSED",
  "EPIPE",
  "ETIMEDOUT",
  "ENETUNREACH",
  "EHOSTUNREACH",
  "EAI_AGAIN",
  "UND_ERR_SOCKET",
  "UND_ERR_CONNECT_TIMEOUT",
  "UND_ERR_HEADERS_TIMEOUT",
  "UND_ERR_BODY_TIMEOUT",
]);

/** What a repeat cannot do twice. POST is not: uploads look before they send again. */
const IDEMPOTENT = ["GET", "HEAD", "PUT", "PATCH", "DELETE"];

type Method = "GET" | "POST" | "PATCH" | "DELETE";

/** An HTTP failure, already explained. `transient` ones were worth retrying. */
class HttpError extends ReleaseError {
  constructor(message: string, readonly transient: boolean, readonly retryAfter?: string) {
    super(message);
  }
}

interface Exchange {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  text: string;
}

interface SendInit {
  body?: string | Uint8Array | Readable;
  headers?: Record<string, string>;
  /** Statuses the caller handles; any other status of 300 or more is an HttpError. */
  expect?: number[];
  maxBytes?: number;
  /** Bytes the request or its answer carries, for the overall deadline. */
  carries?: number;
  /** POST /releases may be repeated: a second create answers 409, which the caller handles. */
  repeatable?: boolean;
}

/** Wait before retry number `attempt` (1-based): Retry-After when given, else exponential. */
function backoffMs(
  http: HttpSettings,
  attempt: number,
  retryAfter?: string | string[],
): number {
  return retryAfterMs(retryAfter) ??
    http.retryDelayMs * 2 ** (attempt - 1) * (0.5 + Math.random());
}

export function retryAfterMs(header: string | string[] | undefined): number | undefined {
  const value = Array.isArray(header) ? header[0] : header;
  if (!value) return undefined;
  const seconds = Number(value);
  const ms = Number.isFinite(seconds) ? seconds * 1000 : Date.parse(value) - Date.now();
  return Number.isFinite(ms) ? Math.min(Math.max(ms, 0), 120_000) : undefined;
}

function isTransient(error: { statusCode?: number; code?: string }): boolean {
  return error.statusCode !== undefined
    ? RETRY_STATUS.has(error.statusCode)
    : RETRY_CODES.has(error.code ?? "");
}

/**
 * undici's retry interceptor with this script's policy: only transient failures, only
 * methods that may repeat, `TRIES` in all, and each retry said out loud.
 */
function retryPolicy(run: Run, http: HttpSettings): RetryHandler.RetryCallback {
  return (error, { state, opts }, done) => {
    const failure = error as Error & {
      statusCode?: number;
      code?: string;
      headers?: Exchange["headers"];
    };
    const methods = opts.retryOptions?.methods ?? IDEMPOTENT;
    if (!isTransient(failure) || !methods.includes(opts.method) || state.counter >= TRIES) {
      return done(error);
    }
    const delay = backoffMs(http, state.counter, failure.headers?.["retry-after"]);
    const what = `${opts.method} ${String(opts.path).split("?")[0]}`;
    run.log(
      `${
        failure.statusCode
          ? `Forgejo answered ${failure.statusCode} for ${what}`
          : `${what} failed (${failure.code})`
      }; retrying in ${(delay / 1000).toFixed(1)}s (${state.counter}/${TRIES - 1})`,
    );
    // The handler cancels this timer when the request is aborted.
    return setTimeout(() => done(null), delay);
  };
}

export type Forgejo = ReturnType<typeof connectForgejo>;

/**
 * The Forgejo API as verbs. The token goes only to the server's own origin; on a redirect to
 * any other origin undici's redirect interceptor drops the authorization header (and
 * `headersFor` never adds it to a request for another origin).
 */
export function connectForgejo(
  run: Run,
  site: Site,
  token: string | undefined,
  settings: CommonOptions,
) {
  const { http } = settings;
  const origin = new URL(site.server).origin;
  const agent = new Agent({
    connect: { timeout: 30_000 },
    headersTimeout: http.timeoutMs,
    bodyTimeout: http.timeoutMs,
  }).compose(
    // throwOnError: false hands the last answer (its status and error body) to the caller.
    interceptors.retry({
      maxRetries: TRIES - 1,
      methods: IDEMPOTENT,
      retry: retryPolicy(run, http),
      throwOnError: false,
    }),
    interceptors.redirect({ maxRedirections: MAX_REDIRECTS, throwOnMaxRedirect: true }),
  );
  // Idle keep-alive connections would outlive the run; nothing is in flight once it ends.
  run.atEnd(() => agent.destroy());
  const [owner, name] = site.repo.split("/");
  const repoPath = `/api/v1/repos/${encodeURIComponent(owner)}/${encodeURIComponent(name)}`;
  const api = (route: string, query: Record<string, string> = {}) => {
    const url = new URL(`${site.server}${route}`);
    for (const [key, value] of Object.entries(query)) url.searchParams.set(key, value);
    return url;
  };
  const repoApi = (route: string, query?: Record<string, string>) =>
    api(`${repoPath}${route}`, query);

  function headersFor(url: URL, extra: Record<string, string> = {}): Record<string, string> {
    const headers: Record<string, string> = { accept: "application/json", ...extra };
    if (token && url.origin === origin) headers.authorization = `token ${token}`;
    return headers;
  }

  /** One request, retried by the interceptor when it may be; its answer read up to a cap. */
  async function send(method: Method, url: URL, init: SendInit = {}): Promise<Exchange> {
    const what = `${method} ${url.pathname}`;
    const deadlineMs = deadlineFor(http, init.carries ?? 0);
    const signal = AbortSignal.timeout(deadlineMs);
    try {
      const options = {
        method,
        body: init.body,
        headers: headersFor(url, init.headers),
        dispatcher: agent,
        signal,
        // Read by retryPolicy: which methods this one request may repeat.
        retryOptions: { methods: init.repeatable ? [...IDEMPOTENT, "POST"] : IDEMPOTENT },
      };
      const response = await request(url, options);
      const text = await readCapped(response.body, init.maxBytes ?? MAX_API_BODY, what);
      const answer = { status: response.statusCode, headers: response.headers, text };
      if (answer.status >= 300 && !(init.expect ?? []).includes(answer.status)) {
        throw new HttpError(
          explainStatus(site, answer, what),
          RETRY_STATUS.has(answer.status),
          String(answer.headers["retry-after"] ?? ""),
        );
      }
      return answer;
    } catch (error) {
      if (error instanceof ReleaseError) throw error;
      if (signal.aborted) {
        throw new HttpError(
          `${what} did not finish within ${
            Math.round(deadlineMs / 1000)
          }s: the server answers too slowly or never ends its answer; check ${site.server}, or raise --timeout`,
          true,
        );
      }
      const failure = error as Error & { code?: string };
      const transient = isTransient(failure);
      throw new HttpError(
        `${what} failed${transient && IDEMPOTENT.includes(method) ? ` ${TRIES} times` : ""} (${
          failure.code ?? failure.name
        }: ${failure.message})`,
        transient,
      );
    }
  }

  async function json<T>(
    schema: v.GenericSchema<unknown, T>,
    method: Method,
    url: URL,
    init: SendInit = {},
  ): Promise<T> {
    const answer = await send(method, url, init);
    return parseAnswer(schema, answer.text, `${method} ${url.pathname}`);
  }

  function parseAnswer<T>(schema: v.GenericSchema<unknown, T>, text: string, what: string): T {
    try {
      return parseJson(schema, text, `Forgejo's answer to ${what}`);
    } catch (error) {
      throw new ReleaseError(`${(error as Error).message}; is ${site.server} a Forgejo server?`);
    }
  }

  /** A JSON request body. */
  const sendJson = (body: unknown): SendInit => ({
    body: JSON.stringify(body),
    headers: { "content-type": "application/json" },
  });

  /**
   * Every item of a paged list, in the server's order. A server that ignores `page` (the same
   * page again), a short or empty page, or the total it announced ends the listing; past
   * MAX_PAGES it is an error, never an endless loop.
   */
  async function listPaged<T>(
    route: string,
    schema: v.GenericSchema<unknown, T[]>,
    keyOf: (item: T) => string | number,
    query: Record<string, string>,
    noun: string,
  ): Promise<T[]> {
    const seen = new Set<string | number>();
    const items: T[] = [];
    let pageSize = PAGE_SIZE;
    for (let page = 1; page <= MAX_PAGES; page++) {
      const url = repoApi(route, { ...query, page: String(page), limit: String(PAGE_SIZE) });
      const answer = await send("GET", url);
      const onPage = parseAnswer(schema, answer.text, `GET ${url.pathname}`);
      const fresh = onPage.filter((item) => !seen.has(keyOf(item)));
      for (const item of fresh) seen.add(keyOf(item));
      items.push(...fresh);
      const total = Number(answer.headers["x-total-count"]);
      // A server may serve fewer than asked: the first page says how many a full page holds.
      if (page === 1 && onPage.length > 0) pageSize = Math.min(onPage.length, PAGE_SIZE);
      const done = fresh.length < onPage.length || onPage.length < pageSize ||
        (Number.isFinite(total) && items.length >= total);
      if (done) return items;
    }
    throw new ReleaseError(
      `${site.repo} lists more than ${MAX_PAGES} pages of ${noun}: the server does not page as Forgejo does; check --server`,
    );
  }

  /** Every release matching `query`, newest first. */
  const listReleases = (query: Record<string, string>) =>
    listPaged("/releases", ReleaseListSchema, (release) => release.id, query, "releases");

  return {
    server: site.server,
    repo: site.repo,
    origin,
    http,

    /** The server's version; none when it does not answer as Forgejo does. */
    async version(): Promise<{ status: number; version?: string }> {
      const answer = await send("GET", api("/api/v1/version"), { expect: [404] });
      const parsed = answer.status === 200
        ? v.safeParse(ServerVersionSchema, safeJson(answer.text))
        : undefined;
      return {
        status: answer.status,
        version: parsed?.success ? parsed.output.version : undefined,
      };
    },

    repository: () => json(RepositorySchema, "GET", repoApi("")),

    releases: {
      /** By tag; drafts are visible to writers, but older servers hide them from this lookup. */
      async byTag(tag: string): Promise<Release | undefined> {
        const url = repoApi(`/releases/tags/${encodeURIComponent(tag)}`);
        const answer = await send("GET", url, { expect: [404] });
        if (answer.status === 200) {
          return parseAnswer(ReleaseSchema, answer.text, `GET ${url.pathname}`);
        }
        const drafts = await listReleases({ draft: "true" });
        return drafts.find((release) => release.tag_name.toLowerCase() === tag.toLowerCase());
      },
      list: (query: { draft?: boolean; prerelease?: boolean } = {}) =>
        listReleases(
          Object.fromEntries([
            ...(query.draft === undefined ? [] : [["draft", String(query.draft)]]),
            ...(query.prerelease === undefined ? [] : [["pre-release", String(query.prerelease)]]),
          ]),
        ),
      get: (id: number) => json(ReleaseSchema, "GET", repoApi(`/releases/${id}`)),
      /** By id; undefined when it is gone. */
      async byId(id: number): Promise<Release | undefined> {
        const url = repoApi(`/releases/${id}`);
        const answer = await send("GET", url, { expect: [404] });
        return answer.status === 404
          ? undefined
          : parseAnswer(ReleaseSchema, answer.text, `GET ${url.pathname}`);
      },
      /** The new release, or undefined when one already exists for the tag (409). */
      async create(option: CreateReleaseOption): Promise<Release | undefined> {
        const url = repoApi("/releases");
        const answer = await send("POST", url, {
          ...sendJson(option),
          expect: [409],
          repeatable: true,
        });
        return answer.status === 409
          ? undefined
          : parseAnswer(ReleaseSchema, answer.text, `POST ${url.pathname}`);
      },
      edit: (id: number, edit: EditReleaseOption) =>
        json(ReleaseSchema, "PATCH", repoApi(`/releases/${id}`), sendJson(edit)),
      /** Deletes the release and every asset; the git tag stays. */
      async remove(id: number): Promise<void> {
        await send("DELETE", repoApi(`/releases/${id}`), { expect: [404] });
      },
    },

    assets: {
      list: (releaseId: number) =>
        json(AttachmentListSchema, "GET", repoApi(`/releases/${releaseId}/assets`)),
      /** One POST of the raw bytes, streamed with their exact length. Never repeated here. */
      async upload(releaseId: number, asset: BundleAsset): Promise<Attachment> {
        const url = repoApi(`/releases/${releaseId}/assets`, { name: asset.name });
        const answer = await send("POST", url, {
          // One chunk read ahead, not Readable.from's 16: the socket is the slower side, and
          // each MiB held ahead is RSS (two uploads peaked ~30 MiB higher with 16).
          body: asset.bytes ?? Readable.from(readWithProgress(run, asset), { highWaterMark: 1 }),
          headers: {
            "content-type": "application/octet-stream",
            "content-length": String(asset.size),
          },
          expect: [400, 413],
          carries: asset.size,
        });
        if (answer.status !== 201) {
          throw new HttpError(explainUploadFailure(site, answer, asset), false);
        }
        return parseAnswer(AttachmentSchema, answer.text, `POST ${url.pathname}`);
      },
      /** True when it was there to delete. */
      async remove(releaseId: number, copy: Attachment): Promise<boolean> {
        const url = repoApi(`/releases/${releaseId}/assets/${copy.id}`);
        return (await send("DELETE", url, { expect: [404] })).status !== 404;
      },
      /**
       * A small file of a release (SHA256SUMS, manifest.json), at most `maxBytes`; undefined
       * when it is gone (another job deleted it since the listing).
       */
      async text(copy: Attachment, maxBytes = MAX_INDEX_FILE): Promise<string | undefined> {
        if (copy.size > maxBytes) {
          throw new ReleaseError(
            `${copy.name} of ${site.repo} has ${copy.size} bytes, more than any real ${copy.name} (${
              formatBytes(maxBytes)
            }): refusing to read it; delete that asset`,
          );
        }
        const url = new URL(assetAddress(site, copy));
        const answer = await send("GET", url, {
          headers: { accept: "*/*" },
          maxBytes,
          expect: [404],
        });
        return answer.status === 404 ? undefined : answer.text;
      },
      /**
       * The bytes of an asset from offset `from` on (for fetch), streamed: the caller reads the
       * body, until `stop` aborts. A server may not honour the offset; the answer says what it
       * did. Any status but 200, 206 and a 416 to a resume is a ReleaseError saying why.
       */
      async openFrom(copy: Attachment, from: number, stop?: AbortSignal): Promise<AssetBytes> {
        const url = new URL(assetAddress(site, copy));
        const response = await request(url, {
          method: "GET",
          headers: headersFor(url, {
            accept: "*/*",
            ...(from > 0 ? { range: `bytes=${from}-` } : {}),
          }),
          dispatcher: agent,
          signal: AbortSignal.any([
            AbortSignal.timeout(deadlineFor(http, copy.size)),
            ...(stop ? [stop] : []),
          ]),
        });
        if (response.statusCode === 416 && from > 0) {
          await response.body.dump();
          return { kind: "nothing past the offset" };
        }
        if (response.statusCode !== 200 && response.statusCode !== 206) {
          const text = await readCapped(response.body, MAX_API_BODY, `GET ${copy.name}`);
          throw new ReleaseError(
            explainStatus(site, { status: response.statusCode, text }, `download of ${copy.name}`),
          );
        }
        const range = String(response.headers["content-range"] ?? "");
        if (response.statusCode === 206 && !range.startsWith(`bytes ${from}-`)) {
          await response.body.dump();
          return { kind: "elsewhere", range };
        }
        return { kind: "bytes", from: response.statusCode === 206 ? from : 0, body: response.body };
      },
    },

    tags: {
      /** Every git tag of the repository. */
      list: () => listPaged("/tags", TagListSchema, (tag) => tag.name, {}, "tags"),
      async get(tag: string): Promise<Tag | undefined> {
        const url = repoApi(`/tags/${encodeURIComponent(tag)}`);
        const answer = await send("GET", url, { expect: [404] });
        return answer.status === 404
          ? undefined
          : parseAnswer(TagSchema, answer.text, `GET ${url.pathname}`);
      },
      /** "held" while a release (a draft too) still holds the tag. */
      async remove(tag: string): Promise<"removed" | "absent" | "held"> {
        const url = repoApi(`/tags/${encodeURIComponent(tag)}`);
        const answer = await send("DELETE", url, { expect: [404, 409] });
        return answer.status === 404 ? "absent" : answer.status === 409 ? "held" : "removed";
      },
    },
  };
}

/** What a server sent when asked for an asset's bytes from an offset on. */
export type AssetBytes =
  /** `body` starts at `from`: the offset asked, or 0 when the server sent the whole asset. */
  | { kind: "bytes"; from: number; body: Dispatcher.ResponseData["body"] }
  /** A 416 to a resume: the asset holds no byte past the offset. */
  | { kind: "nothing past the offset" }
  /** A 206 from another offset than asked; `range` is its Content-Range, empty without one. */
  | { kind: "elsewhere"; range: string };

/** The longest timer there is (about 24 days): a longer AbortSignal.timeout fires at once. */
const MAX_DEADLINE_MS = 2 ** 31 - 1;

/**
 * The overall deadline of one request, all its tries included: the idle timeout only catches
 * a silent peer, this also ends one that trickles a byte at a time.
 */
export function deadlineFor(http: HttpSettings, carries: number): number {
  return Math.min(TRIES * (http.timeoutMs + MS_PER_MIB * (carries / (1 << 20))), MAX_DEADLINE_MS);
}

/** Reads a response body, refusing one larger than `max` instead of holding it. */
export async function readCapped(
  body: Dispatcher.ResponseData["body"],
  max: number,
  what: string,
): Promise<string> {
  const chunks: Buffer[] = [];
  let size = 0;
  for await (const chunk of body) {
    size += chunk.length;
    if (size > max) {
      body.destroy();
      throw new ReleaseError(
        `the answer to ${what} is larger than ${
          formatBytes(max)
        }, more than any real Forgejo answer: refusing it; check --server`,
      );
    }
    chunks.push(chunk);
  }
  return Buffer.concat(chunks).toString("utf8");
}

/** The uuid form works for drafts and duplicate names alike; the tag form may not. */
function assetAddress(site: Site, copy: Attachment): string {
  return copy.uuid ? `${site.server}/attachments/${copy.uuid}` : copy.browser_download_url;
}

/** Forgejo's own error message, when the body is its JSON error (a proxy's HTML is not). */
function serverMessage(text: string): string | undefined {
  const parsed = v.safeParse(APIErrorSchema, safeJson(text));
  return parsed.success && parsed.output.message ? parsed.output.message : undefined;
}

/** One line that says what failed and what to do about it. */
export function explainStatus(
  site: Site,
  answer: Pick<Exchange, "status" | "text">,
  what: string,
): string {
  const said = serverMessage(answer.text);
  const quoted = said ? ` ("${said}")` : "";
  switch (answer.status) {
    case 401:
      return `Forgejo answered 401 for ${what}${quoted}: the token is missing, wrong or expired; set FORGEJO_TOKEN (in a workflow the job's GITHUB_TOKEN is valid only while the job runs)`;
    case 403:
      return `Forgejo answered 403 for ${what}${quoted}: the token cannot write releases of ${site.repo} (a personal token needs write:repository; the workflow token is read-only for pull requests from forks)`;
    case 404:
      return `Forgejo answered 404 for ${what}: ${site.repo} was not found on ${site.server}, or is not visible with this token; check --repo and the token`;
    case 413:
      return `Forgejo or its reverse proxy answered 413 for ${what}${quoted}: raise the proxy's body limit (nginx client_max_body_size) or the [quota] limit`;
    default:
      return `Forgejo answered ${answer.status} for ${what}${
        quoted || `: ${answer.text.slice(0, 120).replace(/\s+/g, " ")}`
      }`;
  }
}

function explainUploadFailure(site: Site, answer: Exchange, asset: BundleAsset): string {
  const said = serverMessage(answer.text);
  if (answer.status === 413) {
    return `the server or its reverse proxy refused ${asset.name} of ${asset.size} bytes (413${
      said ? `: ${said}` : ""
    }): raise the proxy's client_max_body_size or the [quota] limit, then rerun`;
  }
  if (answer.status === 400 && said && /type is not allowed/i.test(said)) {
    return `Forgejo refuses the file type of ${asset.name} ("${said}"): allow it in [repository.release] ALLOWED_TYPES (empty allows every type), then rerun`;
  }
  return explainStatus(site, answer, `upload of ${asset.name}`);
}

/** Fails early, before a long build, when the server, repository or token is wrong. */
export async function checkForgejo(run: Run, forgejo: Forgejo): Promise<Repository> {
  const { status, version } = await forgejo.version();
  if (!version) {
    throw new ReleaseError(
      `${forgejo.server} does not look like Forgejo: GET /api/v1/version answered ${status} without a version; check --server (the base URL of the Forgejo instance)`,
    );
  }
  const repo = await forgejo.repository();
  if (repo.permissions && repo.permissions.push === false) {
    throw new ReleaseError(
      `the token cannot write releases of ${forgejo.repo} (it has read access only): a personal token needs write:repository and a user with write access; the workflow token is read-only for pull requests from forks`,
    );
  }
  run.log(`Forgejo ${version}, repository ${repo.full_name}`);
  return repo;
}

/** An asset as published: a file on disk, or the bytes of SHA256SUMS / manifest.json. */
export interface BundleAsset {
  name: string;
  size: number;
  sha256: string;
  path?: string;
  bytes?: Uint8Array;
}

/**
 * Uploads one asset, retrying a transient failure. A POST is not idempotent: the failed
 * attempt may have been stored after all, so before sending again it looks, and keeps a
 * complete copy that arrived or deletes a partial one. `before`: the release's assets
 * before this upload, to tell this upload's copies from older ones.
 */
export async function uploadAsset(
  run: Run,
  forgejo: Forgejo,
  releaseId: number,
  asset: BundleAsset,
  before: Attachment[],
): Promise<Attachment> {
  const what = `upload of ${asset.name} (${formatBytes(asset.size)})`;
  for (let attempt = 1;; attempt++) {
    if (attempt > 1) {
      const arrived = await copiesSince(run, forgejo, releaseId, asset, before);
      if (arrived) return arrived;
    }
    try {
      const stored = await forgejo.assets.upload(releaseId, asset);
      if (stored.size === asset.size) return stored;
      await deleteAsset(run, forgejo, releaseId, stored, "a truncated upload");
      throw new HttpError(`Forgejo stored ${stored.size} of ${asset.size} bytes`, true);
    } catch (error) {
      if (!(error instanceof HttpError) || !error.transient) throw error;
      if (attempt >= TRIES) {
        throw new ReleaseError(`${what} failed ${TRIES} times (${error.message})`);
      }
      const delay = backoffMs(forgejo.http, attempt, error.retryAfter);
      run.log(
        `${what}: ${error.message}; retrying in ${(delay / 1000).toFixed(1)}s (${attempt}/${
          TRIES - 1
        })`,
      );
      await sleep(delay);
    }
  }
}

/** A complete copy of `asset` stored since `before` by a failed attempt; partial ones go. */
async function copiesSince(
  run: Run,
  forgejo: Forgejo,
  releaseId: number,
  asset: BundleAsset,
  before: Attachment[],
): Promise<Attachment | undefined> {
  const arrived = (await forgejo.assets.list(releaseId)).filter((copy) =>
    copy.name === asset.name && !before.some((old) => old.id === copy.id)
  );
  for (const copy of arrived) {
    // Index files may be another job's fresh copy: only identical bytes are ours.
    const ours = copy.size === asset.size &&
      (asset.path !== undefined ||
        sha256Hex(new TextEncoder().encode(await forgejo.assets.text(copy) ?? "")) ===
          asset.sha256);
    if (ours) {
      run.log(`${asset.name}: the failed attempt was stored after all (id ${copy.id}); kept it`);
      return copy;
    }
    if (asset.path !== undefined) {
      await deleteAsset(run, forgejo, releaseId, copy, "a partial upload");
    }
  }
  return undefined;
}

export async function deleteAsset(
  run: Run,
  forgejo: Forgejo,
  releaseId: number,
  copy: Attachment,
  why: string,
): Promise<void> {
  await forgejo.assets.remove(releaseId, copy);
  run.log(`Deleted ${why}: ${copy.name} (id ${copy.id}, ${copy.size} bytes)`);
}

/**
 * Streams a file in 1 MiB chunks and shows progress: a bar on a terminal (one per upload under
 * way), a few lines in CI.
 */
async function* readWithProgress(run: Run, asset: BundleAsset): AsyncIterable<Uint8Array> {
  if (asset.path === undefined) throw new ReleaseError(`${asset.name} has no file to upload`);
  const terminal = !run.ci && run.io.stderrIsTerminal;
  const large = asset.size >= 64 << 20;
  let sent = 0;
  let reported = 0;
  try {
    for await (const chunk of createReadStream(asset.path, { highWaterMark: READ_SIZE })) {
      sent += chunk.length;
      yield chunk;
      const percent = Math.floor((sent / asset.size) * 100);
      if (terminal && large) {
        run.drawProgress(asset.name, percent);
      } else if (large && percent >= reported + 25) {
        reported = percent - (percent % 25);
        run.log(`${asset.name}: ${reported}% of ${formatBytes(asset.size)}`);
      }
    }
  } finally {
    // A stopped upload's bar goes; a finished one's stays at 100%.
    if (terminal && large && sent !== asset.size) run.drawProgress(asset.name);
  }
  if (sent !== asset.size) throw new ReleaseError(`${asset.path} changed size while uploading`);
}

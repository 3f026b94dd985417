/**
 * The Forgejo emulator behaves as shared/forgejo/API-FACTS.md says real Forgejo does.
 * Each test starts its own emulator on loopback and talks to it over HTTP with fetch.
 */
import assert from "node:assert/strict";
import { mkdtemp, readdir, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { type Emulator, type EmulatorOptions, startForgejo } from "./forgejo/emulator.ts";

const TOKEN = "test-token";
const BUILT_SHA = "1111111111111111111111111111111111111111";
const OTHER_SHA = "2222222222222222222222222222222222222222";
// The emulator's default HEAD of "main".
const DEFAULT_SHA = "3f786850e387550fdab836ed7e6dc881de23001b";

interface Answer {
  status: number;
  headers: Headers;
  text: string;
  // deno-lint-ignore no-explicit-any
  json: any;
}

interface CallOptions {
  token?: string | null;
  json?: unknown;
  bytes?: Uint8Array<ArrayBuffer>;
  headers?: Record<string, string>;
  client?: Deno.HttpClient;
}

/** One API call on the emulated repository; the body is always read so no resource leaks. */
async function call(
  em: Emulator,
  method: string,
  path: string,
  options: CallOptions = {},
): Promise<Answer> {
  const headers: Record<string, string> = { ...options.headers };
  const token = options.token === undefined ? TOKEN : options.token;
  if (token !== null) headers.authorization = `token ${token}`;
  let body: BodyInit | undefined;
  if (options.json !== undefined) {
    headers["content-type"] = "application/json";
    body = JSON.stringify(options.json);
  } else if (options.bytes !== undefined) {
    headers["content-type"] ??= "application/octet-stream";
    body = options.bytes;
  }
  const url = path.startsWith("http") ? path : `${em.url}/api/v1/repos/ops/runners${path}`;
  const res = await fetch(url, {
    method,
    headers,
    body,
    redirect: "manual",
    client: options.client,
  });
  const text = await res.text();
  let json: unknown = undefined;
  try {
    json = JSON.parse(text);
  } catch {
    // not JSON: HTML pages, file bytes, empty bodies
  }
  return { status: res.status, headers: res.headers, text, json };
}

async function withForgejo(
  options: EmulatorOptions,
  test: (em: Emulator) => Promise<void>,
): Promise<void> {
  const em = await startForgejo(options);
  try {
    await test(em);
  } finally {
    await em.close();
  }
}

async function createRelease(em: Emulator, fields: Record<string, unknown>) {
  const answer = await call(em, "POST", "/releases", { json: fields });
  assert.equal(answer.status, 201, answer.text);
  return answer.json;
}

async function upload(
  em: Emulator,
  releaseId: number,
  name: string,
  bytes: Uint8Array<ArrayBuffer>,
) {
  const query = `?name=${encodeURIComponent(name)}`;
  return await call(em, "POST", `/releases/${releaseId}/assets${query}`, { bytes });
}

function bytesOf(text: string): Uint8Array<ArrayBuffer> {
  return new TextEncoder().encode(text);
}

Deno.test("a draft creates no tag; publishing creates it from the stored target_commitish", async () => {
  await withForgejo({}, async (em) => {
    em.addCommit(BUILT_SHA);
    const draft = await createRelease(em, {
      tag_name: "boot-v1",
      target_commitish: BUILT_SHA,
      draft: true,
    });
    assert.deepEqual(em.tags(), {});
    assert.equal((await call(em, "GET", "/tags/boot-v1")).status, 404);

    const published = await call(em, "PATCH", `/releases/${draft.id}`, { json: { draft: false } });
    assert.equal(published.status, 200);
    assert.equal(published.json.draft, false);
    assert.equal(published.json.name, "", "v11 keeps an empty name");
    assert.deepEqual(em.tags(), { "boot-v1": BUILT_SHA });
    const tag = await call(em, "GET", "/tags/boot-v1");
    assert.equal(tag.json.commit.sha, BUILT_SHA);
  });
});

Deno.test("two edits arriving together each change only the fields they send", async () => {
  await withForgejo({}, async (em) => {
    em.addCommit(BUILT_SHA);
    const draft = await createRelease(em, {
      tag_name: "boot-v1",
      target_commitish: BUILT_SHA,
      draft: true,
    });
    // The body edit's request starts first and finishes its body last.
    let finish = () => {};
    const held = new Promise<void>((resolve) => finish = resolve);
    const slowBody = new ReadableStream<Uint8Array>({
      async start(controller) {
        controller.enqueue(bytesOf('{"body":'));
        await held;
        controller.enqueue(bytesOf('"notes"}'));
        controller.close();
      },
    });
    const bodyEdit = fetch(`${em.url}/api/v1/repos/ops/runners/releases/${draft.id}`, {
      method: "PATCH",
      headers: { authorization: `token ${TOKEN}`, "content-type": "application/json" },
      body: slowBody,
    }).then(async (answer) => ({ status: answer.status, text: await answer.text() }));
    while (!em.requests.some((r) => r.method === "PATCH")) {
      await new Promise((resolve) => setTimeout(resolve, 5));
    }
    const published = await call(em, "PATCH", `/releases/${draft.id}`, { json: { draft: false } });
    assert.equal(published.status, 200);
    finish();
    assert.equal((await bodyEdit).status, 200);
    const release = await call(em, "GET", `/releases/${draft.id}`);
    assert.equal(release.json.draft, false, "the publish is not undone by the body edit");
    assert.equal(release.json.body, "notes");
  });
});

Deno.test("a published create tags the default branch HEAD when target_commitish is empty", async () => {
  await withForgejo({ defaultBranchSha: OTHER_SHA, version: "15.0.3" }, async (em) => {
    const rel = await createRelease(em, { tag_name: "boot-v1" });
    assert.equal(rel.target_commitish, "main");
    assert.equal(rel.name, "boot-v1", "v14.0.2+ names the release after its tag");
    assert.deepEqual(em.tags(), { "boot-v1": OTHER_SHA });
  });
});

Deno.test("creating a release for a tag that has one answers 409, draft or not, in any case", async () => {
  await withForgejo({}, async (em) => {
    await createRelease(em, { tag_name: "boot-v1", draft: true });
    const again = await call(em, "POST", "/releases", { json: { tag_name: "BOOT-V1" } });
    assert.equal(again.status, 409);
    assert.deepEqual(Object.keys(again.json).sort(), ["message", "url"]);
    assert.equal(em.releases().length, 1);
  });
});

Deno.test("a tag without a release becomes the release and keeps its own commit", async () => {
  await withForgejo({}, async (em) => {
    em.addCommit(BUILT_SHA);
    em.addTag("boot-v1", OTHER_SHA);
    const rel = await createRelease(em, { tag_name: "boot-v1", target_commitish: BUILT_SHA });
    assert.equal(rel.tag_name, "boot-v1");
    assert.deepEqual(em.tags(), { "boot-v1": OTHER_SHA });
  });
});

Deno.test("an unknown target answers 404 and creates neither release nor tag", async () => {
  await withForgejo({}, async (em) => {
    const answer = await call(em, "POST", "/releases", {
      json: { tag_name: "boot-v1", target_commitish: "no-such-branch" },
    });
    assert.equal(answer.status, 404);
    assert.deepEqual(em.tags(), {});
    assert.deepEqual(em.releases(), []);
  });
});

Deno.test("deleting a release removes its assets and keeps the git tag", async () => {
  await withForgejo({}, async (em) => {
    const rel = await createRelease(em, { tag_name: "boot-v1" });
    await upload(em, rel.id, "a.iso", bytesOf("iso"));
    assert.equal((await call(em, "DELETE", `/releases/${rel.id}`)).status, 204);
    assert.deepEqual(em.releases(), []);
    assert.deepEqual(await em.assetBytes(rel.id, "a.iso"), []);
    assert.ok("boot-v1" in em.tags());
    assert.equal((await call(em, "DELETE", "/tags/boot-v1")).status, 204);
    assert.deepEqual(em.tags(), {});
  });
});

Deno.test("duplicate asset names switch every browser_download_url to the uuid form", async () => {
  await withForgejo({}, async (em) => {
    const rel = await createRelease(em, { tag_name: "boot-v1" });
    const first = await upload(em, rel.id, "boot.iso", bytesOf("one"));
    assert.equal(first.status, 201);
    assert.equal(first.json.browser_download_url, `${em.url}/attachments/${first.json.uuid}`);
    await upload(em, rel.id, "SHA256SUMS", bytesOf("sums"));

    const unique = await call(em, "GET", `/releases/${rel.id}/assets`);
    assert.deepEqual(unique.json.map((a: { name: string }) => a.name), ["SHA256SUMS", "boot.iso"]);
    assert.equal(
      unique.json[1].browser_download_url,
      `${em.url}/ops/runners/releases/download/boot-v1/boot.iso`,
    );

    const second = await upload(em, rel.id, "boot.iso", bytesOf("two"));
    assert.equal(second.status, 201);
    const duplicated = await call(em, "GET", `/releases/${rel.id}`);
    for (const asset of duplicated.json.assets) {
      assert.equal(asset.browser_download_url, `${em.url}/attachments/${asset.uuid}`);
    }
    const stored = await em.assetBytes(rel.id, "boot.iso");
    assert.deepEqual(stored.map((b) => new TextDecoder().decode(b)), ["one", "two"]);
  });
});

Deno.test("auth: 401 without or with an unknown token, 403 for read and no-scope tokens, 404 elsewhere", async () => {
  const tokens = { [TOKEN]: "write", reader: "read", personal: "no-scope" } as const;
  await withForgejo({ tokens }, async (em) => {
    const create = (token: string | null) =>
      call(em, "POST", "/releases", { token, json: { tag_name: "boot-v1" } });

    const anonymous = await create(null);
    assert.equal(anonymous.status, 401);
    assert.equal(anonymous.json.message, "token is required");
    assert.equal((await create("wrong")).status, 401);
    assert.equal((await create("reader")).status, 403);
    const personal = await create("personal");
    assert.equal(personal.status, 403);
    assert.equal(
      personal.json.message,
      "token does not have at least one of required scope(s): [write:repository]",
    );
    const elsewhere = await call(em, "POST", `${em.url}/api/v1/repos/ops/other/releases`, {
      json: { tag_name: "boot-v1" },
    });
    assert.equal(elsewhere.status, 404);
    assert.deepEqual(em.releases(), []);
  });
});

Deno.test("drafts are hidden from readers and anonymous callers, and shown to writers", async () => {
  await withForgejo({ tokens: { [TOKEN]: "write", reader: "read" } }, async (em) => {
    const draft = await createRelease(em, { tag_name: "boot-v1", draft: true });
    for (const token of ["reader", null]) {
      assert.equal((await call(em, "GET", "/releases/tags/boot-v1", { token })).status, 404);
      assert.equal((await call(em, "GET", `/releases/${draft.id}`, { token })).status, 404);
      assert.deepEqual((await call(em, "GET", "/releases", { token })).json, []);
    }
    assert.equal((await call(em, "GET", "/releases/tags/boot-v1")).status, 200);
  });
});

Deno.test("a private repository answers 404 to anonymous reads", async () => {
  await withForgejo({ private: true }, async (em) => {
    assert.equal((await call(em, "GET", "", { token: null })).status, 404);
    const repo = await call(em, "GET", "");
    assert.equal(repo.status, 200);
    assert.deepEqual(repo.json.permissions, { admin: false, push: true, pull: true });
  });
});

Deno.test("the release list is newest first, paged, and counted in X-Total-Count and Link", async () => {
  await withForgejo({}, async (em) => {
    for (const tag of ["v1", "v2", "v3"]) await createRelease(em, { tag_name: tag });
    const page = await call(em, "GET", "/releases?limit=2");
    assert.deepEqual(page.json.map((r: { tag_name: string }) => r.tag_name), ["v3", "v2"]);
    assert.equal(page.headers.get("x-total-count"), "3");
    assert.match(page.headers.get("link") ?? "", /[?&]page=2>; rel="next"/);
    const clamped = await call(em, "GET", "/releases?limit=500");
    assert.equal(clamped.json.length, 3);
    assert.equal(clamped.headers.get("link"), null);
  });
});

Deno.test("a body over proxyBodyLimit gets nginx's HTML 413 and stores nothing", async () => {
  await withForgejo({ proxyBodyLimit: 1024 }, async (em) => {
    const rel = await createRelease(em, { tag_name: "boot-v1" });
    const answer = await upload(em, rel.id, "boot.iso", new Uint8Array(64 * 1024));
    assert.equal(answer.status, 413);
    assert.match(answer.headers.get("content-type") ?? "", /text\/html/);
    assert.match(answer.text, /<title>413 Request Entity Too Large<\/title>/);
    assert.deepEqual(await em.assetBytes(rel.id, "boot.iso"), []);
    assert.equal(em.requests.at(-1)?.bodyBytes, 0);
  });
});

Deno.test("uploads past the quota get JSON 413 and disallowed types get 400", async () => {
  await withForgejo({ quotaBytes: 10, allowedTypes: [".iso"] }, async (em) => {
    const rel = await createRelease(em, { tag_name: "boot-v1" });
    assert.equal((await upload(em, rel.id, "notes.md", bytesOf("x"))).status, 400);
    // Forgejo checks usage before an upload, so the one that crosses the quota still lands.
    assert.equal((await upload(em, rel.id, "a.iso", new Uint8Array(20))).status, 201);
    const refused = await upload(em, rel.id, "b.iso", new Uint8Array(1));
    assert.equal(refused.status, 413);
    assert.equal(refused.json.message, "quota exceeded");
  });
});

Deno.test("downloads serve the bytes and honour Range: bytes=N-", async () => {
  await withForgejo({}, async (em) => {
    const rel = await createRelease(em, { tag_name: "boot-v1" });
    await upload(em, rel.id, "boot.iso", bytesOf("0123456789"));
    const url = `${em.url}/ops/runners/releases/download/boot-v1/boot.iso`;
    const whole = await call(em, "GET", url, { token: null });
    assert.equal(whole.status, 200);
    assert.equal(whole.headers.get("content-length"), "10");
    const tail = await call(em, "GET", url, { token: null, headers: { range: "bytes=6-" } });
    assert.equal(tail.status, 206);
    assert.equal(tail.headers.get("content-range"), "bytes 6-9/10");
    assert.equal(tail.text, "6789");
  });
});

Deno.test("each recorded request says when it arrived and closed, so overlapping uploads show", async () => {
  await withForgejo({}, async (em) => {
    const rel = await createRelease(em, { tag_name: "boot-v1" });
    const mark = em.requests.length;
    // The first upload's body stays open until the second upload has been answered.
    let finishFirst!: () => void;
    const secondAnswered = new Promise<void>((resolve) => finishFirst = resolve);
    const body = new ReadableStream<Uint8Array>({
      async start(controller) {
        controller.enqueue(bytesOf("first half "));
        await secondAnswered;
        controller.enqueue(bytesOf("second half"));
        controller.close();
      },
    });
    const first = fetch(`${em.url}/api/v1/repos/ops/runners/releases/${rel.id}/assets?name=a.iso`, {
      method: "POST",
      headers: { authorization: `token ${TOKEN}`, "content-type": "application/octet-stream" },
      body,
    });
    while (em.requests.length === mark) await new Promise((resolve) => setTimeout(resolve, 5));
    assert.equal((await upload(em, rel.id, "b.iso", bytesOf("whole"))).status, 201);
    finishFirst();
    assert.equal((await first).status, 201);
    await (await first).body?.cancel();
    const third = await upload(em, rel.id, "c.iso", bytesOf("after"));
    assert.equal(third.status, 201);

    const [a, b, c] = em.requests.slice(mark);
    assert.deepEqual([a.query.name, b.query.name, c.query.name], ["a.iso", "b.iso", "c.iso"]);
    // b arrived and closed while a was open; c arrived after both had closed.
    assert.ok(a.receivedAt < b.receivedAt && b.closedAt! < a.closedAt!);
    assert.ok(a.closedAt! <= c.receivedAt && b.closedAt! <= c.receivedAt);
    assert.ok(c.receivedAt <= c.closedAt!);
  });
});

Deno.test("with serveDirect a download answers 303 to the storage host, which needs no token", async () => {
  await withForgejo({ serveDirect: true }, async (em) => {
    const rel = await createRelease(em, { tag_name: "boot-v1", draft: true });
    const asset = (await upload(em, rel.id, "boot.iso", bytesOf("0123456789"))).json;
    const redirect = await call(em, "GET", asset.browser_download_url);
    assert.equal(redirect.status, 303);
    const location = redirect.headers.get("location") ?? "";
    assert.ok(location.startsWith(`${em.storageUrl}/`), location);

    const part = await call(em, "GET", location, { token: null, headers: { range: "bytes=4-" } });
    assert.equal(part.status, 206);
    assert.equal(part.text, "456789");
    const storageRequests = em.requests.filter((r) => r.host === "storage");
    assert.equal(storageRequests.length, 1);
    assert.equal(storageRequests[0].headers.authorization, undefined);
    // Like S3, the storage host refuses a presigned URL that also carries a token.
    assert.equal((await call(em, "GET", location)).status, 400);
  });
});

Deno.test("a reset fault drops the connection without an answer and stores nothing", async () => {
  const storageDir = await mkdtemp(join(tmpdir(), "forgejo-emulator-test-"));
  try {
    await withForgejo({ storageDir }, async (em) => {
      const rel = await createRelease(em, { tag_name: "boot-v1" });
      em.addFault({ method: "POST", path: "/assets", fault: { kind: "reset", afterBytes: 1000 } });
      // Deno's fetch silently re-sends a request whose reused keep-alive connection drops,
      // which would hide the reset; a fresh client has no connection to reuse.
      const client = Deno.createHttpClient({});
      try {
        const bytes = new Uint8Array(256 * 1024);
        const query = "?name=boot.iso";
        await assert.rejects(
          call(em, "POST", `/releases/${rel.id}/assets${query}`, { bytes, client }),
        );
      } finally {
        client.close();
      }
      const dropped = em.requests.at(-1)!;
      assert.equal(dropped.status, 0);
      assert.ok(dropped.bodyBytes >= 1000);
      assert.deepEqual(await em.assetBytes(rel.id, "boot.iso"), []);
      assert.deepEqual(await readdir(storageDir), []);
      // The fault was used up: the retry lands.
      assert.equal((await upload(em, rel.id, "boot.iso", new Uint8Array(10))).status, 201);
    });
  } finally {
    await rm(storageDir, { recursive: true, force: true });
  }
});

Deno.test("a truncate fault hits the matching upload only, stores the kept bytes, answers 201", async () => {
  await withForgejo({}, async (em) => {
    const rel = await createRelease(em, { tag_name: "boot-v1" });
    em.addFault({
      path: /\/assets$/,
      query: { name: "boot.iso" },
      fault: { kind: "truncate", keepBytes: 4 },
    });
    assert.equal((await upload(em, rel.id, "SHA256SUMS", bytesOf("sums"))).json.size, 4);
    const answer = await upload(em, rel.id, "boot.iso", bytesOf("0123456789"));
    assert.equal(answer.status, 201);
    assert.equal(answer.json.size, 4);
    assert.deepEqual(await em.assetBytes(rel.id, "boot.iso"), [bytesOf("0123")]);
  });
});

Deno.test("status faults answer without doing the work; hang faults never answer", async () => {
  await withForgejo({}, async (em) => {
    em.addFault({
      method: "POST",
      path: "/releases",
      fault: { kind: "status", status: 503, html: true, retryAfter: 7 },
    });
    const busy = await call(em, "POST", "/releases", { json: { tag_name: "boot-v1" } });
    assert.equal(busy.status, 503);
    assert.equal(busy.headers.get("retry-after"), "7");
    assert.match(busy.text, /nginx/);
    assert.deepEqual(em.releases(), []);

    em.addFault({ path: "/version", fault: { kind: "hang" } });
    const hung = fetch(`${em.url}/api/v1/version`, { signal: AbortSignal.timeout(200) });
    await assert.rejects(hung);
    assert.equal(em.requests.at(-1)?.status, 0);
  });
});

/** A time as Forgejo renders it: RFC 3339 in whole seconds. */
function rfc3339(date: Date): string {
  return date.toISOString().replace(/\.\d{3}Z$/, "Z");
}

Deno.test("setNow stamps releases and assets, and the list orders by those times", async () => {
  const tenDaysAgo = new Date(Math.floor(Date.now() / 1000) * 1000 - 10 * 24 * 3600_000);
  await withForgejo({}, async (em) => {
    const current = await createRelease(em, { tag_name: "boot-v2" });
    em.setNow(tenDaysAgo);
    const old = await createRelease(em, { tag_name: "boot-v1" });
    const asset = (await upload(em, old.id, "boot.iso", bytesOf("iso"))).json;
    const draft = await createRelease(em, { tag_name: "boot-v3", draft: true });
    for (const stamp of [old.created_at, old.published_at, asset.created_at, draft.created_at]) {
      assert.equal(stamp, rfc3339(tenDaysAgo));
    }
    const byTime = await call(em, "GET", "/releases");
    assert.deepEqual(byTime.json.map((r: { tag_name: string }) => r.tag_name), [
      "boot-v2",
      "boot-v3", // same second as boot-v1: the higher id comes first
      "boot-v1",
    ]);

    em.setNow();
    const published = await call(em, "PATCH", `/releases/${draft.id}`, { json: { draft: false } });
    const publishedAt = Date.parse(published.json.published_at);
    assert.ok(Math.abs(publishedAt - Date.now()) < 5_000, published.json.published_at);
    assert.ok(publishedAt >= Date.parse(current.created_at));
    const afterPublish = await call(em, "GET", "/releases");
    assert.equal(afterPublish.json[0].tag_name, "boot-v3");
  });
});

Deno.test("EmulatorOptions.now is the clock setNow() without a date returns to", async () => {
  const start = new Date("2026-01-02T03:04:05Z");
  await withForgejo({ now: () => start }, async (em) => {
    assert.equal((await createRelease(em, { tag_name: "v1" })).created_at, "2026-01-02T03:04:05Z");
    em.setNow(new Date("2025-06-07T08:09:10.999Z"));
    assert.equal((await createRelease(em, { tag_name: "v2" })).created_at, "2025-06-07T08:09:10Z");
    em.setNow();
    assert.equal((await createRelease(em, { tag_name: "v3" })).created_at, "2026-01-02T03:04:05Z");
  });
});

Deno.test("ignorePaging answers page 1 whatever page is asked, with headers as if it paged", async () => {
  await withForgejo({ ignorePaging: true }, async (em) => {
    for (const tag of ["v1", "v2", "v3"]) await createRelease(em, { tag_name: tag });
    const first = await call(em, "GET", "/releases?limit=2");
    const second = await call(em, "GET", "/releases?limit=2&page=2");
    for (const page of [first, second]) {
      assert.deepEqual(page.json.map((r: { tag_name: string }) => r.tag_name), ["v3", "v2"]);
      assert.equal(page.headers.get("x-total-count"), "3");
    }
    assert.match(first.headers.get("link") ?? "", /[?&]page=2>; rel="next"/);
    const secondLink = second.headers.get("link") ?? "";
    assert.match(secondLink, /[?&]page=1>; rel="prev"/);
    assert.doesNotMatch(secondLink, /rel="next"/);
  });
});

Deno.test("a trickle fault sends the status and headers at once, then the normal body slowly", async () => {
  await withForgejo({}, async (em) => {
    const version = `${em.url}/api/v1/version`;
    const normal = await call(em, "GET", version);
    em.addFault({ path: "/version", fault: { kind: "trickle", bytesPerSecond: 100 } });
    const started = performance.now();
    const res = await fetch(version);
    const headersMs = performance.now() - started;
    assert.equal(res.status, 200);
    assert.equal(res.headers.get("content-length"), String(normal.text.length));
    assert.equal(await res.text(), normal.text);
    const bodyMs = performance.now() - started;
    assert.ok(headersMs < 200, `headers took ${headersMs} ms`);
    // 34 bytes at 100 bytes a second: 10-byte pieces 100 ms apart.
    assert.ok(bodyMs >= 250, `the body took only ${bodyMs} ms`);
  });
});

Deno.test("a trickle fault at its default pace sends one byte a second until close()", async () => {
  const em = await startForgejo({});
  let reading: Promise<unknown> | undefined;
  try {
    em.addFault({ path: "/releases", fault: { kind: "trickle" } });
    const res = await fetch(`${em.url}/api/v1/repos/ops/runners/releases`);
    assert.equal(res.status, 200);
    const reader = res.body!.getReader();
    assert.equal((await reader.read()).value?.length, 1);
    reading = reader.read();
    const quiet = new Promise((resolve) => setTimeout(() => resolve("nothing yet"), 500));
    assert.equal(await Promise.race([reading, quiet]), "nothing yet");
  } finally {
    await em.close();
  }
  // The socket is gone: the unfinished body fails instead of waiting forever.
  await assert.rejects(reading!);
});

Deno.test("a huge fault streams that many bytes, chunked, or with declareLength a Content-Length", async () => {
  await withForgejo({}, async (em) => {
    const size = 64 * 1024 * 1024 + 5;
    em.addFault({ method: "GET", path: /\/releases$/, fault: { kind: "huge", bytes: size } });
    const res = await fetch(`${em.url}/api/v1/repos/ops/runners/releases`);
    assert.equal(res.status, 200);
    assert.equal(res.headers.get("content-length"), null);
    assert.match(res.headers.get("content-type") ?? "", /application\/json/);
    let total = 0;
    let start = "";
    for await (const chunk of res.body!) {
      if (start.length < 19) start += new TextDecoder().decode(chunk.subarray(0, 19));
      total += chunk.length;
    }
    assert.equal(total, size);
    assert.ok(start.startsWith('[{"id":1},{"id":1},'), start);

    em.addFault({
      path: "/version",
      fault: { kind: "huge", bytes: 1000, declareLength: true, contentType: "text/plain" },
    });
    const declared = await fetch(`${em.url}/api/v1/version`);
    assert.equal(declared.headers.get("content-length"), "1000");
    assert.equal(declared.headers.get("content-type"), "text/plain");
    assert.equal((await declared.bytes()).length, 1000);
    assert.throws(() => em.addFault({ path: "/", fault: { kind: "huge", bytes: -1 } }));
  });
});

Deno.test("a huge fault's body is made as it is read: a client may stop early", async () => {
  await withForgejo({}, async (em) => {
    em.addFault({ path: "/version", fault: { kind: "huge", bytes: Number.MAX_SAFE_INTEGER } });
    const res = await fetch(`${em.url}/api/v1/version`);
    const reader = res.body!.getReader();
    let read = 0;
    while (read < 1024 * 1024) read += (await reader.read()).value!.length;
    await reader.cancel();
    // A body of 8 PiB was never built: the emulator still answers at once.
    const after = await call(em, "GET", `${em.url}/api/v1/version`);
    assert.equal(after.status, 200);
  });
});

Deno.test("a store-then-reset fault stores the whole upload and drops the answer", async () => {
  await withForgejo({}, async (em) => {
    const rel = await createRelease(em, { tag_name: "boot-v1" });
    em.addFault({
      path: "/assets",
      query: { name: "boot.iso" },
      fault: { kind: "store-then-reset" },
    });
    // Only an upload uses the fault up.
    assert.equal((await call(em, "GET", `/releases/${rel.id}/assets?name=boot.iso`)).status, 200);
    const bytes = new Uint8Array(256 * 1024).fill(7);
    // A fresh client: Deno's fetch re-sends on a dropped reused connection.
    const client = Deno.createHttpClient({});
    try {
      const query = "?name=boot.iso";
      await assert.rejects(
        call(em, "POST", `/releases/${rel.id}/assets${query}`, { bytes, client }),
      );
    } finally {
      client.close();
    }
    const lost = em.requests.at(-1)!;
    assert.equal(lost.status, 0);
    assert.equal(lost.bodyBytes, bytes.length);
    assert.deepEqual(await em.assetBytes(rel.id, "boot.iso"), [bytes]);
    const listed = await call(em, "GET", `/releases/${rel.id}/assets`);
    assert.deepEqual(
      listed.json.map((a: { name: string; size: number }) => [a.name, a.size]),
      [["boot.iso", bytes.length]],
    );
  });
});

Deno.test("a store-then-reset fault also hits multipart uploads", async () => {
  await withForgejo({}, async (em) => {
    const rel = await createRelease(em, { tag_name: "boot-v1" });
    em.addFault({ path: "/assets", fault: { kind: "store-then-reset" } });
    const form = new FormData();
    form.append("attachment", new Blob(["sums"]), "SHA256SUMS");
    const client = Deno.createHttpClient({});
    try {
      await assert.rejects(
        fetch(`${em.url}/api/v1/repos/ops/runners/releases/${rel.id}/assets`, {
          method: "POST",
          headers: { authorization: `token ${TOKEN}` },
          body: form,
          client,
        }),
      );
    } finally {
      client.close();
    }
    assert.deepEqual(await em.assetBytes(rel.id, "SHA256SUMS"), [bytesOf("sums")]);
  });
});

Deno.test("a redirect fault answers its status and Location without doing the work", async () => {
  await withForgejo({}, async (em) => {
    const port = new URL(em.url).port;
    const elsewhere = `http://localhost:${port}/api/v1/repos/ops/runners/releases`;
    em.addFault({
      method: "POST",
      path: "/releases",
      fault: { kind: "redirect", location: elsewhere, status: 307 },
    });
    const moved = await call(em, "POST", "/releases", { json: { tag_name: "boot-v1" } });
    assert.equal(moved.status, 307);
    assert.equal(moved.headers.get("location"), elsewhere);
    assert.deepEqual(em.releases(), []);

    const repository = `${em.url}/api/v1/repos/ops/runners`;
    em.addFault({ path: "/version", fault: { kind: "redirect", location: repository } });
    const followed = await fetch(`${em.url}/api/v1/version`);
    assert.equal(followed.redirected, true);
    assert.equal((await followed.json()).full_name, "ops/runners");
    assert.deepEqual(em.requests.slice(-2).map((r) => [r.path, r.status]), [
      ["/api/v1/version", 302],
      ["/api/v1/repos/ops/runners", 200],
    ]);
    assert.throws(() =>
      em.addFault({ path: "/", fault: { kind: "redirect", location: "/relative" } })
    );
  });
});

Deno.test("DELETE /tags: 409 while a release or draft holds the tag, 404 when absent, else 204", async () => {
  await withForgejo({}, async (em) => {
    assert.equal((await call(em, "DELETE", "/tags/boot-v1")).status, 404);
    // A draft holds its tag name even though it created no git tag yet.
    const draft = await createRelease(em, { tag_name: "boot-v1", draft: true });
    const held = await call(em, "DELETE", "/tags/boot-v1");
    assert.equal(held.status, 409);
    assert.equal(held.json.message, "a tag attached to a release cannot be deleted directly");
    assert.equal((await call(em, "DELETE", `/releases/${draft.id}`)).status, 204);
    assert.equal((await call(em, "DELETE", "/tags/boot-v1")).status, 404);

    em.addTag("boot-v2", BUILT_SHA);
    const onTag = await createRelease(em, { tag_name: "boot-v2", draft: true });
    assert.equal((await call(em, "DELETE", "/tags/boot-v2")).status, 409);
    const published = await createRelease(em, { tag_name: "boot-v3" });
    assert.equal((await call(em, "DELETE", "/tags/boot-v3")).status, 409);
    assert.deepEqual(em.tags(), { "boot-v2": BUILT_SHA, "boot-v3": DEFAULT_SHA });

    assert.equal((await call(em, "DELETE", `/releases/${published.id}`)).status, 204);
    assert.equal((await call(em, "GET", "/tags/boot-v3")).json.commit.sha, DEFAULT_SHA);
    assert.equal((await call(em, "DELETE", "/releases/tags/boot-v2")).status, 204);
    assert.equal((await call(em, "GET", `/releases/${onTag.id}`)).status, 404);
    assert.deepEqual(em.tags(), { "boot-v2": BUILT_SHA, "boot-v3": DEFAULT_SHA });
    assert.equal((await call(em, "DELETE", "/releases/tags/boot-v2")).status, 404);

    assert.equal((await call(em, "DELETE", "/tags/BOOT-V3")).status, 204);
    assert.equal((await call(em, "DELETE", "/tags/boot-v2")).status, 204);
    assert.deepEqual(em.tags(), {});
    assert.equal((await call(em, "DELETE", "/tags/boot-v3")).status, 404);
  });
});

Deno.test("a draft targeting the branch name tags wherever the branch is when it is published", async () => {
  await withForgejo({ defaultBranchSha: BUILT_SHA }, async (em) => {
    const draft = await createRelease(em, {
      tag_name: "boot-v1",
      target_commitish: "main",
      draft: true,
    });
    assert.equal(draft.target_commitish, "main");
    assert.deepEqual(em.tags(), {});
    em.setDefaultBranchHead(OTHER_SHA); // a push lands between the build and the publish
    const published = await call(em, "PATCH", `/releases/${draft.id}`, { json: { draft: false } });
    assert.equal(published.status, 200);
    assert.equal((await call(em, "GET", "/tags/boot-v1")).json.commit.sha, OTHER_SHA);
  });
});

Deno.test("tamper replaces an asset's stored bytes and size behind the API", async () => {
  await withForgejo({}, async (em) => {
    const rel = await createRelease(em, { tag_name: "boot-v1" });
    await upload(em, rel.id, "boot.iso", bytesOf("0123456789"));
    await em.tamper(rel.id, "boot.iso", bytesOf("evil"));
    const url = `${em.url}/ops/runners/releases/download/boot-v1/boot.iso`;
    const download = await call(em, "GET", url, { token: null });
    assert.equal(download.text, "evil");
    assert.equal(download.headers.get("content-length"), "4");
    assert.equal((await call(em, "GET", `/releases/${rel.id}/assets`)).json[0].size, 4);
    assert.deepEqual(await em.assetBytes(rel.id, "boot.iso"), [bytesOf("evil")]);
    await assert.rejects(em.tamper(rel.id, "missing.iso", bytesOf("x")), /missing\.iso/);
  });
});

Deno.test("a rule with `after` lets that many matching requests through, then hits", async () => {
  await withForgejo({}, async (em) => {
    const rel = await createRelease(em, { tag_name: "boot-v1" });
    em.addFault({
      method: "POST",
      path: "/assets",
      after: 2,
      times: 2,
      fault: { kind: "status", status: 500 },
    });
    const statuses = [];
    for (const name of ["a", "b", "c", "d", "e"]) {
      statuses.push((await upload(em, rel.id, name, bytesOf(name))).status);
    }
    assert.deepEqual(statuses, [201, 201, 500, 500, 201]);
  });
});

Deno.test("answer faults lie without doing the work; edit faults rewrite the real answer", async () => {
  await withForgejo({}, async (em) => {
    await createRelease(em, { tag_name: "boot-v1" });
    em.addFault({
      path: "/releases/tags/boot-v9",
      fault: { kind: "answer", body: () => ({ tag_name: "boot-v1" }) },
    });
    const lie = await call(em, "GET", "/releases/tags/boot-v9");
    assert.equal(lie.status, 200);
    assert.deepEqual(lie.json, { tag_name: "boot-v1" });

    em.addFault({
      path: "/releases/tags/boot-v1",
      fault: {
        kind: "edit",
        edit: (answer) => ({ ...answer as object, html_url: "file:///elsewhere" }),
      },
    });
    const edited = await call(em, "GET", "/releases/tags/boot-v1");
    assert.equal(edited.status, 200);
    assert.equal(edited.json.tag_name, "boot-v1");
    assert.equal(edited.json.html_url, "file:///elsewhere");
    const next = await call(em, "GET", "/releases/tags/boot-v1");
    assert.equal(next.json.html_url, `${em.url}/ops/runners/releases/tag/boot-v1`);
  });
});

Deno.test("a then fault holds the answer until its change is made: the caller sees the state before", async () => {
  await withForgejo({}, async (em) => {
    const rel = await createRelease(em, { tag_name: "boot-v1", draft: true });
    em.addFault({
      method: "GET",
      path: /\/releases$/,
      fault: {
        kind: "then",
        run: async () => {
          assert.equal(
            (await call(em, "PATCH", `/releases/${rel.id}`, {
              json: { draft: false },
            })).status,
            200,
          );
        },
      },
    });
    const listed = await call(em, "GET", "/releases");
    assert.equal(listed.json[0].draft, true, "the list was made before the change");
    assert.equal((await call(em, "GET", `/releases/${rel.id}`)).json.draft, false);
  });
});

Deno.test("a pad fault serves more bytes than the file holds and counts what it sent", async () => {
  await withForgejo({}, async (em) => {
    const rel = await createRelease(em, { tag_name: "boot-v1" });
    await upload(em, rel.id, "initrd", bytesOf("0123456789"));
    const url = `${em.url}/ops/runners/releases/download/boot-v1/initrd`;
    em.addFault({ path: "/releases/download/", fault: { kind: "pad", bytes: 100_000 } });
    const padded = await call(em, "GET", url, { token: null });
    assert.equal(padded.status, 200);
    assert.equal(padded.headers.get("content-length"), "100010");
    assert.equal(padded.text.slice(0, 10), "0123456789");
    assert.equal(padded.text.length, 100_010);
    assert.equal(em.requests.at(-1)?.sentBytes, 100_010);
    assert.equal((await call(em, "GET", url, { token: null })).text, "0123456789");
    assert.throws(() => em.addFault({ path: "/", fault: { kind: "pad", bytes: -1 } }));
  });
});

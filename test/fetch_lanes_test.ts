/**
 * fetch downloads a few files at once: one that stalls does not hold up the others, no more
 * than a few are open at a time, and the first failure stops the rest at once, in one line,
 * with nothing written to DIR after it. The releases are made by hand through the API (an
 * iPXE script, the files it boots and SHA256SUMS), so no nix build is needed.
 */
import assert from "node:assert/strict";
import * as fs from "node:fs/promises";
import * as os from "node:os";
import * as path from "node:path";
import { type Release } from "../types/forgejo.ts";
import { type Run } from "./run_helpers.ts";
import { sha256, TOKEN, type World, world } from "./forgejo_world.ts";

const TAG = "boot-v3.0.0";

/** A release of `files` and their SHA256SUMS, made through the API as another tool would. */
async function releaseByHand(w: World, files: Record<string, Uint8Array>): Promise<Release> {
  const api = `${w.forgejo.url}/api/v1/repos/ops/runners/releases`;
  const auth = { authorization: `token ${TOKEN}` };
  const created = await fetch(api, {
    method: "POST",
    headers: { ...auth, "content-type": "application/json" },
    body: JSON.stringify({ tag_name: TAG, target_commitish: w.work.commit, name: TAG }),
  });
  assert.equal(created.status, 201);
  const { id } = await created.json();
  const sums = Object.entries(files).map(([name, bytes]) => `${sha256(bytes)}  ${name}\n`);
  const all = { ...files, SHA256SUMS: new TextEncoder().encode(sums.join("")) };
  for (const [name, bytes] of Object.entries(all)) {
    const stored = await fetch(`${api}/${id}/assets?name=${name}`, {
      method: "POST",
      headers: { ...auth, "content-type": "application/octet-stream" },
      body: bytes,
    });
    await stored.body?.cancel();
    assert.equal(stored.status, 201);
  }
  return w.release();
}

/** A boot script naming `kernel` and `initrds`, and those files with `size` bytes each. */
function bootFiles(
  kernel: string,
  initrds: string[],
  size = 4096,
): Record<string, Uint8Array> {
  const script = [
    "#!ipxe",
    `kernel ${kernel} initrd=${initrds[0]}`,
    ...initrds.map((name) => `initrd ${name}`),
    "boot",
    "",
  ].join("\n");
  const files: Record<string, Uint8Array> = { "runner.ipxe": new TextEncoder().encode(script) };
  for (const name of [kernel, ...initrds]) {
    files[name] = new Uint8Array(size).fill(name.length + name.charCodeAt(0));
  }
  return files;
}

function downloadsOf(w: World, release: Release, name: string): number[] {
  const copy = release.assets.find((asset) => asset.name === name);
  assert.ok(copy, name);
  return w.forgejo.requests.flatMap((request, at) =>
    request.method === "GET" && request.path === `/attachments/${copy.uuid}` ? [at] : []
  );
}

/** Every path under `dir` with its size, so two listings show whether anything changed. */
async function listing(dir: string): Promise<string[]> {
  const entries = await fs.readdir(dir, { recursive: true, withFileTypes: true });
  return await Promise.all(
    entries.map(async (entry) => {
      const file = path.join(entry.parentPath, entry.name);
      return `${path.relative(dir, file)} ${(await fs.lstat(file)).size}`;
    }),
  ).then((lines) => lines.sort());
}

function problemLines(run: Run): string[] {
  return run.stderr.split("\n").filter((line) => line.startsWith("release-boot:"));
}

async function scene(test: (w: World, out: string) => Promise<void>): Promise<void> {
  const w = await world();
  const out = await fs.mkdtemp(path.join(os.tmpdir(), "release-boot-lanes-"));
  try {
    await test(w, out);
  } finally {
    await w.close();
    await fs.rm(out, { recursive: true, force: true });
  }
}

Deno.test("while one download stalls, the other files are fetched beside it", () =>
  scene(async (w, out) => {
    const release = await releaseByHand(w, bootFiles("bzImage", ["initrd"]));
    const kernel = release.assets.find((asset) => asset.name === "bzImage");
    // The kernel's first answer never comes; its retry, after --timeout, is served.
    w.forgejo.addFault({
      method: "GET",
      path: `/attachments/${kernel?.uuid}`,
      fault: { kind: "hang" },
    });
    const run = await w.fetch(out, ["--tag", TAG, "--timeout", "1"]);
    assert.equal(run.code, 0, run.stderr);
    const [, retried] = downloadsOf(w, release, "bzImage");
    const [script] = downloadsOf(w, release, "runner.ipxe").slice(-1);
    const [initrd] = downloadsOf(w, release, "initrd");
    assert.ok(initrd < retried, "the initrd was asked for while the kernel stalled");
    assert.ok(script < retried, "so did the script");
    assert.match(run.stderr, /^boot-v3\.0\.0: 3 files verified/m);
  }));

Deno.test("no more than three downloads are open at once", () =>
  scene(async (w, out) => {
    const initrds = ["initrd-1", "initrd-2", "initrd-3", "initrd-4"];
    const release = await releaseByHand(w, bootFiles("bzImage", initrds));
    // Every image's first answer stalls for --timeout; the script comes at once.
    const images = ["bzImage", ...initrds];
    for (const name of images) {
      w.forgejo.addFault({
        method: "GET",
        path: `/attachments/${release.assets.find((asset) => asset.name === name)?.uuid}`,
        fault: { kind: "hang" },
      });
    }
    const run = await w.fetch(out, ["--tag", TAG, "--timeout", "1"]);
    assert.equal(run.code, 0, run.stderr);
    const gets = images.map((name) => downloadsOf(w, release, name));
    assert.ok(gets.every((at) => at.length === 2), "each image stalled once, then came");
    const firstRetry = Math.min(...gets.map(([, retry]) => retry));
    assert.deepEqual(
      gets.map(([first]) => first < firstRetry),
      [true, true, true, false, false],
      "three stalled at once (the script took the third lane first, briefly); the rest waited",
    );
    assert.match(run.stderr, /^boot-v3\.0\.0: 6 files verified/m);
  }));

Deno.test(
  "the first failure stops the other downloads at once, in one line; nothing is written after it",
  () =>
    scene(async (w, out) => {
      const files = bootFiles("bzImage", ["initrd"], 64 << 10);
      const release = await releaseByHand(w, files);
      const copy = (name: string) => release.assets.find((asset) => asset.name === name);
      // The kernel's bytes were swapped in storage, and arrive within a second; the initrd
      // trickles in at 100 bytes a second, so it is still arriving when the kernel fails.
      await w.forgejo.tamper(release.id, "bzImage", new Uint8Array(2000).fill(7));
      w.forgejo.addFault({
        method: "GET",
        path: `/attachments/${copy("bzImage")?.uuid}`,
        fault: { kind: "trickle", bytesPerSecond: 2000 },
      });
      w.forgejo.addFault({
        method: "GET",
        path: `/attachments/${copy("initrd")?.uuid}`,
        fault: { kind: "trickle", bytesPerSecond: 100 },
      });
      const started = Date.now();
      const run = await w.fetch(out, ["--tag", TAG, "--timeout", "30"]);
      const took = Date.now() - started;
      assert.equal(run.code, 1, run.stderr);
      assert.deepEqual(problemLines(run).length, 1, run.stderr);
      assert.match(
        problemLines(run)[0],
        /^release-boot: bzImage does not match SHA256SUMS \(expected [0-9a-f]{64}, got [0-9a-f]{64} for 2000 bytes\); the download was deleted/,
      );
      assert.doesNotMatch(run.stderr, /initrd.*(stopped|aborted)/i, "the stopped one says nothing");
      // Waiting out the initrd would take minutes (its deadline is 5 x --timeout).
      assert.ok(took < 20_000, `fetch took ${took} ms: the initrd was not stopped`);

      const left = await listing(out);
      await new Promise((resolve) => setTimeout(resolve, 500));
      assert.deepEqual(await listing(out), left, "nothing changed in DIR after fetch exited");
      const names = left.map((line) => line.split(" ")[0]);
      assert.ok(!names.includes(".release-boot.lock"), `lock released: ${names}`);
      assert.ok(!names.includes("current"), "nothing to boot was pointed at");
      const initrdPart = `initrd.${sha256(files.initrd).slice(0, 16)}.part`;
      for (const name of names.filter((name) => name.startsWith(`${TAG}/`))) {
        assert.ok(
          [".release-boot-tag", "runner.ipxe", initrdPart].includes(path.basename(name)),
          `only verified files and a part to resume are left, not ${name}`,
        );
      }

      // The swapped kernel put back, the same command finishes the job.
      await w.forgejo.tamper(release.id, "bzImage", files.bzImage);
      const rerun = await w.fetch(out, ["--tag", TAG]);
      assert.equal(rerun.code, 0, rerun.stderr);
      if (names.includes(`${TAG}/${initrdPart}`)) {
        assert.match(rerun.stderr, /^initrd: resuming after \d+ B/m);
      }
      assert.equal(
        sha256(await fs.readFile(path.join(out, "current", "initrd"))),
        sha256(files.initrd),
      );
    }),
);

Deno.test("a part left for one file survives fetching a file whose name starts like it", () =>
  scene(async (w, out) => {
    // "netboot" is fetched beside "netboot.efi", and must not take its part for its own.
    const files = bootFiles("netboot.efi", ["netboot"]);
    const release = await releaseByHand(w, files);
    const kernel = `/attachments/${
      release.assets.find((asset) => asset.name === "netboot.efi")?.uuid
    }`;
    w.forgejo.addFault({ method: "GET", path: kernel, fault: { kind: "status", status: 404 } });
    assert.equal((await w.fetch(out, ["--tag", TAG])).code, 1);
    // What a fetch stopped 500 bytes into the kernel leaves; the initrd is fetched again.
    const part = `netboot.efi.${sha256(files["netboot.efi"]).slice(0, 16)}.part`;
    await fs.writeFile(path.join(out, TAG, part), files["netboot.efi"].subarray(0, 500));
    await fs.rm(path.join(out, TAG, "netboot"), { force: true });

    // The rest of the kernel takes a second to come, while the initrd is fetched.
    w.forgejo.addFault({
      method: "GET",
      path: kernel,
      fault: { kind: "trickle", bytesPerSecond: 4096 },
    });
    const run = await w.fetch(out, ["--tag", TAG]);
    assert.equal(run.code, 0, run.stderr);
    assert.match(run.stderr, /^netboot\.efi: resuming after 500 B/m);
    assert.equal(
      sha256(await fs.readFile(path.join(out, "current", "netboot.efi"))),
      sha256(files["netboot.efi"]),
    );
  }));

Deno.test("an empty part, left by a fetch stopped before its first byte, does not stop the next", () =>
  scene(async (w, out) => {
    const files = bootFiles("bzImage", ["initrd"]);
    const release = await releaseByHand(w, files);
    const initrd = release.assets.find((asset) => asset.name === "initrd");
    w.forgejo.addFault({
      method: "GET",
      path: `/attachments/${initrd?.uuid}`,
      fault: { kind: "status", status: 404 },
    });
    assert.equal((await w.fetch(out, ["--tag", TAG])).code, 1);
    const part = `initrd.${sha256(files.initrd).slice(0, 16)}.part`;
    await fs.writeFile(path.join(out, TAG, part), "");

    const run = await w.fetch(out, ["--tag", TAG]);
    assert.equal(run.code, 0, run.stderr);
    assert.equal(
      sha256(await fs.readFile(path.join(out, "current", "initrd"))),
      sha256(files.initrd),
    );
  }));

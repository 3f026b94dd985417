/** `release-boot fetch`: from a published release to a directory a PXE server can serve. */
import assert from "node:assert/strict";
import * as fs from "node:fs/promises";
import * as os from "node:os";
import * as path from "node:path";
import { nixTest } from "./nix_helpers.ts";
import { runMain, runRelease, sha256sumCheck } from "./run_helpers.ts";
import { sha256, TAG, TOKEN, uploadBehindItsBack, type World, world } from "./forgejo_world.ts";

const NETBOOT_FILES = [
  ".release-boot-tag",
  "SHA256SUMS",
  "netboot-x86_64-linux.built.ipxe",
  "netboot-x86_64-linux.bzImage",
  "netboot-x86_64-linux.initrd",
  "netboot-x86_64-linux.ipxe",
  "netboot.ipxe",
];

function fetchInto(w: World, out: string, args: string[] = [], token?: string) {
  return w.fetch(out, args, token ? { FORGEJO_TOKEN: token } : {});
}

async function scratch(): Promise<string> {
  return await fs.mkdtemp(path.join(os.tmpdir(), "release-boot-pxe-"));
}

nixTest(
  "fetch lays out a verified directory anonymously, with netboot.ipxe loading from beside it",
  async () => {
    // Child processes, as operators run them: the end-to-end check of a fetch.
    const w = await world({}, "one", runRelease);
    const out = await scratch();
    try {
      assert.equal((await w.publish(["--targets", "netboot,iso"])).code, 0);
      const release = w.release();
      const [published] = await w.forgejo.assetBytes(release.id, "netboot-x86_64-linux.ipxe");
      const base = `${w.forgejo.url}/ops/runners/releases/download/${TAG}/`;
      assert.match(
        new TextDecoder().decode(published),
        new RegExp(
          `^kernel ${base}netboot-x86_64-linux\\.bzImage .*initrd=netboot-x86_64-linux\\.initrd .*\\$\\{cmdline\\}$`,
          "m",
        ),
      );
      assert.match(
        new TextDecoder().decode(published),
        new RegExp(`^initrd ${base}netboot-x86_64-linux\\.initrd$`, "m"),
      );

      const mark = w.forgejo.requests.length;
      const run = await fetchInto(w, out, ["--tag", TAG]);
      assert.equal(run.code, 0, run.stderr);
      assert.equal(run.stdout.trim(), path.join(out, TAG));
      assert.deepEqual((await fs.readdir(out)).sort(), [TAG, "current"]);
      assert.equal(await fs.readlink(path.join(out, "current")), TAG);
      const current = path.join(out, "current");
      assert.deepEqual(
        (await fs.readdir(current)).sort(),
        NETBOOT_FILES,
        "netboot only, no iso, no partial files",
      );
      assert.equal((await sha256sumCheck(current)).code, 0);
      assert.equal(
        run.stderr.split("\n").filter((line) => /authenticity/.test(line)).length,
        1,
        "one line says the files were checked for integrity, not authenticity",
      );
      const local = await fs.readFile(path.join(current, "netboot.ipxe"), "utf8");
      assert.match(
        local,
        /^kernel netboot-x86_64-linux\.bzImage init=\S+\/init initrd=netboot-x86_64-linux\.initrd .*\$\{cmdline\}$/m,
      );
      assert.match(local, /^initrd netboot-x86_64-linux\.initrd$/m);
      const anonymous = w.forgejo.requests.slice(mark);
      assert.ok(anonymous.length > 0);
      assert.ok(anonymous.every((r) => r.headers.authorization === undefined), "no token was used");

      const again = await fetchInto(w, out, ["--tag", TAG]);
      assert.equal(again.code, 0, again.stderr);
      assert.match(again.stderr, /netboot-x86_64-linux\.initrd: already here and verified/);
    } finally {
      await fs.rm(out, { recursive: true, force: true });
      await w.close();
    }
  },
);

nixTest(
  "the built iPXE script is downloaded once: the text that chose the boot files is the file kept",
  async () => {
    const w = await world();
    const out = await scratch();
    try {
      assert.equal((await w.publish(["--targets", "netboot"])).code, 0);
      const built = "netboot-x86_64-linux.built.ipxe";
      const copy = w.release().assets.find((a) => a.name === built);
      assert.ok(copy, built);
      const [published] = await w.forgejo.assetBytes(w.release().id, built);
      const run = await fetchInto(w, out, ["--tag", TAG]);
      assert.equal(run.code, 0, run.stderr);
      const downloads = w.forgejo.requests.filter((r) =>
        r.method === "GET" && r.path === `/attachments/${copy.uuid}`
      );
      assert.equal(downloads.length, 1, `${built} was asked for ${downloads.length} times`);
      const current = path.join(out, "current");
      assert.equal(sha256(await fs.readFile(path.join(current, built))), sha256(published));
      assert.equal((await sha256sumCheck(current)).code, 0);
      assert.match(
        run.stderr,
        new RegExp(`^${built.replaceAll(".", "\\.")}: .+, sha256 verified$`, "m"),
      );
    } finally {
      await fs.rm(out, { recursive: true, force: true });
      await w.close();
    }
  },
);

nixTest("a file that does not match SHA256SUMS is refused and nothing of it is left", async () => {
  const w = await world();
  const out = await scratch();
  try {
    assert.equal((await w.publish(["--targets", "netboot"])).code, 0);
    const release = w.release();
    // Someone swaps the initrd behind release-boot's back, keeping its name.
    const api = `${w.forgejo.url}/api/v1/repos/ops/runners/releases/${release.id}/assets`;
    const auth = { authorization: `token ${TOKEN}` };
    const initrd = release.assets.find((a) => a.name === "netboot-x86_64-linux.initrd");
    assert.ok(initrd, "netboot-x86_64-linux.initrd");
    await (await fetch(`${api}/${initrd.id}`, { method: "DELETE", headers: auth })).body?.cancel();
    await uploadBehindItsBack(w, "netboot-x86_64-linux.initrd", "not the initrd that was built");

    const run = await fetchInto(w, out, ["--tag", TAG]);
    assert.equal(run.code, 1);
    assert.match(
      run.stderr,
      /netboot-x86_64-linux\.initrd does not match SHA256SUMS \(expected [0-9a-f]{64}, got [0-9a-f]{64} for 29 bytes\); the download was deleted/,
    );
    const left = await fs.readdir(path.join(out, TAG));
    assert.ok(
      !left.some((name) => name.startsWith("netboot-x86_64-linux.initrd")),
      `left: ${left}`,
    );
    assert.ok(!left.includes("netboot.ipxe"), "no boot script pointing at a missing file");
    assert.ok(!(await fs.readdir(out)).includes("current"), "nothing to boot was pointed at");
  } finally {
    await fs.rm(out, { recursive: true, force: true });
    await w.close();
  }
});

nixTest("an interrupted download resumes where it stopped", async () => {
  const w = await world();
  const out = await scratch();
  try {
    assert.equal((await w.publish(["--targets", "netboot"])).code, 0);
    const [initrd] = await w.forgejo.assetBytes(w.release().id, "netboot-x86_64-linux.initrd");
    // The first fetch stops at the initrd: DIR/<tag> is started, current is not pointed.
    const copy = w.release().assets.find((a) => a.name === "netboot-x86_64-linux.initrd");
    assert.ok(copy, "netboot-x86_64-linux.initrd");
    w.forgejo.addFault({
      method: "GET",
      path: `/attachments/${copy.uuid}`,
      fault: { kind: "status", status: 404 },
    });
    const stopped = await fetchInto(w, out, ["--tag", TAG]);
    assert.equal(stopped.code, 1, stopped.stderr);
    assert.deepEqual(await fs.readdir(out), [TAG]);
    const dir = path.join(out, TAG);
    // What a fetch killed half-way through the initrd leaves.
    const part = `netboot-x86_64-linux.initrd.${sha256(initrd).slice(0, 16)}.part`;
    await fs.writeFile(path.join(dir, part), initrd.subarray(0, 500));
    // A part left by another release's fetch is never resumed into this one.
    const stale = "netboot-x86_64-linux.initrd.0123456789abcdef.part";
    await fs.writeFile(path.join(dir, stale), "bytes of another initrd");
    const run = await fetchInto(w, out, ["--tag", TAG]);
    assert.equal(run.code, 0, run.stderr);
    assert.match(run.stderr, /netboot-x86_64-linux\.initrd: resuming after 500 B/);
    assert.ok(w.forgejo.requests.some((r) => r.headers.range === "bytes=500-"));
    assert.equal(
      sha256(await fs.readFile(path.join(out, "current", "netboot-x86_64-linux.initrd"))),
      sha256(initrd),
    );
    assert.deepEqual((await fs.readdir(dir)).filter((name) => name.endsWith(".part")), []);
  } finally {
    await fs.rm(out, { recursive: true, force: true });
    await w.close();
  }
});

nixTest("downloads follow a 303 to object storage without sending the token there", async () => {
  const w = await world({ serveDirect: true });
  const out = await scratch();
  try {
    assert.equal((await w.publish(["--targets", "netboot"])).code, 0);
    const run = await fetchInto(w, out, ["--tag", TAG], TOKEN);
    assert.equal(run.code, 0, run.stderr);
    const storage = w.forgejo.requests.filter((r) => r.host === "storage");
    assert.ok(storage.length >= 4, "the files came from the storage host");
    assert.ok(storage.every((r) => r.headers.authorization === undefined));
    assert.doesNotMatch(run.stdout + run.stderr, new RegExp(TOKEN));
    assert.equal((await sha256sumCheck(path.join(out, "current"))).code, 0);
  } finally {
    await fs.rm(out, { recursive: true, force: true });
    await w.close();
  }
});

nixTest("a token is never sent to a server on the mirror list", async () => {
  const w = await world();
  const out = await scratch();
  try {
    assert.equal((await w.publish(["--targets", "netboot"])).code, 0);
    const mark = w.forgejo.requests.length;
    const run = await fetchInto(w, out, ["--tag", TAG, "--mirrors", w.forgejo.url], TOKEN);
    assert.equal(run.code, 0, run.stderr);
    assert.ok(w.forgejo.requests.slice(mark).every((r) => r.headers.authorization === undefined));
  } finally {
    await fs.rm(out, { recursive: true, force: true });
    await w.close();
  }
});

nixTest(
  "latest is the newest published boot-v* release, never a draft or a boot-dev one",
  async () => {
    const w = await world();
    const out = await scratch();
    try {
      assert.equal((await w.publish(["--targets", "netboot", "--tag", "boot-v1.1.0"])).code, 0);
      assert.equal((await w.publish(["--targets", "netboot", "--tag", "boot-v1.2.0"])).code, 0);
      assert.equal(
        (await w.publish(["--targets", "netboot", "--tag", "boot-v2.0.0", "--draft"])).code,
        0,
      );
      assert.equal(
        (await w.publish(["--targets", "netboot", "--tag", "boot-dev-0123456789ab"])).code,
        0,
      );
      const run = await fetchInto(w, out, ["--tag", "latest"]);
      assert.equal(run.code, 0, run.stderr);
      assert.match(run.stderr, /^boot-v1\.2\.0: 4 files verified/m);

      const draft = await fetchInto(w, out, ["--tag", "boot-v2.0.0"], TOKEN);
      assert.equal(draft.code, 1);
      assert.match(
        draft.stderr,
        /boot-v2\.0\.0 is still a draft: publish it before booting from it/,
      );
      const missing = await fetchInto(w, out, ["--tag", "boot-v9.9.9"]);
      assert.equal(missing.code, 1);
      assert.match(
        missing.stderr,
        /ops\/runners has no release boot-v9\.9\.9 that this token can see/,
      );
    } finally {
      await fs.rm(out, { recursive: true, force: true });
      await w.close();
    }
  },
);

Deno.test("fetch says what it needs, one line each", async () => {
  const cases: [string[], RegExp][] = [
    [
      ["fetch", "--repo", "ops/runners", "--tag", "latest", "--out", "x"],
      /fetch needs --server URL/,
    ],
    [
      ["fetch", "--server", "https://git.example.org", "--tag", "latest", "--out", "x"],
      /fetch needs --repo/,
    ],
    [
      ["fetch", "--server", "https://git.example.org", "--repo", "ops/runners", "--out", "x"],
      /fetch needs --tag TAG, or --tag latest/,
    ],
    [
      ["fetch", "--server", "https://git.example.org", "--repo", "ops/runners", "--tag", "latest"],
      /fetch needs --out DIR/,
    ],
    [[
      "fetch",
      "--server",
      "https://git.example.org",
      "--repo",
      "a/b",
      "--tag",
      "v1",
      "--out",
      "x",
      "--replace",
    ], /--replace is a flag of release, not of fetch/],
    [[
      "fetch",
      "--server",
      "https://git.example.org",
      "--repo",
      "a/b",
      "--tag",
      "v1",
      "--out",
      "x",
      "--signing-key",
      "k",
    ], /--signing-key is a flag of release, not of fetch/],
    [
      ["--trust", "allowed_signers", "--dry-run"],
      /--trust is a flag of fetch and verify, not of release/,
    ],
    [
      [
        "fetch",
        "--server",
        "https://git.example.org",
        "--repo",
        "a/b",
        "--tag",
        "v1",
        "--out",
        "x",
        "--keep",
        "0",
      ],
      /--keep/,
    ],
  ];
  for (const [args, message] of cases) {
    const run = await runMain(args);
    assert.equal(run.code, 2, run.stderr);
    assert.equal(run.stderr.trim().split("\n").length, 1);
    assert.match(run.stderr, message);
  }
});

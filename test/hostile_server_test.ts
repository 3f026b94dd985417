/**
 * Publishing against a server that lies, pages forever, trickles or sends gigantic bodies,
 * and against inputs a user gets wrong: each case names the defect it guards against.
 */
import assert from "node:assert/strict";
import * as fs from "node:fs/promises";
import * as os from "node:os";
import * as path from "node:path";
import { nixTest } from "./nix_helpers.ts";
import { baseEnv, exists, runMain, runRelease } from "./run_helpers.ts";
import { assertOneLineFailure } from "./boot_dir_helpers.ts";
import {
  assertNoToken,
  names,
  sha256,
  TAG,
  TOKEN,
  uploadBehindItsBack,
  uploadsOf,
  withWorld,
  type World,
} from "./forgejo_world.ts";

const OTHER_SHA = "f".repeat(40);

/** A POST straight to the API, as another tool (or a person in the web UI) would make it. */
async function apiPost(w: World, route: string, body: unknown): Promise<unknown> {
  const answer = await fetch(`${w.forgejo.url}/api/v1/repos/ops/runners${route}`, {
    method: "POST",
    headers: { authorization: `token ${TOKEN}`, "content-type": "application/json" },
    body: JSON.stringify(body),
  });
  assert.equal(answer.status, 201, await answer.clone().text());
  return await answer.json();
}

/** A local stage of the fixture's netboot target into `out`: no server, no token. */
function stageInto(out: string) {
  return runMain([
    ...["--flake", "path:./test/fixture", "--targets", "netboot"],
    ...["--commit", OTHER_SHA, "--out", out],
  ]);
}

/** Every SHA256SUMS copy's entries each have a stored copy with those bytes. */
async function everySumHasItsBytes(w: World): Promise<void> {
  const release = w.release();
  for (const sums of await w.forgejo.assetBytes(release.id, "SHA256SUMS")) {
    for (const line of new TextDecoder().decode(sums).trim().split("\n")) {
      const [sum, name] = line.split("  ");
      const copies = await w.forgejo.assetBytes(release.id, name);
      assert.ok(
        copies.some((bytes) => sha256(bytes) === sum),
        `${name}: a copy with the bytes SHA256SUMS lists is still there`,
      );
    }
  }
}

nixTest(
  "a draft that names a branch is pinned to the built commit before it is published",
  async () => {
    await withWorld(async (w) => {
      // Someone made the draft by hand on the branch; the branch then moved on.
      await apiPost(w, "/releases", { tag_name: TAG, target_commitish: "main", draft: true });
      w.forgejo.setDefaultBranchHead(OTHER_SHA);
      const run = await w.publish(["--targets", "netboot"]);
      assert.equal(run.code, 0, run.stderr);
      assert.match(run.stderr, /Pinned the draft to commit [0-9a-f]{40} \(it named "main"/);
      assert.equal(w.forgejo.tags()[TAG], w.work.commit, "the tag is on the commit that was built");
      assert.equal(w.release().target_commitish, w.work.commit);
    });
  },
);

nixTest(
  "a server that ignores ?page= ends the release lookup after one repeated page",
  async () => {
    await withWorld(
      async (w) => {
        for (let n = 0; n < 50; n++) {
          await apiPost(w, "/releases", { tag_name: `other-${n}`, draft: true });
        }
        // Paging forever would never end on its own: stop it (a child process) after a minute.
        const run = await w.publish(
          ["--targets", "netboot"],
          {},
          undefined,
          AbortSignal.timeout(60_000),
        );
        assert.equal(run.code, 0, run.stderr);
        const listings = w.forgejo.requests.filter((r) =>
          r.method === "GET" && /\/releases$/.test(r.path)
        );
        assert.ok(listings.length <= 4, `${listings.length} listing requests, not endless paging`);
      },
      { ignorePaging: true, draftsHiddenFromTagLookup: true },
      runRelease,
    );
  },
);

nixTest("a stage refuses an --out that is not an earlier stage, before building", async () => {
  const app = await fs.mkdtemp(path.join(os.tmpdir(), "release-boot-app-"));
  try {
    for (const file of ["manifest.json", "index.html", "src/main.js", ".git/HEAD"]) {
      await fs.mkdir(path.dirname(path.join(app, file)), { recursive: true });
      await fs.writeFile(path.join(app, file), "{}\n");
    }
    const run = await stageInto(app);
    assert.equal(run.code, 2, run.stderr);
    assert.match(run.stderr, /--out .* holds files that are not an earlier stage of release-boot/);
    assert.doesNotMatch(run.stderr, /==> Build/, "refused before any build");
    assert.ok(await exists(path.join(app, "src", "main.js")), "the directory is untouched");
    assert.ok(await exists(path.join(app, ".git", "HEAD")));
  } finally {
    await fs.rm(app, { recursive: true, force: true });
  }
});

nixTest("an --out that is a file is one line, exit 2, before building", async () => {
  const file = await Deno.makeTempFile();
  try {
    const run = await stageInto(file);
    assert.equal(run.code, 2, run.stderr);
    assert.equal(run.stderr.trim().split("\n").length, 1, run.stderr);
    assert.match(run.stderr, /--out .* is not a directory/);
  } finally {
    await fs.rm(file, { force: true });
  }
});

nixTest("an --out under a file is one line naming the call, path and code, exit 1", async () => {
  const file = await Deno.makeTempFile();
  try {
    const run = await stageInto(path.join(file, "out"));
    assertOneLineFailure(
      run,
      new RegExp(
        `^release-boot: cannot mkdir ${file} \\((EEXIST|ENOTDIR)\\): check that this user can write ${file} \\(a directory, not read-only or full\\), then rerun$`,
      ),
    );
  } finally {
    await fs.rm(file, { force: true });
  }
});

nixTest("a stage removes what an interrupted stage left beside --out", async () => {
  const parent = await fs.mkdtemp(path.join(os.tmpdir(), "release-boot-stage-"));
  try {
    const out = path.join(parent, "out");
    const left = `${out}.partial-AbC123`;
    await fs.mkdir(left);
    await fs.writeFile(path.join(left, "netboot-x86_64-linux.initrd"), "half");
    const run = await stageInto(out);
    assert.equal(run.code, 0, run.stderr);
    assert.deepEqual((await fs.readdir(parent)).sort(), ["out"]);
  } finally {
    await fs.rm(parent, { recursive: true, force: true });
  }
});

nixTest(
  "a stage killed while the earlier one was moved aside gets it back, then replaces it",
  async () => {
    const parent = await fs.mkdtemp(path.join(os.tmpdir(), "release-boot-stage-"));
    try {
      const out = path.join(parent, "out");
      assert.equal((await stageInto(out)).code, 0);
      // Where a kill between the two renames leaves things: no out, the earlier stage aside.
      const aside = `${out}.partial-XyZ789.replaced`;
      await fs.rename(out, aside);
      const run = await stageInto(out);
      assert.equal(run.code, 0, run.stderr);
      assert.match(run.stderr, /Put back .*\/out, which an interrupted stage had moved aside/);
      assert.deepEqual((await fs.readdir(parent)).sort(), ["out"]);
      assert.ok((await fs.readdir(out)).includes("SHA256SUMS"));
    } finally {
      await fs.rm(parent, { recursive: true, force: true });
    }
  },
);

nixTest(
  "--replace on a published release keeps every listed copy until the new index is in",
  async () => {
    await withWorld(async (w) => {
      assert.equal((await w.publish(["--targets", "netboot"])).code, 0);
      // Other bytes for the same names; writing the new SHA256SUMS fails every time.
      await fs.writeFile(path.join(w.fixture.dir, "salt.nix"), '"two"\n');
      w.forgejo.addFault({
        method: "POST",
        path: "/assets",
        query: { name: "SHA256SUMS" },
        times: 5, // the tries of one run: the rerun gets through
        fault: { kind: "status", status: 503 },
      });
      const failed = await w.publish(["--targets", "netboot", "--replace"]);
      assert.equal(failed.code, 1, failed.stderr);
      assert.doesNotMatch(
        failed.stderr,
        /stays a draft/,
        "a published release is not called a draft",
      );
      // The new files, manifest.json and the provenance went in before SHA256SUMS failed: all
      // taken back.
      assert.match(
        failed.stderr,
        /the published release boot-v1\.0\.0 is as it was: the 4 copies this run uploaded were deleted again/,
      );
      assert.equal(w.release().draft, false);
      await everySumHasItsBytes(w);

      const rerun = await w.publish(["--targets", "netboot", "--replace"]);
      assert.equal(rerun.code, 0, rerun.stderr);
      const release = w.release();
      assert.equal(new Set(names(release)).size, names(release).length, "every name once");
      await everySumHasItsBytes(w);
    });
  },
);

nixTest(
  "--replace that stops once the new index is in says the release lists only files it holds",
  async () => {
    await withWorld(async (w) => {
      assert.equal((await w.publish(["--targets", "netboot"])).code, 0);
      await fs.writeFile(path.join(w.fixture.dir, "salt.nix"), '"two"\n');
      // The old manifest.json and SHA256SUMS are deleted; deleting the replaced files fails.
      w.forgejo.addFault({
        method: "DELETE",
        path: "/assets/",
        after: 2,
        times: 5,
        fault: { kind: "status", status: 500 },
      });
      const failed = await w.publish(["--targets", "netboot", "--replace"], {
        RELEASE_BOOT_RETRY_DELAY_MS: "1",
      });
      assert.equal(failed.code, 1, failed.stderr);
      assert.match(
        failed.stderr,
        /the published release boot-v1\.0\.0 still has its SHA256SUMS and every copy it lists \(new copies may sit beside them\); rerun the same command to finish/,
      );
      await everySumHasItsBytes(w);

      const rerun = await w.publish(["--targets", "netboot", "--replace"]);
      assert.equal(rerun.code, 0, rerun.stderr);
      const release = w.release();
      assert.equal(new Set(names(release)).size, names(release).length, "every name once");
      await everySumHasItsBytes(w);
    });
  },
);

nixTest("a gigantic API answer is refused in one line instead of being held", async () => {
  await withWorld(async (w) => {
    w.forgejo.addFault({
      method: "GET",
      path: /\/repos\/ops\/runners$/,
      fault: { kind: "huge", bytes: 700 << 20 },
    });
    const run = await w.publish(["--targets", "netboot"]);
    assert.equal(run.code, 1, run.stderr);
    assert.match(run.stderr, /answer to GET .* is larger than 16\.0 MiB/);
    assert.doesNotMatch(run.stderr, /\n\s+at /, "no stack trace");
  });
});

nixTest("an index file larger than any real one is refused, not downloaded", async () => {
  await withWorld(async (w) => {
    await apiPost(w, "/releases", { tag_name: TAG, target_commitish: "", draft: true });
    await uploadBehindItsBack(w, "SHA256SUMS", "x".repeat(2 << 20));
    const run = await w.publish(["--targets", "netboot"]);
    assert.equal(run.code, 1, run.stderr);
    assert.match(run.stderr, /SHA256SUMS of ops\/runners has 2097152 bytes.*refusing to read it/);
    const reads = w.forgejo.requests.filter((r) => r.path.includes("/attachments/"));
    assert.equal(reads.length, 0, "never downloaded");
  });
});

nixTest("a release holding dozens of index copies is refused, not read", async () => {
  await withWorld(async (w) => {
    await apiPost(w, "/releases", { tag_name: TAG, target_commitish: "", draft: true });
    const kinds = [
      "SHA256SUMS",
      "SHA256SUMS.sig",
      "manifest.json",
      "provenance.intoto.json",
      "provenance.intoto.jsonl",
    ];
    // Every kind counts: five copies of each are past the cap as surely as 25 of one.
    for (let n = 0; n < 25; n++) await uploadBehindItsBack(w, kinds[n % 5], `copy ${n}\n`);
    const run = await w.publish(["--targets", "netboot"]);
    assert.equal(run.code, 1, run.stderr);
    assert.match(
      run.stderr,
      /holds 25 copies of SHA256SUMS, SHA256SUMS\.sig, manifest\.json, provenance\.intoto\.json and provenance\.intoto\.jsonl, more than racing jobs ever leave \(24\): refusing to read them; delete the extra copies in Forgejo$/m,
    );
    const reads = w.forgejo.requests.filter((r) => r.path.includes("/attachments/"));
    assert.equal(reads.length, 0, "none was downloaded");
  });
});

nixTest("a server that trickles its answer hits the request's overall deadline", async () => {
  await withWorld(async (w) => {
    w.forgejo.addFault({ method: "GET", path: "/version", fault: { kind: "trickle" } });
    const started = Date.now();
    const run = await w.publish(["--targets", "netboot", "--timeout", "1"]);
    assert.equal(run.code, 1, run.stderr);
    assert.match(run.stderr, /GET \/api\/v1\/version did not finish within 5s/);
    assert.ok(Date.now() - started < 30_000, "it ends");
  });
});

nixTest("an upload stored before the connection dropped is kept, not sent again", async () => {
  await withWorld(async (w) => {
    const name = "netboot-x86_64-linux.initrd";
    w.forgejo.addFault({
      method: "POST",
      path: "/assets",
      query: { name },
      fault: { kind: "store-then-reset" },
    });
    const run = await w.publish(["--targets", "netboot"]);
    assert.equal(run.code, 0, run.stderr);
    assert.match(run.stderr, /stored after all/);
    assert.equal(names(w.release()).filter((n) => n === name).length, 1);
    const posts = w.forgejo.requests.filter((r) => r.method === "POST" && r.query.name === name);
    assert.equal(posts.length, 1, "one POST of the file: the look found it");
    assert.equal(uploadsOf(w.forgejo, name).length, 0, "the only POST got no answer");
  });
});

nixTest("the token never reaches nix or git, and an echoed token is redacted", async () => {
  const stubs = await fs.mkdtemp(path.join(os.tmpdir(), "release-boot-stubs-"));
  try {
    for (const tool of ["nix", "git"]) {
      const real = new TextDecoder().decode(
        (await new Deno.Command("sh", { args: ["-c", `command -v ${tool}`], stdout: "piped" })
          .output()).stdout,
      ).trim();
      await fs.writeFile(
        path.join(stubs, tool),
        `#!/bin/sh\nenv >> "${stubs}/${tool}.env"\nexec ${real} "$@"\n`,
        { mode: 0o755 },
      );
    }
    await new Deno.Command("ssh-keygen", {
      args: ["-q", "-t", "ed25519", "-N", "", "-C", "release-boot", "-f", `${stubs}/key`],
    }).output();
    const key = await fs.readFile(`${stubs}/key`, "utf8");
    const keyBody = key.split("\n")[1];
    await withWorld(async (w) => {
      // A server (or proxy) that quotes the credential back in its error.
      w.forgejo.addFault({
        method: "POST",
        path: /\/releases$/,
        fault: { kind: "status", status: 400, message: `bad token ${TOKEN}` },
      });
      const run = await w.publish(["--targets", "netboot"], {
        PATH: `${stubs}:${baseEnv().PATH}`,
        RELEASE_BOOT_SIGNING_KEY: key,
      });
      assert.equal(run.code, 1, run.stderr);
      assert.match(run.stderr, /bad token \*\*\*/, "the echoed token is shown as ***");
      assertNoToken(run, w.forgejo);
      assert.ok(!run.stderr.includes(keyBody), "the key never appears in output");
      for (const tool of ["nix", "git"]) {
        const seen = await fs.readFile(path.join(stubs, `${tool}.env`), "utf8");
        assert.ok(seen.length > 0, `${tool} ran`);
        assert.doesNotMatch(seen, new RegExp(TOKEN), `${tool} never sees the token`);
        assert.ok(!seen.includes(keyBody), `${tool} never sees the key`);
      }
    });
  } finally {
    await fs.rm(stubs, { recursive: true, force: true });
  }
});

nixTest(
  "a redirect to another origin, even the same host spelled otherwise, loses the token",
  async () => {
    await withWorld(async (w) => {
      const other = w.forgejo.url.replace("127.0.0.1", "localhost");
      w.forgejo.addFault({
        method: "GET",
        path: "/version",
        fault: { kind: "redirect", location: `${other}/api/v1/version`, status: 302 },
      });
      const run = await w.publish(["--targets", "netboot"]);
      assert.equal(run.code, 0, run.stderr);
      const versions = w.forgejo.requests.filter((r) => r.path === "/api/v1/version");
      assert.equal(versions.length, 2, "the redirect was followed");
      assert.equal(versions[0].headers.authorization, `token ${TOKEN}`);
      assert.equal(versions[1].headers.authorization, undefined, "no token to another origin");
    });
  },
);

Deno.test("bad repository names, tokens and mirror spellings are refused before any request", async (t) => {
  const cases: { name: string; args: string[]; env?: Record<string, string>; message: RegExp }[] = [
    {
      name: "--repo ../admin",
      args: ["--server", "http://127.0.0.1:9", "--repo", "../admin"],
      message: /bad --repo "\.\.\/admin": the owner "\.\." is not a Forgejo user/,
    },
    {
      name: "a token ending in a carriage return",
      args: ["--server", "http://127.0.0.1:9", "--repo", "ops/runners"],
      env: { FORGEJO_TOKEN: `${TOKEN}\r` },
      message: /FORGEJO_TOKEN contains whitespace or a control character/,
    },
    {
      name: "the mirror with a trailing dot",
      args: ["--repo", "ops/runners", "--server", "https://codeberg.org."],
      message: /refusing to publish to https:\/\/codeberg\.org\.: it is on the mirror list/,
    },
    {
      name: "a loopback mirror under another loopback name",
      args: [
        "--repo",
        "ops/runners",
        "--server",
        "http://localhost:9",
        "--mirrors",
        "http://127.0.0.1:9",
      ],
      message: /refusing to publish to http:\/\/localhost:9: it is on the mirror list/,
    },
  ];
  for (const c of cases) {
    await t.step(c.name, async () => {
      const run = await runMain(
        ["--commit", OTHER_SHA, ...c.args],
        { env: baseEnv({ FORGEJO_TOKEN: TOKEN, ...c.env }) },
      );
      assert.notEqual(run.code, 0, run.stderr);
      const lines = run.stderr.trim().split("\n");
      assert.equal(lines.length, 1, run.stderr);
      assert.match(lines[0], c.message);
      assert.doesNotMatch(run.stderr, /ECONNREFUSED|retrying/, "no request was sent");
    });
  }
});

Deno.test("a CI repository or run id that would change the run's URL is a usage error", async (t) => {
  const ci = { GITHUB_SERVER_URL: "https://git.example.org", GITHUB_RUN_ID: "42" };
  const cases: [string, Record<string, string>, string][] = [
    [
      "GITHUB_REPOSITORY beside --repo",
      { ...ci, GITHUB_REPOSITORY: "ops/runners/../../admin" },
      'release-boot: bad GITHUB_REPOSITORY "ops/runners/../../admin": a repository is written OWNER/NAME',
    ],
    [
      "GITHUB_RUN_ID",
      { ...ci, GITHUB_REPOSITORY: "ops/runners", GITHUB_RUN_ID: "42/../../settings" },
      `release-boot: bad GITHUB_RUN_ID "42/../../settings": a CI run's id is digits`,
    ],
  ];
  for (const [name, env, line] of cases) {
    await t.step(name, async () => {
      const run = await runMain(
        ["--commit", OTHER_SHA, "--server", "http://127.0.0.1:9", "--repo", "ops/runners"],
        { env: baseEnv({ FORGEJO_TOKEN: TOKEN, ...env }) },
      );
      assert.equal(run.code, 2, run.stderr);
      assert.deepEqual(run.stderr.trim().split("\n"), [line]);
    });
  }
});

Deno.test("a FIFO or a link to /dev/zero as a key, a trust file or a stage's SHA256SUMS is one line, never a hang", async (t) => {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), "release-boot-planted-"));
  try {
    const plants: [string, (at: string) => Promise<void>][] = [
      ["a FIFO", async (at) => {
        const made = await new Deno.Command("mkfifo", { args: [at] }).output();
        assert.ok(made.success, `mkfifo ${at}`);
      }],
      ["a link to /dev/zero", (at) => fs.symlink("/dev/zero", at)],
    ];
    for (const [n, [name, plant]] of plants.entries()) {
      const planted = path.join(dir, `planted-${n}`);
      await plant(planted);
      const out = path.join(dir, `out-${n}`);
      await fs.mkdir(out);
      await fs.writeFile(path.join(out, "manifest.json"), "{}\n");
      await plant(path.join(out, "SHA256SUMS"));
      const cases: [string, string[], string][] = [
        [
          "--signing-key",
          ["--commit", OTHER_SHA, "--signing-key", planted],
          `release-boot: --signing-key ${planted}: not a regular file`,
        ],
        [
          "--trust",
          [
            ...["fetch", "--server", "http://127.0.0.1:9", "--repo", "ops/runners"],
            ...["--tag", "boot-v1", "--out", path.join(dir, "pxe"), "--trust", planted],
          ],
          `release-boot: --trust ${planted}: not a regular file`,
        ],
        [
          "a stage's SHA256SUMS",
          ["--flake", "path:./test/fixture", "--commit", OTHER_SHA, "--out", out],
          `release-boot: --out ${out} holds files that are not an earlier stage of release-boot, and a stage replaces it whole: choose a new or empty directory`,
        ],
      ];
      for (const [what, args, line] of cases) {
        await t.step(`${name} as ${what}`, async () => {
          // A child process: a blocked open or an endless read runs until this aborts it.
          const run = await runRelease(args, { signal: AbortSignal.timeout(30_000) });
          assert.equal(run.code, 2, run.stderr);
          assert.deepEqual(run.stderr.trim().split("\n"), [line]);
        });
      }
    }
  } finally {
    await fs.rm(dir, { recursive: true, force: true });
  }
});

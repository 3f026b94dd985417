/**
 * Publishing that fails or is refused: a run killed or cut off part-way, faults retried
 * through, a release another job never completes, and the errors a user must understand at
 * once. Real nix builds of the fixture flake, published to the Forgejo emulator.
 */
import assert from "node:assert/strict";
import * as fs from "node:fs/promises";
import * as os from "node:os";
import * as path from "node:path";
import { $ } from "zx";
import { type Emulator, type EmulatorOptions, startForgejo } from "./forgejo/emulator.ts";
import { NIX_FLAGS, nixTest } from "./nix_helpers.ts";
import { baseEnv, makeFixture, makeWorkdir, runMain, runRelease } from "./run_helpers.ts";
import {
  ALL,
  names,
  NETBOOT,
  TAG,
  TOKEN,
  uploadBehindItsBack,
  uploadsOf,
  verifyAgainstSums,
  withWorld,
  type World,
  world,
  writes,
} from "./forgejo_world.ts";
const ISO_UPLOAD = { method: "POST", path: "/assets", query: { name: "iso-x86_64-linux.iso" } };

nixTest(
  "a run killed mid-upload leaves a draft without a tag; the next run finishes it",
  async () => {
    await withWorld(
      async (w) => {
        w.forgejo.addFault({ ...ISO_UPLOAD, fault: { kind: "hang" } });
        const running = w.publish(["--targets", "netboot,iso", "--timeout", "600"]);
        const started = Date.now();
        while (!w.forgejo.requests.some((r) => r.query.name === "iso-x86_64-linux.iso")) {
          if (Date.now() - started > 60_000) throw new Error("the iso upload never started");
          await new Promise((resolve) => setTimeout(resolve, 50));
        }
        await killProcessesWithArg(w.fixture.ref);
        assert.notEqual((await running).code, 0);
        const interrupted = w.release();
        assert.equal(interrupted.draft, true, "an interrupted run leaves a draft");
        assert.equal(w.forgejo.tags()[TAG], undefined, "a draft makes no tag");
        assert.deepEqual(names(interrupted), NETBOOT);

        const resumed = await w.publish(["--targets", "netboot,iso"]);
        assert.equal(resumed.code, 0, resumed.stderr);
        const release = w.release();
        assert.equal(release.draft, false);
        assert.deepEqual(
          names(release),
          [...ALL, "SHA256SUMS", "manifest.json", "provenance.intoto.json"].sort(),
        );
        for (const name of NETBOOT) {
          assert.equal(
            uploadsOf(w.forgejo, name).length,
            1,
            `${name} uploaded once`,
          );
        }
        await verifyAgainstSums(w.forgejo, release);
        // A child process: only a process can be killed mid-upload.
      },
      {},
      runRelease,
    );
  },
);

/** Kills the release-boot child processes whose command line names `marker`. */
async function killProcessesWithArg(marker: string): Promise<void> {
  for (const pid of await fs.readdir("/proc")) {
    if (!/^\d+$/.test(pid)) continue;
    const cmdline = await fs.readFile(`/proc/${pid}/cmdline`, "utf8").catch(() => "");
    if (cmdline.includes("release-boot.ts") && cmdline.includes(marker)) {
      Deno.kill(Number(pid), "SIGKILL");
    }
  }
}

nixTest(
  "a connection lost for good says how far it got; a rerun resumes without re-uploading",
  async () => {
    await withWorld(async (w) => {
      w.forgejo.addFault({ ...ISO_UPLOAD, times: 5, fault: { kind: "reset", afterBytes: 10 } });
      const first = await w.publish(["--targets", "netboot,iso"]);
      assert.equal(first.code, 1);
      assert.match(
        first.stderr,
        /upload of iso-x86_64-linux\.iso .*failed 5 times .*; 4 of 5 uploads had finished and the release stays a draft: rerun the same command to resume/,
      );
      assert.equal(w.release().draft, true);
      assert.deepEqual(names(w.release()), NETBOOT, "a dropped upload stores nothing");

      const rerun = await w.publish(["--targets", "netboot,iso"]);
      assert.equal(rerun.code, 0, rerun.stderr);
      for (const name of NETBOOT) {
        assert.equal(
          uploadsOf(w.forgejo, name).length,
          1,
          `${name} uploaded once`,
        );
      }
      assert.equal(w.release().draft, false);
    });
  },
);

nixTest(
  "transient faults are retried: 502 page, 429 with Retry-After, a reset mid-body; no duplicates",
  async () => {
    await withWorld(async (w) => {
      w.forgejo.addFault({
        method: "POST",
        path: /\/releases$/,
        fault: { kind: "status", status: 502, html: true },
      });
      w.forgejo.addFault({
        method: "POST",
        path: "/assets",
        fault: { kind: "status", status: 429, retryAfter: 1 },
      });
      w.forgejo.addFault({
        method: "POST",
        path: "/assets",
        fault: { kind: "reset", afterBytes: 100 },
      });
      w.forgejo.addFault({
        method: "POST",
        path: "/assets",
        fault: { kind: "truncate", keepBytes: 7 },
      });
      w.forgejo.addFault({ method: "GET", path: "/tags/", fault: { kind: "hang" } });
      const run = await w.publish(["--targets", "netboot,iso"]);
      assert.equal(run.code, 0, run.stderr);
      assert.match(run.stderr, /Forgejo answered 502 for POST .*retrying/);
      assert.match(run.stderr, /Forgejo answered 429 for POST .*retrying in 1\.0s/);
      assert.match(run.stderr, /Forgejo stored 7 of \d+ bytes/);
      const release = w.release();
      assert.equal(release.draft, false);
      assert.deepEqual(
        names(release),
        [...ALL, "SHA256SUMS", "manifest.json", "provenance.intoto.json"].sort(),
        "every asset exactly once",
      );
      await verifyAgainstSums(w.forgejo, release);
    });
  },
);

nixTest(
  "a run that cannot complete the release fails after waiting, and leaves it a draft",
  async () => {
    await withWorld(async (w) => {
      assert.equal((await w.publish(["--targets", "netboot", "--draft"])).code, 0);
      await uploadBehindItsBack(w, "extra.img", "left by a run with other targets");
      const started = Date.now();
      const run = await w.publish(["--targets", "netboot", "--timeout", "2"]);
      assert.equal(run.code, 1);
      assert.ok(Date.now() - started >= 2000, "it waited for another job first");
      assert.match(
        run.stderr,
        /Waiting for another job to finish boot-v1\.0\.0: extra\.img is not covered/,
      );
      assert.match(
        run.stderr,
        /release boot-v1\.0\.0 stays a draft because extra\.img is not covered by SHA256SUMS: .*rerun with every target/,
      );
      assert.equal(w.release().draft, true);
      assert.equal(w.forgejo.tags()[TAG], undefined);
    });
  },
);

Deno.test("errors a user must understand at once: one line, exit 1, token never printed", async (t) => {
  // These fail before the build, so they need no nix.
  const cases: {
    name: string;
    options?: EmulatorOptions;
    token?: string;
    args?: string[];
    fault?: Parameters<Emulator["addFault"]>[0];
    message: RegExp;
  }[] = [
    {
      name: "expired token",
      token: "expired-0c4f9a",
      message: /401 .*token is missing, wrong or expired; set FORGEJO_TOKEN/,
    },
    {
      name: "read-only token",
      options: { tokens: { [TOKEN]: "read" } },
      message:
        /cannot write releases of ops\/runners .*write:repository.*read-only for pull requests from forks/,
    },
    {
      name: "wrong repository",
      args: ["--repo", "ops/nope"],
      message: /404 .*ops\/nope was not found on .*not visible with this token/,
    },
    {
      name: "not Forgejo",
      fault: {
        method: "GET",
        path: "/api/v1/version",
        fault: { kind: "status", status: 404, html: true },
      },
      message: /does not look like Forgejo: GET \/api\/v1\/version answered 404/,
    },
    {
      name: "connection lost after all retries",
      fault: { method: "GET", path: "/api/v1/version", times: 9, fault: { kind: "reset" } },
      message: /GET \/api\/v1\/version failed 5 times/,
    },
  ];
  for (const c of cases) {
    await t.step(c.name, async () => {
      const forgejo = await startForgejo(c.options);
      const work = await makeWorkdir();
      try {
        if (c.fault) forgejo.addFault(c.fault);
        const run = await runMain(
          ["--server", forgejo.url, "--tag", TAG, ...(c.args ?? ["--repo", "ops/runners"])],
          { cwd: work.dir, env: baseEnv({ FORGEJO_TOKEN: c.token ?? TOKEN }) },
        );
        assert.equal(run.code, 1, run.stderr);
        const errors = run.stderr.split("\n").filter((l) => l.startsWith("release-boot:"));
        assert.equal(errors.length, 1);
        assert.match(errors[0], c.message);
        assert.doesNotMatch(run.stdout + run.stderr, new RegExp(c.token ?? TOKEN));
        assert.deepEqual(writes(forgejo), []);
      } finally {
        await forgejo.close();
        await fs.rm(work.dir, { recursive: true, force: true });
      }
    });
  }
});

nixTest(
  "a token without write:repository is refused at the first write, with the fix",
  async () => {
    await withWorld(async (w) => {
      const run = await w.publish(["--targets", "netboot"]);
      assert.equal(run.code, 1);
      assert.match(
        run.stderr,
        /403 for POST .*token does not have at least one of required scope\(s\): \[write:repository\].*a personal token needs write:repository/,
      );
      assert.equal(w.forgejo.releases().length, 0);
    }, { tokens: { [TOKEN]: "no-scope" } });
  },
);

nixTest(
  "an asset over the proxy's body limit is refused with its size and the setting to raise",
  async () => {
    await withWorld(async (w) => {
      const run = await w.publish(["--targets", "netboot"]);
      assert.equal(run.code, 1);
      assert.match(
        run.stderr,
        /refused netboot-x86_64-linux\.(bzImage|initrd) of 1206 bytes \(413\): raise the proxy's client_max_body_size or the \[quota\] limit/,
      );
      assert.equal(w.release().draft, true, "nothing half-done is published");
    }, { proxyBodyLimit: 1100 });
  },
);

nixTest("a file type the server does not allow names ALLOWED_TYPES", async () => {
  await withWorld(async (w) => {
    const run = await w.publish(["--targets", "netboot"]);
    assert.equal(run.code, 1);
    assert.match(
      run.stderr,
      /refuses the file type of netboot-x86_64-linux\.\w+ .*\[repository\.release\] ALLOWED_TYPES/,
    );
  }, { allowedTypes: [".iso", ".json"] });
});

// A child process: exit status 1 as the shell sees it.
Deno.test("the mirror guard refuses before any network call", async () => {
  const forgejo = await startForgejo();
  const work = await makeWorkdir();
  try {
    const run = await runRelease(
      [
        "--server",
        forgejo.url,
        "--repo",
        "ops/runners",
        "--mirrors",
        `https://codeberg.org,${forgejo.url}`,
      ],
      { cwd: work.dir, env: baseEnv({ FORGEJO_TOKEN: TOKEN }) },
    );
    assert.equal(run.code, 1);
    assert.match(
      run.stderr,
      /refusing to publish to http:\/\/127\.0\.0\.1:\d+: it is on the mirror list/,
    );
    assert.deepEqual(forgejo.requests, []);
    // In this process: the exit status is the same 1 as above.
    const codeberg = await runMain(
      ["--server", "https://codeberg.org", "--repo", "ops/runners"],
      {
        cwd: work.dir,
        env: baseEnv({ FORGEJO_TOKEN: TOKEN }),
      },
    );
    assert.equal(codeberg.code, 1);
    assert.match(codeberg.stderr, /mirror list \(https:\/\/codeberg\.org\)/);
  } finally {
    await forgejo.close();
    await fs.rm(work.dir, { recursive: true, force: true });
  }
});

// A child process: exit status 2 as the shell sees it.
Deno.test("a missing token is a usage error that says where to set it", async () => {
  const work = await fs.mkdtemp(path.join(os.tmpdir(), "release-boot-"));
  const run = await runRelease(
    ["--server", "https://git.example.org", "--repo", "ops/runners", "--commit", "a".repeat(40)],
    { cwd: work },
  );
  assert.equal(run.code, 2);
  assert.match(run.stderr, /no token: set FORGEJO_TOKEN/);
  await fs.rm(work, { recursive: true });
});

/** A git checkout of the fixture flake, committed; `commit()` records further changes. */
async function gitFlake(salt: string) {
  const fixture = await makeFixture(salt);
  const git = $({ cwd: fixture.dir, quiet: true });
  const commit = async () => {
    await git`git add -A`;
    await git`git -c user.name=t -c user.email=t@example.org commit -qm images`;
    return (await git`git rev-parse HEAD`).stdout.trim();
  };
  await git`git init -q`;
  return { dir: fixture.dir, commit, head: await commit() };
}

/** Runs release-boot from inside `dir` (so the commit is its HEAD) with `--flake dir`. */
function publishFrom(w: World, dir: string, args: string[]) {
  return runMain(
    ["--server", w.forgejo.url, "--repo", "ops/runners", "--tag", TAG, "--flake", dir, ...args],
    { cwd: dir, env: baseEnv({ FORGEJO_TOKEN: TOKEN }) },
  );
}

nixTest(
  "publishing refuses unlocked inputs (staging records them) until flake.lock pins them",
  async () => {
    const w = await world();
    const repo = await gitFlake("locked?");
    const dep = await fs.mkdtemp(path.join(os.tmpdir(), "release-boot-dep-"));
    try {
      await fs.writeFile(path.join(dep, "flake.nix"), "{ outputs = _: { }; }\n");
      const flakeFile = path.join(repo.dir, "flake.nix");
      const text = await fs.readFile(flakeFile, "utf8");
      await fs.writeFile(
        flakeFile,
        text.replace("{\n  outputs =", `{\n  inputs.dep.url = "path:${dep}";\n  outputs =`)
          .replace("{ self }:", "{ self, dep }:"),
      );
      w.forgejo.addCommit(await repo.commit());

      const refused = await publishFrom(w, repo.dir, ["--targets", "netboot"]);
      assert.equal(refused.code, 1);
      assert.match(
        refused.stderr,
        /has inputs that flake\.lock does not pin: run nix flake lock, commit flake\.lock/,
      );
      assert.deepEqual(writes(w.forgejo), []);

      const out = path.join(w.work.dir, "out");
      const staged = await runMain(["--flake", repo.dir, "--targets", "netboot", "--out", out], {
        cwd: repo.dir,
      });
      assert.equal(staged.code, 0, staged.stderr);
      const manifest = JSON.parse(await fs.readFile(path.join(out, "manifest.json"), "utf8"));
      assert.equal(manifest.flake.locked, false);
      assert.equal(manifest.flake.inputs.dep.type, "path");
      assert.equal(
        await fs.stat(path.join(repo.dir, "flake.lock")).catch(() => null),
        null,
        "the flake was not changed",
      );

      await $`nix ${NIX_FLAGS} flake lock ${repo.dir}`.quiet();
      w.forgejo.addCommit(await repo.commit());
      const published = await publishFrom(w, repo.dir, ["--targets", "netboot"]);
      assert.equal(published.code, 0, published.stderr);
      const record = JSON.parse(
        new TextDecoder().decode((await w.forgejo.assetBytes(w.release().id, "manifest.json"))[0]),
      );
      assert.equal(record.flake.locked, true);
      assert.match(record.flake.inputs.dep.narHash, /^sha256-/);
      assert.equal(record.flake.revision, record.commit);
    } finally {
      await fs.rm(dep, { recursive: true, force: true });
      await fs.rm(repo.dir, { recursive: true, force: true });
      await w.close();
    }
  },
);

nixTest("publishing refuses a flake that is not a git checkout unless --allow-dirty", async () => {
  await withWorld(async (w) => {
    const refused = await runMain(
      [
        "--server",
        w.forgejo.url,
        "--repo",
        "ops/runners",
        "--flake",
        w.fixture.ref,
        "--targets",
        "netboot",
      ],
      { cwd: w.work.dir, env: baseEnv({ FORGEJO_TOKEN: TOKEN }) },
    );
    assert.equal(refused.code, 1);
    assert.match(
      refused.stderr,
      /is not a git checkout or a pinned revision, so nothing ties its files to commit [0-9a-f]{40}/,
    );
    assert.deepEqual(writes(w.forgejo), []);
  });
});

nixTest(
  "publishing refuses a checkout at another commit, and uncommitted changes unless --allow-dirty",
  async () => {
    const w = await world();
    const repo = await fs.mkdtemp(path.join(os.tmpdir(), "release-boot-repo-"));
    try {
      await fs.copyFile(path.join(w.fixture.dir, "flake.nix"), path.join(repo, "flake.nix"));
      await fs.writeFile(path.join(repo, "salt.nix"), '"committed"\n');
      const git = $({ cwd: repo, quiet: true });
      await git`git init -q`;
      await git`git add flake.nix salt.nix`;
      await git`git -c user.name=t -c user.email=t@example.org commit -qm images`;
      const commit = (await git`git rev-parse HEAD`).stdout.trim();
      w.forgejo.addCommit(commit);
      const args = [
        "--server",
        w.forgejo.url,
        "--repo",
        "ops/runners",
        "--tag",
        TAG,
        "--targets",
        "netboot",
      ];
      const env = baseEnv({ FORGEJO_TOKEN: TOKEN });
      const elsewhere = await runMain(
        ["--flake", repo, "--commit", "f".repeat(40), ...args],
        { cwd: repo, env },
      );
      assert.equal(elsewhere.code, 1);
      assert.match(
        elsewhere.stderr,
        new RegExp(`the flake is at commit ${commit} but the release is for f{40}`),
      );
      await fs.writeFile(path.join(repo, "salt.nix"), '"edited"\n');

      const refused = await runMain(["--flake", repo, ...args], { cwd: repo, env });
      assert.equal(refused.code, 1);
      assert.match(
        refused.stderr,
        /is a git checkout with uncommitted changes: commit them and rerun \(or pass --allow-dirty\)/,
      );
      assert.deepEqual(writes(w.forgejo), []);

      const allowed = await runMain(["--flake", repo, "--allow-dirty", ...args], {
        cwd: repo,
        env,
      });
      assert.equal(allowed.code, 0, allowed.stderr);
      const record = JSON.parse(
        new TextDecoder().decode((await w.forgejo.assetBytes(w.release().id, "manifest.json"))[0]),
      );
      assert.equal(record.flake.dirty, true);
      assert.equal(record.commit, commit);
    } finally {
      await fs.rm(repo, { recursive: true, force: true });
      await w.close();
    }
  },
);

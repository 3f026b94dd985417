/**
 * Publishing end to end: real nix builds of the fixture flake, published by release-boot (its
 * main in this process; the script as a child process where the process itself shows) to the
 * Forgejo emulator on a loopback socket. Failures and refusals: publish_failures_test.ts.
 */
import assert from "node:assert/strict";
import * as fs from "node:fs/promises";
import * as path from "node:path";
import { nixTest } from "./nix_helpers.ts";
import { baseEnv, makeFixture, parseStepOutputs, repoRoot, runRelease } from "./run_helpers.ts";
import { INDEX_NAMES } from "../types/manifest.ts";
import { api } from "./boot_dir_helpers.ts";
import {
  ALL,
  assertNoToken,
  names,
  NETBOOT,
  TAG,
  TOKEN,
  uploadBehindItsBack,
  uploadsOf,
  verifyAgainstSums,
  withWorld,
  world,
  writes,
} from "./forgejo_world.ts";

nixTest(
  "publishes a complete release: draft at the commit, assets, then checksums, then publish",
  async () => {
    await withWorld(
      async (w) => {
        const summary = path.join(w.work.dir, "summary.md");
        const output = path.join(w.work.dir, "output.txt");
        const run = await w.publish(["--targets", "netboot,iso"], {
          GITHUB_OUTPUT: output,
          GITHUB_STEP_SUMMARY: summary,
        });
        assert.equal(run.code, 0, run.stderr);
        const release = w.release();
        assert.equal(release.draft, false);
        assert.equal(release.target_commitish, w.work.commit);
        assert.equal(
          w.forgejo.tags()[TAG],
          w.work.commit,
          "publishing made the tag at the built commit",
        );
        assert.deepEqual(
          names(release),
          [...ALL, "SHA256SUMS", "manifest.json", "provenance.intoto.json"].sort(),
        );
        const sums = await verifyAgainstSums(w.forgejo, release);
        assert.deepEqual(
          [...sums.keys()].sort(),
          [...ALL, "manifest.json", "provenance.intoto.json"].sort(),
        );
        assert.equal(run.stdout, `${release.html_url}\n`, "stdout carries the release URL only");

        // The draft is created first, the index files come after every image, publish is last.
        const order = writes(w.forgejo).map((r) => `${r.method} ${r.query.name ?? r.path}`);
        const create = order.indexOf("POST /api/v1/repos/ops/runners/releases");
        const lastImage = Math.max(...ALL.map((name) => order.indexOf(`POST ${name}`)));
        assert.ok(create >= 0 && create < lastImage);
        assert.ok(lastImage < order.indexOf("POST SHA256SUMS"));
        assert.ok(lastImage < order.indexOf("POST manifest.json"));
        const created = w.forgejo.requests.find((r) =>
          r.method === "POST" && r.path.endsWith("/releases")
        );
        assert.ok(created);

        const manifest = JSON.parse(
          new TextDecoder().decode((await w.forgejo.assetBytes(release.id, "manifest.json"))[0]),
        );
        assert.equal(manifest.commit, w.work.commit);
        assert.deepEqual(
          manifest.assets.map((a: { name: string }) => a.name).sort(),
          [...ALL].sort(),
        );
        assert.match(release.body, new RegExp(`commit/${w.work.commit}`));
        assert.match(release.body, /iso-x86_64-linux\.iso \| 1014 B \| `[0-9a-f]{64}`/);

        assert.deepEqual(
          parseStepOutputs(await fs.readFile(output, "utf8")),
          new Map([
            ["release-url", release.html_url],
            ["tag", TAG],
            ["release-id", String(release.id)],
          ]),
        );
        assert.match(await fs.readFile(summary, "utf8"), /\| iso-x86_64-linux\.iso \| 1014 B \|/);
        assertNoToken(run, w.forgejo);
      },
      {},
      // A child process, as the workflow runs it: the end-to-end check of a publish.
      runRelease,
    );
  },
);

nixTest("a rerun of a finished release uploads nothing and changes nothing", async () => {
  await withWorld(async (w) => {
    assert.equal((await w.publish(["--targets", "netboot,iso"])).code, 0);
    const before = w.forgejo.requests.length;
    const rerun = await w.publish(["--targets", "netboot,iso"]);
    assert.equal(rerun.code, 0, rerun.stderr);
    const after = w.forgejo.requests.slice(before);
    assert.deepEqual(after.filter((r) => r.method !== "GET"), [], "only reads on a rerun");
    assert.equal(after.reduce((sum, r) => sum + r.bodyBytes, 0), 0, "zero bytes uploaded");
    assert.ok(after.some((r) => r.host === "storage"), "index files were read through the 303");
    assertNoToken(rerun, w.forgejo);
    assert.equal(rerun.stdout, `${w.release().html_url}\n`);
  }, { serveDirect: true });
});

nixTest(
  "a rerun reads the release's index three times: for reuse before the build, to plan, before publishing",
  async () => {
    await withWorld(async (w) => {
      assert.equal((await w.publish(["--targets", "netboot"])).code, 0);
      const before = w.forgejo.requests.length;
      const rerun = await w.publish(["--targets", "netboot"]);
      assert.equal(rerun.code, 0, rerun.stderr);
      // The plan's read serves the first round of writing the index too: the uploads between
      // add no index copy. The look before publishing reads the server again.
      const downloads = (uuid?: string) =>
        w.forgejo.requests.slice(before).filter((r) =>
          r.host === "forgejo" && r.method === "GET" && r.path === `/attachments/${uuid}`
        ).length;
      const index = w.release().assets.filter((copy) => INDEX_NAMES.has(copy.name));
      assert.deepEqual(
        Object.fromEntries(index.map((copy) => [copy.name, downloads(copy.uuid)])),
        { "SHA256SUMS": 3, "manifest.json": 3, "provenance.intoto.json": 3 },
      );
    });
  },
);

nixTest(
  "an index another job writes while this run uploads is merged in this run's first write",
  async () => {
    await withWorld(async (w) => {
      // The iso is stored, and before its upload is answered a --draft job publishes netboot
      // into the same draft and writes an index listing it.
      w.forgejo.addFault({
        method: "POST",
        path: "/assets",
        query: { name: "iso-x86_64-linux.iso" },
        fault: {
          kind: "then",
          run: async () => {
            const other = await w.publish(["--targets", "netboot", "--draft"]);
            assert.equal(other.code, 0, other.stderr);
          },
        },
      });
      const run = await w.publish(["--targets", "iso", "--timeout", "60"]);
      assert.equal(run.code, 0, run.stderr);
      const release = w.release();
      assert.equal(release.draft, false);
      const sums = await verifyAgainstSums(w.forgejo, release);
      assert.deepEqual(
        [...sums.keys()].sort(),
        [...ALL, "manifest.json", "provenance.intoto.json"].sort(),
      );
      assert.equal(
        uploadsOf(w.forgejo, "manifest.json").length,
        2,
        "one index by each job: this run saw the other's before writing its own",
      );
    });
  },
);

nixTest(
  "three jobs publishing the same tag at once end with one release, every asset once, sums over all",
  async () => {
    const plain = [
      "plain-x86_64-linux.NOTES",
      "plain-x86_64-linux.bzImage",
      "plain-x86_64-linux.img",
    ];
    const every = [...ALL, ...plain].sort();
    await withWorld(async (w) => {
      const runs = await Promise.all(
        ["netboot", "iso", "plain"].map((target) =>
          w.publish(["--targets", target, "--timeout", "20"])
        ),
      );
      for (const run of runs) assert.equal(run.code, 0, run.stderr);
      const release = w.release();
      assert.equal(release.draft, false, "the job that completed the set published it");
      assert.deepEqual(
        names(release),
        [...every, "SHA256SUMS", "manifest.json", "provenance.intoto.json"].sort(),
      );
      const sums = await verifyAgainstSums(w.forgejo, release);
      assert.deepEqual(
        [...sums.keys()].sort(),
        [...every, "manifest.json", "provenance.intoto.json"].sort(),
      );
    });
  },
);

nixTest(
  "a matrix of --draft jobs is published once by --finalize after checking coverage",
  async () => {
    await withWorld(async (w) => {
      const early = await w.publish(["--finalize"]);
      assert.equal(early.code, 1);
      assert.match(early.stderr, /there is no release boot-v1\.0\.0 to finalize/);
      assert.equal((await w.publish(["--targets", "netboot", "--draft"])).code, 0);
      assert.equal((await w.publish(["--targets", "iso", "--draft"])).code, 0);
      assert.equal(w.release().draft, true);
      assert.equal(w.forgejo.tags()[TAG], undefined);
      const output = path.join(w.work.dir, "out.txt");
      const final = await w.publish(["--finalize"], { GITHUB_OUTPUT: output });
      assert.equal(final.code, 0, final.stderr);
      assert.doesNotMatch(final.stderr, /==> Build/, "--finalize builds nothing");
      const release = w.release();
      assert.equal(release.draft, false);
      assert.equal(w.forgejo.tags()[TAG], w.work.commit);
      const sums = await verifyAgainstSums(w.forgejo, release);
      assert.deepEqual(
        [...sums.keys()].sort(),
        [...ALL, "manifest.json", "provenance.intoto.json"].sort(),
      );
      const outputs = parseStepOutputs(await fs.readFile(output, "utf8"));
      assert.equal(outputs.get("release-url"), release.html_url);
    });
  },
);

nixTest(
  "--finalize refuses to publish when the tag was made on another commit meanwhile",
  async () => {
    await withWorld(async (w) => {
      assert.equal((await w.publish(["--targets", "netboot", "--draft"])).code, 0);
      w.forgejo.addTag(TAG, "e".repeat(40));
      const final = await w.publish(["--finalize"]);
      assert.equal(final.code, 1);
      assert.match(
        final.stderr,
        /the tag boot-v1\.0\.0 already points at e{40}, not at [0-9a-f]{40}/,
      );
      assert.equal(w.release().draft, true);
    });
  },
);

nixTest("--finalize refuses a draft with an asset its checksums do not cover", async () => {
  await withWorld(async (w) => {
    assert.equal((await w.publish(["--targets", "netboot", "--draft"])).code, 0);
    await uploadBehindItsBack(w, "extra.img", "not built by release-boot");
    const final = await w.publish(["--finalize"]);
    assert.equal(final.code, 1);
    assert.match(
      final.stderr,
      /not complete, so it stays a draft: extra\.img is not covered by SHA256SUMS/,
    );
    assert.equal(w.release().draft, true);
  });
});

nixTest(
  "different bytes are refused untouched; --replace stores the new bytes before deleting the old",
  async () => {
    const w = await world();
    const other = await makeFixture("two");
    try {
      assert.equal((await w.publish(["--targets", "netboot"])).code, 0);
      const mark = w.forgejo.requests.length;
      const refused = await w.publish(["--targets", "netboot"], {}, other.ref);
      assert.equal(refused.code, 1);
      assert.match(
        refused.stderr,
        /netboot-x86_64-linux\.(bzImage|initrd) in published release boot-v1\.0\.0 differs from this build .*rerun with --replace/,
      );
      assert.deepEqual(
        w.forgejo.requests.slice(mark).filter((r) => r.method !== "GET"),
        [],
        "nothing touched",
      );

      const replaced = await w.publish(["--targets", "netboot", "--replace"], {}, other.ref);
      assert.equal(replaced.code, 0, replaced.stderr);
      const release = w.release();
      assert.deepEqual(
        names(release),
        [...NETBOOT, "SHA256SUMS", "manifest.json", "provenance.intoto.json"].sort(),
        "one asset per name",
      );
      const initrd = await w.forgejo.assetBytes(release.id, "netboot-x86_64-linux.initrd");
      assert.match(new TextDecoder().decode(initrd[0]), /initrd two line 0/);
      await verifyAgainstSums(w.forgejo, release);
      // The new copy was stored before the old one was deleted.
      const later = w.forgejo.requests.slice(mark);
      const upload = later.findIndex((r) =>
        r.method === "POST" && r.query.name === "netboot-x86_64-linux.initrd"
      );
      const firstDelete = later.findIndex((r) => r.method === "DELETE");
      assert.ok(upload >= 0 && firstDelete > upload);
    } finally {
      await fs.rm(other.dir, { recursive: true, force: true });
      await w.close();
    }
  },
);

nixTest(
  "a tag on another commit is refused with both SHAs, before anything is written",
  async () => {
    await withWorld(async (w) => {
      const elsewhere = "f".repeat(40);
      w.forgejo.addTag(TAG, elsewhere);
      const run = await w.publish(["--targets", "netboot"]);
      assert.equal(run.code, 1);
      assert.match(
        run.stderr,
        new RegExp(`tag boot-v1\\.0\\.0 already points at ${elsewhere}, not at ${w.work.commit}`),
      );
      assert.deepEqual(writes(w.forgejo), []);
    });
  },
);

nixTest(
  "an older server that hides drafts from the tag lookup still gets one release",
  async () => {
    await withWorld(async (w) => {
      assert.equal((await w.publish(["--targets", "netboot", "--draft"])).code, 0);
      assert.equal((await w.publish(["--targets", "iso"])).code, 0);
      const release = w.release();
      assert.equal(release.draft, false);
      assert.deepEqual(
        names(release),
        [...ALL, "SHA256SUMS", "manifest.json", "provenance.intoto.json"].sort(),
      );
    }, { draftsHiddenFromTagLookup: true });
  },
);

nixTest(
  "in CI: the token is masked, phases are grouped, and it never reaches the output otherwise",
  async () => {
    await withWorld(async (w) => {
      const run = await w.publish(["--targets", "netboot"], { CI: "true", GITHUB_ACTIONS: "true" });
      assert.equal(run.code, 0, run.stderr);
      const lines = run.stderr.split("\n");
      assert.deepEqual(lines.filter((l) => l.includes(TOKEN)), [`::add-mask::${TOKEN}`]);
      for (
        const phase of ["Check Forgejo", "Build", "Hash", "Upload", "Write checksums", "Publish"]
      ) {
        assert.ok(lines.includes(`::group::${phase}`), phase);
      }
      assert.equal(
        lines.filter((l) => l === "::endgroup::").length,
        lines.filter((l) => l.startsWith("::group::")).length,
      );
      assert.doesNotMatch(run.stdout, new RegExp(TOKEN));
    });
  },
);

nixTest("upload progress: a few percentage lines in CI, a bar on a terminal", async () => {
  await withWorld(async (w) => {
    const ci = await w.publish(["--targets", "large"], { CI: "true" });
    assert.equal(ci.code, 0, ci.stderr);
    const lines = ci.stderr.split("\n").filter((l) => l.startsWith("large-x86_64-linux.img: "));
    assert.deepEqual(
      lines,
      [25, 50, 75, 100].map((p) => `large-x86_64-linux.img: ${p}% of 64.0 MiB`),
    );

    // `script` runs release-boot on a pseudo-terminal, as an operator's shell would.
    const args = [
      "run",
      "--allow-all",
      "--config",
      `${repoRoot}/deno.json`,
      `${repoRoot}/scripts/release-boot.ts`,
      "--server",
      w.forgejo.url,
      "--repo",
      "ops/runners",
      "--flake",
      w.fixture.ref,
      "--allow-dirty",
      "--targets",
      "large",
      "--tag",
      "boot-v1.0.1",
    ];
    const command = [Deno.execPath(), ...args].map((a) => `'${a}'`).join(" ");
    const tty = await new Deno.Command("script", {
      args: ["-qec", command, "/dev/null"],
      cwd: w.work.dir,
      env: baseEnv({ FORGEJO_TOKEN: TOKEN }),
      clearEnv: true,
      stdout: "piped",
      stderr: "piped",
    }).output();
    const screen = new TextDecoder().decode(tty.stdout);
    assert.equal(tty.code, 0, screen);
    assert.match(screen, /\rlarge-x86_64-linux\.img \[#{25}\] 100%/);
    assert.doesNotMatch(screen, /% of 64\.0 MiB/, "no CI lines on a terminal");
  });
});

nixTest("the build happens before any write: a failing target publishes nothing", async () => {
  await withWorld(async (w) => {
    const run = await w.publish(["--targets", "netboot,broken"]);
    assert.equal(run.code, 1);
    assert.match(run.stderr, /nix build failed for target broken/);
    assert.deepEqual(writes(w.forgejo), []);
    assert.equal(w.forgejo.releases().length, 0);
  });
});

nixTest(
  "three jobs publishing at once still converge when the server is slow to answer",
  async () => {
    await withWorld(async (w) => {
      // Every read of the release and every asset upload take 100 ms: a round of reading and
      // writing the index takes far longer than the least wait between rounds, so jobs that
      // waited only that long would meet again round after round.
      for (const path of [/\/releases\/\d+$/, /\/releases\/\d+\/assets$/]) {
        w.forgejo.addFault({
          path,
          times: 1000,
          fault: { kind: "then", run: () => new Promise((done) => setTimeout(done, 100)) },
        });
      }
      const runs = await Promise.all(
        ["netboot", "iso", "plain"].map((target) =>
          w.publish(["--targets", target, "--timeout", "20"])
        ),
      );
      for (const run of runs) assert.equal(run.code, 0, run.stderr);
      assert.equal(w.release().draft, false);
    });
  },
);

nixTest(
  "a publish undone by another job's edit is published again, not reported as failed",
  async () => {
    await withWorld(async (w) => {
      // Right after the release is first published, a stale edit (one written from the release
      // as it read before) puts the draft flag back, as another job's body update can.
      let undone = false;
      w.forgejo.addFault({
        method: "PATCH",
        path: /\/releases\/\d+$/,
        times: 1000,
        fault: {
          kind: "then",
          run: async () => {
            const release = w.release();
            if (undone || release.draft) return;
            undone = true;
            await api(w, "PATCH", `/releases/${release.id}`, JSON.stringify({ draft: true }));
          },
        },
      });
      const run = await w.publish(["--targets", "netboot"]);
      assert.equal(run.code, 0, run.stderr);
      assert.ok(undone, "the publish was undone once");
      assert.match(run.stderr, /still reads as a draft after publishing it: publishing it again/);
      assert.equal(w.release().draft, false);
    });
  },
);

nixTest(
  "a server that never keeps a release published is asked three times, then named in one line",
  async () => {
    await withWorld(async (w) => {
      // Every publish is undone at once: a broken server, not a race another job could win.
      let undone = 0;
      w.forgejo.addFault({
        method: "PATCH",
        path: /\/releases\/\d+$/,
        times: 1000,
        fault: {
          kind: "then",
          run: async () => {
            const release = w.release();
            if (release.draft) return;
            undone++;
            await api(w, "PATCH", `/releases/${release.id}`, JSON.stringify({ draft: true }));
          },
        },
      });
      const run = await w.publish(["--targets", "netboot", "--timeout", "60"]);
      assert.equal(run.code, 1, run.stderr);
      assert.deepEqual(
        run.stderr.split("\n").filter((line) => line.startsWith("release-boot:")),
        ["release-boot: Forgejo did not publish boot-v1.0.0; rerun to try again"],
      );
      assert.equal(undone, 3, "three publishes asked for");
      assert.equal(w.release().draft, true);
    });
  },
);

/** The core pipeline end to end with real nix: build, name, hash, stage or refuse. */
import assert from "node:assert/strict";
import * as fs from "node:fs/promises";
import * as path from "node:path";
import { nixTest } from "./nix_helpers.ts";
import {
  baseEnv,
  exists,
  fixtureDir,
  makeFixture,
  makeWorkdir,
  runCommand,
  runMain,
  runRelease,
  sha256sumCheck,
  STAGED_NETBOOT_ISO,
  stageUnderWay,
  startRelease,
} from "./run_helpers.ts";

const FIXTURE = `path:${fixtureDir}`;

// A child process, as operators stage: the end-to-end check of a stage.
nixTest(
  "with no server, netboot and iso are staged in dist/<tag> and sha256sum -c passes",
  async () => {
    const work = await makeWorkdir();
    const run = await runRelease(["--flake", FIXTURE, "--targets", "netboot,iso"], {
      cwd: work.dir,
    });
    assert.equal(run.code, 0, run.stderr);
    const out = path.join(work.dir, "dist", `boot-dev-${work.commit.slice(0, 12)}`);
    assert.equal(run.stdout.trim(), out, "stdout carries only the staged directory");
    assert.deepEqual((await fs.readdir(out)).sort(), STAGED_NETBOOT_ISO);
    const check = await sha256sumCheck(out);
    assert.equal(check.code, 0, check.stdout);
    assert.equal(
      check.stdout.trim().split("\n").length,
      7,
      "SHA256SUMS lists every asset, the manifest and the provenance, not itself",
    );
    assert.match(check.stdout, /^manifest\.json: OK$/m);
    const manifest = JSON.parse(await fs.readFile(path.join(out, "manifest.json"), "utf8"));
    assert.equal(manifest.commit, work.commit);
    assert.equal(manifest.tag, `boot-dev-${work.commit.slice(0, 12)}`);
    assert.equal(manifest.flake.locked, true);
    const nixVersion = (await runCommand("nix", ["--version"])).stdout.match(/\d+\.\d+\S*/);
    assert.equal(manifest.nixVersion, nixVersion?.[0], "the version nix --version prints");
    const iso = manifest.assets.find((a: { name: string }) => a.name === "iso-x86_64-linux.iso");
    assert.match(
      iso.storePath,
      /^\/nix\/store\/.*-nixos-runner-iso\/iso\/nixos-runner-25\.05.*\.iso$/,
    );
    assert.match(iso.drvPath, /^\/nix\/store\/.*-nixos-runner-iso\.drv$/);
    assert.equal(iso.size, (await fs.stat(path.join(out, "iso-x86_64-linux.iso"))).size);
    assert.match(run.stderr, /Publish them: FORGEJO_TOKEN=\.\.\. deno task release --server/);
    const script = await fs.readFile(path.join(out, "netboot-x86_64-linux.ipxe"), "utf8");
    assert.match(
      script,
      /^kernel netboot-x86_64-linux\.bzImage .*initrd=netboot-x86_64-linux\.initrd /m,
    );
    assert.match(script, /^initrd netboot-x86_64-linux\.initrd$/m);
    await fs.rm(work.dir, { recursive: true });
  },
);

nixTest("a rerun of a stage replaces it whole", async () => {
  const work = await makeWorkdir();
  const out = path.join(work.dir, "staged");
  for (const salt of ["first", "second"]) {
    const fixture = await makeFixture(salt);
    const run = await runMain([
      "--flake",
      fixture.ref,
      "--targets",
      "netboot",
      "--out",
      out,
      "--tag",
      "boot-v0.1.0",
    ], {
      cwd: work.dir,
    });
    assert.equal(run.code, 0, run.stderr);
    await fs.rm(fixture.dir, { recursive: true });
  }
  assert.equal((await sha256sumCheck(out)).code, 0);
  assert.match(await fs.readFile(path.join(out, "netboot-x86_64-linux.initrd"), "utf8"), /second/);
  const leftovers = (await fs.readdir(work.dir)).filter((name) => name.includes("partial"));
  assert.deepEqual(leftovers, []);
  await fs.rm(work.dir, { recursive: true });
});

/** A netboot stage into `out`, in this process. */
async function stageNetboot(work: string, out: string) {
  return await runMain(["--flake", FIXTURE, "--targets", "netboot", "--out", out], { cwd: work });
}

nixTest(
  "a stage into an --out another stage is writing stops in one line, and leaves that stage's copy alone",
  async () => {
    const work = await makeWorkdir();
    const out = path.join(work.dir, "staged");
    // The other stage: a live process holding the lock, its partial copy under way.
    const other = new Deno.Command("sleep", { args: ["60"] }).spawn();
    try {
      await fs.writeFile(`${out}.lock`, `${other.pid}\n`);
      const copy = `${out}.partial-AbC123`;
      await fs.mkdir(copy);
      await fs.writeFile(path.join(copy, "netboot-x86_64-linux.initrd"), "half");
      const run = await stageNetboot(work.dir, out);
      assert.equal(run.code, 1, run.stderr);
      assert.deepEqual(run.stderr.split("\n").filter((line) => line.startsWith("release-boot:")), [
        `release-boot: another stage (pid ${other.pid}) is writing ${out}: let it finish and rerun; if no such process runs, remove ${out}.lock`,
      ]);
      assert.doesNotMatch(run.stderr, /^==> Read the flake$/m, "refused before the build");
      assert.deepEqual(await fs.readdir(copy), ["netboot-x86_64-linux.initrd"]);
      assert.equal(await fs.readFile(`${out}.lock`, "utf8"), `${other.pid}\n`);
      assert.equal(await exists(out), false);

      // What is there but is no lock is never taken for one, nor removed.
      await fs.writeFile(`${out}.lock`, "not a pid\n");
      const planted = await stageNetboot(work.dir, out);
      assert.equal(planted.code, 1, planted.stderr);
      assert.match(
        planted.stderr,
        /^release-boot: \S+staged\.lock is not a lock file, which release-boot did not make: remove it, or stage into another --out$/m,
      );
      assert.doesNotMatch(planted.stderr, /^==> Read the flake$/m, "refused before the build");
      assert.equal(await fs.readFile(`${out}.lock`, "utf8"), "not a pid\n");
    } finally {
      other.kill();
      await other.status;
      await fs.rm(work.dir, { recursive: true });
    }
  },
);

nixTest(
  "a killed stage's lock is taken over, and what killed runs left beside it goes, a live run's stays",
  async () => {
    const work = await makeWorkdir();
    const out = path.join(work.dir, "staged");
    const dead = new Deno.Command("true").spawn();
    await dead.status;
    const live = new Deno.Command("sleep", { args: ["60"] }).spawn();
    try {
      await fs.writeFile(`${out}.lock`, `${dead.pid}\n`);
      // What stages killed while making a lock and while taking one over left.
      await fs.writeFile(`${out}.lock.${dead.pid}.new`, `${dead.pid}\n`);
      await fs.writeFile(`${out}.lock.takeover`, `${dead.pid}\n`);
      await fs.writeFile(`${out}.lock.${dead.pid}.stale`, "1\n");
      // What a live run of an earlier version moved aside while taking a lock over: it stays.
      await fs.writeFile(`${out}.lock.${live.pid}.stale`, "1\n");
      const run = await stageNetboot(work.dir, out);
      assert.equal(run.code, 0, run.stderr);
      assert.match(
        run.stderr,
        new RegExp(`Taking over \\S+staged\\.lock: its stage \\(pid ${dead.pid}\\) is gone`),
      );
      assert.deepEqual(
        (await fs.readdir(work.dir)).filter((name) => name !== ".git").sort(),
        ["staged", `staged.lock.${live.pid}.stale`],
      );
      assert.equal((await sha256sumCheck(out)).code, 0);
    } finally {
      live.kill();
      await live.status;
      await fs.rm(work.dir, { recursive: true });
    }
  },
);

nixTest(
  "a lock naming a pid that another process has since (after a reboot, or pids wrapping) is taken over",
  async () => {
    const work = await makeWorkdir();
    const out = path.join(work.dir, "staged");
    // Its pid runs, but it is not the process the lock recorded: that one started in another boot.
    const other = new Deno.Command("sleep", { args: ["60"] }).spawn();
    try {
      const bootId = (await fs.readFile("/proc/sys/kernel/random/boot_id", "utf8")).trim();
      const anotherBoot = bootId.replace(/^./, (c) => c === "0" ? "1" : "0");
      await fs.writeFile(`${out}.lock`, `${other.pid} ${anotherBoot}/12345\n`);
      const run = await stageNetboot(work.dir, out);
      assert.equal(run.code, 0, run.stderr);
      assert.match(
        run.stderr,
        new RegExp(`Taking over \\S+staged\\.lock: its stage \\(pid ${other.pid}\\) is gone`),
      );
      assert.equal(await exists(`${out}.lock`), false, "the lock is released");
    } finally {
      other.kill();
      await other.status;
      await fs.rm(work.dir, { recursive: true });
    }
  },
);

// A child process: only a process shows what Ctrl-C does to it.
nixTest(
  "Ctrl-C during a stage exits 130, says nothing more, and leaves neither stage nor partial copy",
  async () => {
    const work = await makeWorkdir();
    try {
      const child = startRelease(["--flake", FIXTURE, "--targets", "large", "--out", "staged"], {
        cwd: work.dir,
      });
      const output = child.output();
      assert.ok(await stageUnderWay(work.dir, "staged", output), "the stage never started");
      child.kill("SIGINT");
      const { code, signal, stdout, stderr } = await output;
      const text = new TextDecoder();
      assert.equal(code, 130, text.decode(stderr));
      assert.equal(signal, null, "release-boot ended itself, its partial copy removed");
      assert.equal(text.decode(stdout), "", "no staged directory is reported");
      assert.doesNotMatch(text.decode(stderr), /^release-boot:/m);
      assert.match(text.decode(stderr), /^==> Hash$/m, "the run got as far as the stage");
      assert.deepEqual((await fs.readdir(work.dir)).filter((name) => name !== ".git"), []);
    } finally {
      await fs.rm(work.dir, { recursive: true, force: true });
    }
  },
);

nixTest("a stage never replaces a directory that is not an earlier stage", async () => {
  const work = await makeWorkdir();
  const precious = path.join(work.dir, "srv");
  await fs.mkdir(precious);
  await fs.writeFile(path.join(precious, "keep.txt"), "operator data\n");
  const run = await runMain(["--flake", FIXTURE, "--targets", "netboot", "--out", precious], {
    cwd: work.dir,
  });
  assert.equal(run.code, 2);
  assert.match(
    run.stderr,
    /--out .*srv holds files that are not an earlier stage of release-boot/,
  );
  assert.deepEqual(await fs.readdir(precious), ["keep.txt"]);
  await fs.rm(work.dir, { recursive: true });
});

nixTest(
  "without hydra-build-products every regular file is published, links followed",
  async () => {
    const work = await makeWorkdir();
    const run = await runMain(["--flake", FIXTURE, "--targets", "plain", "--out", "out"], {
      cwd: work.dir,
    });
    assert.equal(run.code, 0, run.stderr);
    const names = (await fs.readdir(path.join(work.dir, "out"))).sort();
    assert.deepEqual(names, [
      "SHA256SUMS",
      "manifest.json",
      "plain-x86_64-linux.NOTES",
      "plain-x86_64-linux.bzImage",
      "plain-x86_64-linux.img",
      "provenance.intoto.json",
    ]);
    await fs.rm(work.dir, { recursive: true });
  },
);

nixTest("a failing target exits 1 naming it and writes nothing", async () => {
  const work = await makeWorkdir();
  const run = await runMain(["--flake", FIXTURE, "--targets", "netboot,broken"], {
    cwd: work.dir,
  });
  assert.equal(run.code, 1);
  assert.match(run.stderr, /nix build failed for target broken \(x86_64-linux\)/);
  assert.match(run.stderr, /the runner image failed to assemble/);
  assert.equal(await exists(path.join(work.dir, "dist")), false);
  await fs.rm(work.dir, { recursive: true });
});

nixTest("an unknown target exits 2 before building and lists the flake's targets", async () => {
  const work = await makeWorkdir();
  const run = await runMain(["--flake", FIXTURE, "--targets", "netboot,isoo"], {
    cwd: work.dir,
  });
  assert.equal(run.code, 2);
  assert.match(
    run.stderr,
    /unknown target isoo in --targets: the flake .* has broken, iso, large, netboot, plain, unstable for x86_64-linux/,
  );
  assert.doesNotMatch(run.stderr, /==> Build/);
  const other = await runMain([
    "--flake",
    FIXTURE,
    "--system",
    "aarch64-linux",
    "--targets",
    "sd",
  ], { cwd: work.dir });
  assert.equal(other.code, 2);
  assert.match(other.stderr, /has no packages for aarch64-linux/);
  assert.equal(await exists(path.join(work.dir, "dist")), false);
  await fs.rm(work.dir, { recursive: true });
});

nixTest("--dry-run prints the plan with sizes and sums and writes nothing", async () => {
  const work = await makeWorkdir();
  const run = await runMain(["--flake", FIXTURE, "--targets", "netboot", "--dry-run"], {
    cwd: work.dir,
  });
  assert.equal(run.code, 0, run.stderr);
  assert.match(run.stdout, /^Plan for boot-dev-[0-9a-f]{12}/);
  assert.match(run.stdout, /[0-9a-f]{64} {2}netboot-x86_64-linux\.initrd {2}1\.2 KiB/);
  assert.match(run.stdout, /SHA256SUMS/);
  assert.deepEqual(
    await fs.readdir(work.dir).then((names) => names.filter((n) => n !== ".git")),
    [],
  );
  await fs.rm(work.dir, { recursive: true });
});

Deno.test("each bad input exits 2 with one line and leaves nothing behind", async () => {
  const work = await makeWorkdir();
  const cases: [string[], RegExp][] = [
    [["--tag", "boot v1"], /bad --tag "boot v1": it contains a space/],
    [["--tag", "boot..v1"], /bad --tag "boot\.\.v1": it contains "\.\."/],
    [["--tag=-v1"], /bad --tag "-v1": it starts with "-"/],
    [["--targets", "netboot,,iso"], /bad --targets/],
    [["--system", "linux"], /bad --system "linux"/],
    [
      ["--repo", "runners", "--server", "https://git.example.org"],
      /bad --repo "runners": a repository is written OWNER\/NAME/,
    ],
    [["--server", "http://git.example.org", "--repo", "ops/runners"], /bad --server .*use https/],
    [["--commit", "abc123"], /bad --commit "abc123": a commit is the full 40/],
    [["--timeout", "soon"], /bad --timeout "soon"/],
    [["--frobnicate"], /unknown flag --frobnicate/],
  ];
  for (const [args, message] of cases) {
    const run = await runMain(args, { cwd: work.dir });
    assert.equal(run.code, 2, `${args.join(" ")}: ${run.stderr}`);
    const lines = run.stderr.trim().split("\n");
    assert.equal(lines.length, 1, `one line for ${args.join(" ")}: ${run.stderr}`);
    assert.match(lines[0], message);
  }
  assert.deepEqual((await fs.readdir(work.dir)).filter((n) => n !== ".git"), []);
  await fs.rm(work.dir, { recursive: true });
});

Deno.test("--help documents every flag and the token variables", async () => {
  const run = await runMain(["--help"]);
  assert.equal(run.code, 0);
  for (
    const flag of [
      "--flake",
      "--targets",
      "--system",
      "--tag",
      "--commit",
      "--server",
      "--repo",
      "--out",
      "--dry-run",
      "--draft",
      "--prerelease",
      "--replace",
      "--finalize",
      "--allow-dirty",
      "--timeout",
      "--mirrors",
      "--signing-key",
      "--ipxe-signing-key",
    ]
  ) {
    assert.match(run.stdout, new RegExp(`^  ${flag}\\b`, "m"), flag);
  }
  assert.match(run.stdout, /--ipxe-signing-cert FILE/);
  assert.match(run.stdout, /RELEASE_BOOT_IPXE_SIGNING_KEY, RELEASE_BOOT_IPXE_SIGNING_CERT/);
  assert.match(run.stdout, /FORGEJO_TOKEN/);
  assert.match(run.stdout, /GITHUB_TOKEN/);
  assert.match(run.stdout, /Exit status: 0 done, 1 failed/);
});

nixTest(
  "each target's files carry its own name, whatever order nix reports the builds in",
  async () => {
    // nix 2.8 lists build results in store-path order: one of these orders differs from it.
    for (const targets of ["iso,netboot,plain", "plain,netboot,iso"]) {
      const work = await makeWorkdir();
      try {
        const run = await runMain(["--flake", FIXTURE, "--targets", targets], { cwd: work.dir });
        assert.equal(run.code, 0, run.stderr);
        const out = path.join(work.dir, "dist", `boot-dev-${work.commit.slice(0, 12)}`);
        const text = (name: string) => fs.readFile(path.join(out, name), "utf8");
        assert.match(await text("iso-x86_64-linux.iso"), /^iso /, `${targets}: the ISO is the ISO`);
        assert.match(await text("netboot-x86_64-linux.initrd"), /^initrd /);
        assert.match(await text("plain-x86_64-linux.img"), /^plain /);
      } finally {
        await fs.rm(work.dir, { recursive: true, force: true });
      }
    }
  },
);

nixTest(
  "nix's evaluation cache answering wrongly while another nix holds it does not fail the run",
  async () => {
    // What nix 2.8 prints when two processes evaluate the same flake at once: it ignores the
    // busy cache, then reports an attribute that exists as missing. This nix does it to every
    // evaluation and build that uses the cache, and runs the real nix for the rest.
    const work = await makeWorkdir();
    const realNix = (await runCommand("sh", ["-c", "command -v nix"])).stdout.trim();
    const bin = path.join(work.dir, "bin");
    await fs.mkdir(bin);
    await fs.writeFile(
      path.join(bin, "nix"),
      `#!/bin/sh
case " $* " in
  *" eval-cache false "*|*" --version "*|*" path-info "*|*" metadata "*) exec ${realNix} "$@" ;;
esac
echo "error (ignored): error: SQLite database '$HOME/.cache/nix/eval-cache-v2/0.sqlite' is busy" >&2
echo "error: attribute 'packages.x86_64-linux.packages' is unexpectedly missing" >&2
exit 1
`,
      { mode: 0o755 },
    );
    const run = await runMain(["--flake", FIXTURE, "--targets", "netboot,iso"], {
      cwd: work.dir,
      env: baseEnv({ PATH: `${bin}:${Deno.env.get("PATH")}` }),
    });
    assert.equal(run.code, 0, run.stderr);
    assert.match(
      run.stderr,
      /^nix eval met a busy evaluation cache \(another nix on this flake\); once more without it$/m,
    );
    const out = path.join(work.dir, "dist", `boot-dev-${work.commit.slice(0, 12)}`);
    assert.deepEqual((await fs.readdir(out)).sort(), STAGED_NETBOOT_ISO);
    assert.equal((await sha256sumCheck(out)).code, 0);
    await fs.rm(work.dir, { recursive: true });
  },
);

/** verify (rebuild a release and compare) and prune (what CI leaves behind). */
import assert from "node:assert/strict";
import * as fs from "node:fs/promises";
import * as os from "node:os";
import * as path from "node:path";
import process from "node:process";
import { $ } from "zx";
import {
  type AssetCheck,
  checkFlakeCommit,
  compareRebuild,
  rebuildRelease,
  rebuildScope,
  renderVerification,
  type Verification,
  verificationExitCode,
  verificationJson,
  verificationSummary,
} from "../scripts/lib/verify.ts";
import { parseSums } from "../scripts/lib/release_index.ts";
import {
  planPrune,
  type PruneRelease,
  renderPruneDeletion,
  renderPruneTotal,
} from "../scripts/lib/prune.ts";
import { ReleaseError, UsageError } from "../scripts/lib/run.ts";
import type { Manifest } from "../types/manifest.ts";
import { nixTest } from "./nix_helpers.ts";
import {
  exists,
  fixtureDir,
  makeFixture,
  makeWorkdir,
  runMain,
  startTestRun,
} from "./run_helpers.ts";

// The script's nix calls run in this process: offline, like the child runs of run_helpers.
const NIX_ENV = {
  ...process.env,
  NIX_CONFIG: "substituters =\nexperimental-features = nix-command flakes",
};
const run = startTestRun(NIX_ENV);

const SYSTEM = "x86_64-linux";
const SHA_A = "a".repeat(64);
const SHA_B = "b".repeat(64);
const SHA_C = "c".repeat(64);

async function git(dir: string, ...args: string[]): Promise<string> {
  const result = await $({ cwd: dir })`git -c user.name=t -c user.email=t@example.org ${args}`
    .quiet();
  return result.stdout.trim();
}

/** Build-time leftovers of the fixture's stamp derivation in the temporary directory `dir`. */
async function keptStampBuildDirs(dir: string): Promise<string[]> {
  return (await fs.readdir(dir)).filter((entry) => entry.startsWith("nix-build-build-stamp.drv-"));
}

nixTest(
  "a rebuild checks every derivation that made a file: netboot rebuilds identical, a build-time stamp differs with both sums, a file the rebuild lacks is missing, and no .check copy is left",
  async () => {
    const work = await makeWorkdir();
    const fixture = await makeFixture(`verify-${crypto.randomUUID()}`);
    const out = path.join(work.dir, "staged");
    // nix keeps build directories in TMPDIR: one of this test's own, so the rebuilds of tests
    // running at the same time are not mistaken for leftovers of this one.
    const tmp = path.join(work.dir, "tmp");
    await fs.mkdir(tmp);
    const rebuildRun = startTestRun({ ...NIX_ENV, TMPDIR: tmp });
    try {
      const staged = await runMain(
        ["--flake", fixture.ref, "--targets", "netboot,unstable", "--out", out, "--tag", "boot-v9"],
        { cwd: work.dir },
      );
      assert.equal(staged.code, 0, staged.stderr);
      const manifest: Manifest = JSON.parse(
        await fs.readFile(path.join(out, "manifest.json"), "utf8"),
      );
      const sums = parseSums(await fs.readFile(path.join(out, "SHA256SUMS"), "utf8"));
      const scope = rebuildScope(manifest, sums);
      assert.deepEqual(scope.targets.sort(), ["netboot", "unstable"]);
      const buildDirsBefore = await keptStampBuildDirs(tmp);

      const rebuilt = await rebuildRelease(rebuildRun, {
        flake: fixture.ref,
        system: scope.system,
        targets: scope.targets,
        downloadBase: "", // a local stage points its iPXE script at its own directory
      });
      const checks = compareRebuild(scope.expected, rebuilt);

      const stamp = "unstable-x86_64-linux.img";
      assert.deepEqual(
        checks.map((check) => [check.name.replace(/build-\d+\.log$/, "build-N.log"), check.result]),
        [
          ["netboot-x86_64-linux.built.ipxe", "identical"],
          ["netboot-x86_64-linux.bzImage", "identical"],
          ["netboot-x86_64-linux.initrd", "identical"],
          ["netboot-x86_64-linux.ipxe", "identical"],
          // The log's name carries the build time: the rebuild made a file by another name.
          ["unstable-x86_64-linux.build-N.log", "missing"],
          [stamp, "different"],
          ["unstable-x86_64-linux.notes.txt", "identical"],
        ],
      );
      const different = checks.find((check) => check.name === stamp);
      assert.ok(different?.result === "different");
      assert.equal(different.expected, sums.get(stamp));
      assert.notEqual(different.actual, different.expected);
      assert.match(different.actual, /^[0-9a-f]{64}$/);
      // The release was staged from the store's copy; the rebuild is the one that differs.
      assert.equal(different.storeSha256, different.expected);
      const verification = { tag: "boot-v9", commit: work.commit, system: SYSTEM, checks };
      assert.equal(verificationExitCode(verification), 1);

      const stampOutput = manifest.assets.find((a) => a.name === stamp)!.storePath
        .split("/").slice(0, 4).join("/");
      assert.match(stampOutput, /^\/nix\/store\/[a-z0-9]{32}-build-stamp$/);
      assert.equal(await exists(stampOutput), true, "the store's own copy stays");
      assert.equal(await exists(`${stampOutput}.check`), false, "the rebuilt copy is removed");
      assert.deepEqual(await keptStampBuildDirs(tmp), buildDirsBefore, "no build directory kept");
    } finally {
      await fs.rm(work.dir, { recursive: true, force: true });
      await fs.rm(fixture.dir, { recursive: true, force: true });
    }
  },
);

nixTest(
  "a rebuild refuses a checkout at another commit or with changes, and names the pinned reference that works",
  async () => {
    const dir = await fs.mkdtemp(path.join(os.tmpdir(), "release-boot-verify-git-"));
    try {
      await fs.copyFile(path.join(fixtureDir, "flake.nix"), path.join(dir, "flake.nix"));
      await fs.writeFile(path.join(dir, "salt.nix"), '"released"\n');
      await git(dir, "init", "-q");
      await git(dir, "add", "flake.nix", "salt.nix");
      await git(dir, "commit", "-q", "-m", "released");
      const released = await git(dir, "rev-parse", "HEAD");
      await fs.writeFile(path.join(dir, "salt.nix"), '"later"\n');
      await git(dir, "commit", "-q", "-a", "-m", "later");
      const later = await git(dir, "rev-parse", "HEAD");
      const release = { tag: "boot-v1", commit: released };

      const refused = await checkFlakeCommit(run, dir, release).then(
        () => assert.fail("a checkout at another commit was accepted"),
        (error) => error,
      );
      assert.ok(refused instanceof ReleaseError);
      assert.equal(
        refused.message,
        `the flake ${dir} is at commit ${later}, but boot-v1 was built from ${released}: check out ${released}, or pass --flake 'git+file://${dir}?rev=${released}'`,
      );
      // The fix it names works as given.
      await checkFlakeCommit(run, `git+file://${dir}?rev=${released}`, release);

      await git(dir, "checkout", "-q", released);
      await checkFlakeCommit(run, dir, release);
      await fs.writeFile(path.join(dir, "salt.nix"), '"edited"\n');
      await assert.rejects(
        checkFlakeCommit(run, dir, release),
        new RegExp(`has uncommitted changes, so it is not commit ${released} that boot-v1`),
      );
      await assert.rejects(
        checkFlakeCommit(run, `path:${dir}`, release),
        /is a path flake without a git revision, so nothing ties it to commit/,
      );
    } finally {
      await fs.rm(dir, { recursive: true, force: true });
    }
  },
);

function asset(name: string, system: string, target: string, sha256: string) {
  return { name, size: 1, sha256, target, system, storePath: "/nix/store/x", drvPath: "/x.drv" };
}

Deno.test("the rebuild scope is one system's targets, with SHA256SUMS and manifest.json agreeing", () => {
  const manifest = {
    tag: "boot-v1",
    assets: [
      asset("netboot-x86_64-linux.initrd", SYSTEM, "netboot", SHA_A),
      asset("iso-x86_64-linux.iso", SYSTEM, "iso", SHA_B),
      asset("sd-aarch64-linux.img.zst", "aarch64-linux", "sd", SHA_C),
    ],
  };
  const sums = new Map(manifest.assets.map((a) => [a.name, a.sha256]));
  assert.throws(
    () => rebuildScope(manifest, sums),
    (error) =>
      error instanceof UsageError &&
      error.message ===
        "boot-v1 holds files for x86_64-linux, aarch64-linux: pass --system with one of them",
  );
  const scope = rebuildScope(manifest, sums, SYSTEM);
  assert.deepEqual(scope.targets, ["netboot", "iso"]);
  assert.deepEqual([...scope.expected.keys()], [
    "netboot-x86_64-linux.initrd",
    "iso-x86_64-linux.iso",
  ]);
  assert.throws(
    () => rebuildScope(manifest, new Map([...sums, ["extra.img", SHA_A]]), SYSTEM),
    /SHA256SUMS of boot-v1 lists extra.img, which its manifest.json does not/,
  );
  assert.throws(
    () => rebuildScope(manifest, new Map([...sums, ["iso-x86_64-linux.iso", SHA_A]]), SYSTEM),
    /iso-x86_64-linux.iso is not listed in boot-v1's SHA256SUMS as manifest.json says/,
  );
});

const VERIFIED: Verification = {
  tag: "boot-v1",
  commit: "0123456789abcdef0123456789abcdef01234567",
  system: SYSTEM,
  checks: compareRebuild(
    new Map([["b.initrd", SHA_A], ["a.bzImage", SHA_B], ["c.iso", SHA_C]]),
    [
      { name: "a.bzImage", size: 1, sha256: SHA_B },
      { name: "b.initrd", size: 1, sha256: SHA_C, storeSha256: SHA_A },
      { name: "d.notes", size: 1, sha256: SHA_A },
    ],
  ),
};

Deno.test("each asset is identical, different (both sums), missing, or rebuilt but not in the release", () => {
  const expected: AssetCheck[] = [
    { name: "a.bzImage", result: "identical", sha256: SHA_B },
    { name: "b.initrd", result: "different", expected: SHA_A, actual: SHA_C, storeSha256: SHA_A },
    { name: "c.iso", result: "missing", expected: SHA_C },
    { name: "d.notes", result: "unlisted", actual: SHA_A },
  ];
  assert.deepEqual(VERIFIED.checks, expected);
  assert.equal(verificationExitCode(VERIFIED), 1);
  const identical = compareRebuild(new Map([["a", SHA_A]]), [
    { name: "a", size: 1, sha256: SHA_A },
    { name: "extra", size: 1, sha256: SHA_B },
  ]);
  assert.equal(verificationExitCode({ ...VERIFIED, checks: identical }), 0, "extras do not fail");
});

Deno.test("a verification prints one line per asset, a JSON document, and a step summary table", () => {
  assert.equal(
    renderVerification(VERIFIED),
    [
      `identical  a.bzImage  ${SHA_B}`,
      `different  b.initrd  release ${SHA_A}  rebuilt ${SHA_C}  (not deterministic: the store's earlier build has ${SHA_A})`,
      `missing    c.iso  release ${SHA_C}  (the rebuild did not produce it)`,
      `unlisted   d.notes  rebuilt ${SHA_A}  (not in the release; not a failure)`,
      "",
    ].join("\n"),
  );
  const json = JSON.parse(JSON.stringify(verificationJson(VERIFIED)));
  assert.equal(json.identical, false);
  assert.equal(json.tag, "boot-v1");
  assert.deepEqual(json.assets[1], {
    name: "b.initrd",
    result: "different",
    expected: SHA_A,
    actual: SHA_C,
    storeSha256: SHA_A,
  });
  const summary = verificationSummary(VERIFIED);
  assert.match(
    summary,
    /does NOT rebuild identically from commit 0123456789abcdef0123456789abcdef01234567: 1 different and 1 missing of 3 files/,
  );
  assert.match(summary, /^\| asset \| result \| release sha256 \| rebuilt sha256 \|$/m);
  assert.match(
    summary,
    new RegExp(
      `^\\| b.initrd \\| \\*\\*different\\*\\* \\| \`${SHA_A}\` \\| \`${SHA_C}\` \\|$`,
      "m",
    ),
  );
  assert.match(
    summary,
    new RegExp(`^\\| c.iso \\| \\*\\*missing\\*\\* \\| \`${SHA_C}\` \\| \\|$`, "m"),
  );
});

Deno.test("the verify step summary shows the release's tag, system and asset names as text", () => {
  const summary = verificationSummary({
    tag: "boot-v1 <img src=x>|`x`\n# Sign in",
    commit: "0123456789abcdef0123456789abcdef01234567",
    system: "x86_64-linux|<b>",
    checks: [
      { name: "a|b`c`<i>\n| injected | row |", result: "identical", sha256: SHA_A },
      { name: "d.notes<script>", result: "unlisted", actual: SHA_B },
    ],
  });
  const tag = "boot-v1 \\<img src=x\\>\\|\\`x\\` # Sign in";
  assert.deepEqual(summary.split("\n"), [
    `### Verify ${tag} (x86\\_64-linux\\|\\<b\\>)`,
    "",
    `${tag} rebuilds identically from commit 0123456789abcdef0123456789abcdef01234567: 1 of 1 files`,
    "",
    "| asset | result | release sha256 | rebuilt sha256 |",
    "|---|---|---|---|",
    `| a\\|b\\\`c\\\`\\<i\\> \\| injected \\| row \\| | identical | \`${SHA_A}\` | \`${SHA_A}\` |`,
    `| d.notes\\<script\\> | not in the release | | \`${SHA_B}\` |`,
    "",
  ]);
});

Deno.test("a tag that would open a heading, a list or a rule opens the verdict as text", () => {
  const verdicts = ["# Sign in", "- item", "+ item", "1. item", "2) item", "=== x", " # x"]
    .map((tag) =>
      verificationSummary({
        tag,
        commit: "0123456789abcdef0123456789abcdef01234567",
        system: "x86_64-linux",
        checks: [{ name: "a.iso", result: "identical", sha256: SHA_A }],
      }).split("\n")[2].replace(/ rebuilds identically .*/, "")
    );
  assert.deepEqual(verdicts, [
    "\\# Sign in",
    "\\- item",
    "\\+ item",
    "1\\. item",
    "2\\) item",
    "\\=== x",
    " \\# x",
  ]);
});

const NOW = new Date("2026-12-01T12:00:00Z");
const MiB = 1 << 20;

function daysAgo(days: number): string {
  return new Date(NOW.getTime() - days * 24 * 60 * 60 * 1000).toISOString();
}

let nextId = 1;
function release(
  tag: string,
  days: number,
  fields: { draft?: boolean; sizes?: number[]; uploadedDaysAgo?: number } = {},
): PruneRelease {
  const date = daysAgo(days);
  return {
    id: nextId++,
    tag_name: tag,
    draft: fields.draft ?? false,
    created_at: date,
    published_at: date,
    assets: (fields.sizes ?? [MiB]).map((size) => ({
      size,
      created_at: daysAgo(fields.uploadedDaysAgo ?? days),
    })),
  };
}

Deno.test("prune deletes old boot-dev releases, stale drafts and orphan boot-dev tags, never a published boot-v", () => {
  const releases = [
    release("boot-v1.0.0", 400),
    release("boot-v1.1.0", 30),
    release("boot-dev-aaaa", 1),
    release("boot-dev-bbbb", 2),
    release("boot-dev-cccc", 3),
    release("boot-dev-dddd", 20, { sizes: [3 * MiB, MiB] }),
    release("boot-dev-eeee", 40),
    // Created long ago, but a job uploaded to it yesterday: still being assembled.
    release("boot-v1.2.0", 10, { draft: true, uploadedDaysAgo: 1 }),
    release("boot-v1.3.0", 9, { draft: true, sizes: [2 * MiB] }),
    release("boot-dev-ffff", 8, { draft: true }),
    release("boot-dev-gggg", 2, { draft: true }),
    release("v0.1.0", 500),
    release("notes", 500, { draft: true }),
  ];
  const tags = [
    "boot-v1.0.0",
    "boot-v1.1.0",
    "boot-v0.9.0", // a boot-v tag without a release is not prune's to delete
    "boot-dev-aaaa",
    "boot-dev-bbbb",
    "boot-dev-cccc",
    "boot-dev-dddd",
    "boot-dev-eeee",
    "boot-dev-0000", // its release was deleted by a run that stopped before the tag
    "v0.1.0",
  ].map((name) => ({ name }));

  const plan = planPrune(releases, tags, NOW, 3, 7);
  assert.deepEqual(
    plan.deletions.map((d) => [d.tag, d.releaseId !== undefined, d.draft, d.deleteTag, d.bytes]),
    [
      ["boot-dev-eeee", true, false, true, MiB],
      ["boot-dev-dddd", true, false, true, 4 * MiB],
      ["boot-v1.3.0", true, true, false, 2 * MiB],
      ["boot-dev-ffff", true, true, false, MiB],
      ["boot-dev-0000", false, false, true, 0],
    ],
  );
  assert.equal(plan.deletions[0].ageDays, 40);
  const deleted = new Set(plan.deletions.map((d) => d.tag));
  for (const tag of ["boot-v1.0.0", "boot-v1.1.0", "boot-v0.9.0"]) assert.ok(!deleted.has(tag));
  assert.deepEqual(
    new Map(plan.kept.map((k) => [k.tag, k.why])),
    new Map([
      ["boot-v1.0.0", "a published boot-v* release"],
      ["boot-v1.1.0", "a published boot-v* release"],
      ["boot-v1.2.0", "draft changed 1 day ago: it may still be assembled"],
      ["boot-dev-gggg", "draft changed 2 days ago: it may still be assembled"],
      ["boot-dev-aaaa", "one of the 3 newest boot-dev releases"],
      ["boot-dev-bbbb", "one of the 3 newest boot-dev releases"],
      ["boot-dev-cccc", "one of the 3 newest boot-dev releases"],
    ]),
  );

  // Without the tag list, no orphan is found and every old boot-dev release takes its tag.
  const untagged = planPrune(releases, undefined, NOW, 3, 7);
  assert.deepEqual(untagged.deletions.map((d) => [d.tag, d.deleteTag]), [
    ["boot-dev-eeee", true],
    ["boot-dev-dddd", true],
    ["boot-v1.3.0", false],
    ["boot-dev-ffff", false],
  ]);
  // keep 0 removes every published boot-dev release; a boot-v release still never goes.
  const all = planPrune(releases, tags, NOW, 0, 7).deletions.map((d) => d.tag);
  assert.ok(!all.some((tag) => tag.startsWith("boot-v1.0") || tag === "boot-v1.1.0"));
  assert.equal(all.filter((tag) => tag.startsWith("boot-dev-")).length, 7);
});

Deno.test("prune keeps what it cannot date and refuses a keep or staleness that makes no sense", () => {
  const undated: PruneRelease = {
    id: 1,
    tag_name: "boot-dev-old",
    draft: true,
    assets: [{ size: 1 }],
  };
  const plan = planPrune([undated], [], NOW, 0, 7);
  assert.deepEqual(plan.deletions, []);
  assert.deepEqual(plan.kept, [{
    tag: "boot-dev-old",
    why: "Forgejo gave no date to judge its age by",
  }]);
  assert.throws(() => planPrune([], [], NOW, -1, 7), UsageError);
  assert.throws(() => planPrune([], [], NOW, 5, 0), /give 1 or more/);
});

Deno.test("prune prints each deletion with age and size, then the bytes freed", () => {
  const plan = planPrune(
    [
      release("boot-dev-old", 12, { sizes: [MiB, 512 * 1024] }),
      release("boot-v2.0.0", 9, { draft: true, sizes: [] }),
    ],
    [{ name: "boot-dev-old" }, { name: "boot-dev-gone" }],
    NOW,
    0,
    7,
  );
  const lines = plan.deletions.map((d) => renderPruneDeletion(d, false));
  assert.deepEqual(lines, [
    "Deleted release boot-dev-old and its tag (12 days old, 1.5 MiB): no boot-dev release is kept",
    "Deleted draft boot-v2.0.0 (9 days old, 0 B): draft unchanged for 9 days (stale after 7)",
    "Deleted tag boot-dev-gone: a tag left behind by a release deleted earlier",
  ]);
  assert.equal(renderPruneTotal(plan.deletions, false), "Freed 1.5 MiB from 2 releases and 1 tag");
  assert.match(renderPruneDeletion(plan.deletions[0], true), /^Would delete release boot-dev-old/);
  assert.equal(
    renderPruneTotal(plan.deletions, true),
    "Would free 1.5 MiB from 2 releases and 1 tag; --dry-run deleted nothing",
  );
  assert.equal(renderPruneTotal([], false), "Nothing to prune");
});

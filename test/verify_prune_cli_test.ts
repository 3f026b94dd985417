/**
 * `release-boot verify` and `release-boot prune` from the command line: release-boot's main,
 * run in this process, against the Forgejo emulator (and, for verify, real nix rebuilds).
 */
import assert from "node:assert/strict";
import * as fs from "node:fs/promises";
import * as path from "node:path";
import { parseSigningKey, signSums } from "../scripts/lib/sshsig.ts";
import { type Emulator, startForgejo } from "./forgejo/emulator.ts";
import { TAG, TOKEN, withWorld, type World } from "./forgejo_world.ts";
import { nixTest } from "./nix_helpers.ts";
import { baseEnv, type Run, runMain } from "./run_helpers.ts";
import { git, publishFromGit } from "./git_fixture.ts";

const DAY_MS = 24 * 60 * 60 * 1000;
const SHA = /[0-9a-f]{64}/.source;
/** Retries of an injected 500 take milliseconds, not seconds. */
const FAST = { RELEASE_BOOT_RETRY_DELAY_MS: "1" };

function lines(text: string): string[] {
  return text.trim().split("\n").filter(Boolean);
}

// ---------------------------------------------------------------------------------------------
// Flags
// ---------------------------------------------------------------------------------------------

Deno.test("verify and prune refuse bad flags with one line and exit 2, before any request", async () => {
  const at = ["--server", "https://git.example.org", "--repo", "ops/runners"];
  const cases: [string[], RegExp][] = [
    [
      ["prune", ...at, "--keep=-1"],
      /^release-boot: bad --keep "-1": it must be at least 0 releases$/,
    ],
    [
      ["prune", ...at, "--keep", "some"],
      /^release-boot: bad --keep "some": it is not a number of releases$/,
    ],
    [["prune", ...at, "--keep", "2.5"], /bad --keep "2\.5": it is not a whole number of releases/],
    [["prune", ...at, "--stale-drafts", "0"], /bad --stale-drafts "0": it must be at least 1 days/],
    [
      ["prune", ...at, "--stale-drafts", "week"],
      /bad --stale-drafts "week": it is not a number of days/,
    ],
    [
      ["prune", ...at, "--tag", "boot-v1"],
      /^release-boot: --tag is a flag of release, fetch and verify, not of prune; see --help$/,
    ],
    [["prune", "--repo", "ops/runners"], /prune needs --server URL/],
    [["verify", ...at], /verify needs --tag TAG, or --tag latest/],
    [["verify", ...at, "--tag", "boot v1"], /bad --tag "boot v1": it contains a space/],
    [
      ["verify", ...at, "--tag", "latest", "--keep", "3"],
      /--keep is a flag of fetch and prune, not of verify/,
    ],
    [["verify", ...at, "--tag", "latest", "--system", "x86"], /bad --system "x86"/],
    [
      ["--keep", "3"],
      /^release-boot: --keep is a flag of fetch and prune, not of release; see --help$/,
    ],
    [
      ["fetch", ...at, "--tag", "latest", "--out", "x", "--json"],
      /--json is a flag of verify, not of fetch/,
    ],
  ];
  for (const [args, message] of cases) {
    const run = await runMain(args);
    assert.equal(run.code, 2, `${args.join(" ")}: ${run.stderr}`);
    assert.equal(lines(run.stderr).length, 1, run.stderr);
    assert.match(run.stderr.trim(), message);
    assert.equal(run.stdout, "");
  }
});

// ---------------------------------------------------------------------------------------------
// prune
// ---------------------------------------------------------------------------------------------

interface Made {
  tag: string;
  daysAgo: number;
  draft?: boolean;
  /** Days ago an asset was uploaded, when later than the release was made. */
  uploadedDaysAgo?: number;
}

const COMMIT = "0123456789abcdef0123456789abcdef01234567";

/** A release made through the real API with the emulator's clock set `daysAgo` days back. */
async function makeRelease(forgejo: Emulator, made: Made): Promise<void> {
  const api = `${forgejo.url}/api/v1/repos/ops/runners/releases`;
  const headers = { authorization: `token ${TOKEN}` };
  forgejo.setNow(new Date(Date.now() - made.daysAgo * DAY_MS));
  const created = await fetch(api, {
    method: "POST",
    headers: { ...headers, "content-type": "application/json" },
    body: JSON.stringify({
      tag_name: made.tag,
      target_commitish: COMMIT,
      draft: made.draft ?? false,
      prerelease: made.tag.startsWith("boot-dev-"),
    }),
  });
  assert.equal(created.status, 201, await created.clone().text());
  const { id } = await created.json();
  forgejo.setNow(new Date(Date.now() - (made.uploadedDaysAgo ?? made.daysAgo) * DAY_MS));
  const upload = await fetch(`${api}/${id}/assets?name=image.img`, {
    method: "POST",
    headers: { ...headers, "content-type": "application/octet-stream" },
    body: new Uint8Array(1024),
  });
  await upload.body?.cancel();
  assert.equal(upload.status, 201);
  forgejo.setNow();
}

const HISTORY: Made[] = [
  { tag: "boot-v1.0.0", daysAgo: 400 },
  { tag: "boot-v1.1.0", daysAgo: 30 },
  { tag: "boot-dev-aaaaaaaaaaaa", daysAgo: 1 },
  { tag: "boot-dev-bbbbbbbbbbbb", daysAgo: 2 },
  { tag: "boot-dev-cccccccccccc", daysAgo: 3 },
  { tag: "boot-dev-dddddddddddd", daysAgo: 20 },
  { tag: "boot-dev-eeeeeeeeeeee", daysAgo: 40 },
  { tag: "boot-v2.0.0", daysAgo: 10, draft: true },
  // Made long ago, but a job uploaded to it yesterday: another run is still assembling it.
  { tag: "boot-v1.2.0", daysAgo: 10, draft: true, uploadedDaysAgo: 1 },
  { tag: "boot-dev-ffffffffffff", daysAgo: 8, draft: true },
  { tag: "boot-dev-999999999999", daysAgo: 2, draft: true },
];

/** What --keep 3 --stale-drafts 7 leaves of HISTORY: releases (draft marked) and git tags. */
const PRUNED = {
  releases: [
    "boot-dev-999999999999 (draft)",
    "boot-dev-aaaaaaaaaaaa",
    "boot-dev-bbbbbbbbbbbb",
    "boot-dev-cccccccccccc",
    "boot-v1.0.0",
    "boot-v1.1.0",
    "boot-v1.2.0 (draft)",
  ],
  tags: [
    "boot-dev-aaaaaaaaaaaa",
    "boot-dev-bbbbbbbbbbbb",
    "boot-dev-cccccccccccc",
    "boot-v1.0.0",
    "boot-v1.1.0",
  ],
};

async function historyServer(): Promise<Emulator> {
  const forgejo = await startForgejo();
  forgejo.addCommit(COMMIT);
  for (const made of HISTORY) await makeRelease(forgejo, made);
  // Left by a prune that deleted the release and stopped before its tag.
  forgejo.addTag("boot-dev-000000000000", COMMIT);
  return forgejo;
}

function holdings(forgejo: Emulator) {
  const releases = (forgejo.releases() as { tag_name: string; draft: boolean }[])
    .map((r) => `${r.tag_name}${r.draft ? " (draft)" : ""}`).sort();
  return { releases, tags: Object.keys(forgejo.tags()).sort() };
}

async function prune(forgejo: Emulator, args: string[], env = {}): Promise<Run> {
  return await runMain(
    ["prune", "--server", forgejo.url, "--repo", "ops/runners", "--timeout", "3", ...args],
    { env: baseEnv({ FORGEJO_TOKEN: TOKEN, ...FAST, ...env }) },
  );
}

const KEEP_3 = ["--keep", "3", "--stale-drafts", "7"];

Deno.test("prune --dry-run prints every deletion and the total, and sends no write", async () => {
  const forgejo = await historyServer();
  try {
    const before = holdings(forgejo);
    const mark = forgejo.requests.length;
    const run = await prune(forgejo, [...KEEP_3, "--dry-run"]);
    assert.equal(run.code, 0, run.stderr);
    assert.deepEqual(forgejo.requests.slice(mark).filter((r) => r.method !== "GET"), []);
    assert.deepEqual(holdings(forgejo), before);
    assert.deepEqual(lines(run.stdout), [
      "Would delete release boot-dev-eeeeeeeeeeee and its tag (40 days old, 1.0 KiB): older than the 3 newest boot-dev releases",
      "Would delete release boot-dev-dddddddddddd and its tag (20 days old, 1.0 KiB): older than the 3 newest boot-dev releases",
      "Would delete draft boot-v2.0.0 (10 days old, 1.0 KiB): draft unchanged for 10 days (stale after 7)",
      "Would delete draft boot-dev-ffffffffffff (8 days old, 1.0 KiB): draft unchanged for 8 days (stale after 7)",
      "Would delete tag boot-dev-000000000000: a tag left behind by a release deleted earlier",
      "Would free 4.0 KiB from 4 releases and 1 tag; --dry-run deleted nothing",
    ]);
    assert.match(
      run.stderr,
      /Keeping boot-v1\.2\.0: draft changed 1 day ago: it may still be assembled/,
    );
    assert.match(run.stderr, /Keeping boot-v1\.0\.0: a published boot-v\* release/);
  } finally {
    await forgejo.close();
  }
});

Deno.test("prune leaves exactly the newest boot-dev releases, young drafts and every boot-v release", async () => {
  const forgejo = await historyServer();
  try {
    const run = await prune(forgejo, KEEP_3);
    assert.equal(run.code, 0, run.stderr);
    assert.deepEqual(holdings(forgejo), PRUNED);
    assert.equal(lines(run.stdout).at(-1), "Freed 4.0 KiB from 4 releases and 1 tag");
    assert.match(run.stdout, /^Deleted release boot-dev-eeeeeeeeeeee and its tag \(40 days old/m);
    // The deleted releases' files are gone from storage too.
    const stored = forgejo.releases() as { assets: unknown[] }[];
    assert.ok(stored.every((r) => r.assets.length === 1));

    const again = await prune(forgejo, KEEP_3);
    assert.equal(again.code, 0, again.stderr);
    assert.equal(again.stdout, "Nothing to prune\n");
    assert.deepEqual(holdings(forgejo), PRUNED);
  } finally {
    await forgejo.close();
  }
});

Deno.test("a prune that fails half-way leaves the rest whole, and a rerun ends in the same set", async () => {
  const forgejo = await historyServer();
  try {
    // Every try of the second tag deletion fails: the first deletion is whole, the second
    // has lost its release but not its tag, the rest are untouched.
    forgejo.addFault({
      method: "DELETE",
      path: "/tags/boot-dev-dddddddddddd",
      fault: { kind: "status", status: 500 },
      times: 5,
    });
    const failed = await prune(forgejo, KEEP_3);
    assert.equal(failed.code, 1, failed.stderr);
    assert.match(
      failed.stderr,
      /^release-boot: Forgejo answered 500 for DELETE \/api\/v1\/repos\/ops\/runners\/tags\/boot-dev-dddddddddddd.* \(prune stopped after 1 of 5 deletions; the releases it did not reach are untouched: rerun to continue\)$/m,
    );
    assert.deepEqual(lines(failed.stdout), [
      "Deleted release boot-dev-eeeeeeeeeeee and its tag (40 days old, 1.0 KiB): older than the 3 newest boot-dev releases",
    ]);
    const half = holdings(forgejo);
    assert.ok(half.tags.includes("boot-dev-dddddddddddd"));
    assert.ok(!half.releases.includes("boot-dev-dddddddddddd"));
    for (const whole of ["boot-v2.0.0 (draft)", "boot-dev-ffffffffffff (draft)"]) {
      assert.ok(half.releases.includes(whole), `${whole} is untouched`);
    }

    const rerun = await prune(forgejo, KEEP_3);
    assert.equal(rerun.code, 0, rerun.stderr);
    assert.match(
      rerun.stdout,
      /^Deleted tag boot-dev-dddddddddddd: a tag left behind by a release deleted earlier$/m,
    );
    assert.deepEqual(holdings(forgejo), PRUNED);
  } finally {
    await forgejo.close();
  }
});

Deno.test("prune needs a token and never runs against a mirror", async () => {
  const forgejo = await historyServer();
  try {
    const anonymous = await runMain(
      ["prune", "--server", forgejo.url, "--repo", "ops/runners"],
      { env: baseEnv() },
    );
    assert.equal(anonymous.code, 2);
    assert.match(anonymous.stderr, /^release-boot: prune deletes releases: set FORGEJO_TOKEN/);
    const mark = forgejo.requests.length;
    const mirrored = await prune(forgejo, ["--mirrors", forgejo.url]);
    assert.equal(mirrored.code, 1);
    assert.match(mirrored.stderr, /it is on the mirror list/);
    assert.equal(forgejo.requests.length, mark, "nothing was sent to the mirror");
    assert.doesNotMatch(anonymous.stderr + mirrored.stderr, new RegExp(TOKEN));
  } finally {
    await forgejo.close();
  }
});

// ---------------------------------------------------------------------------------------------
// verify
// ---------------------------------------------------------------------------------------------

Deno.test("verify refuses a release it cannot check in one line, before building anything", async () => {
  const forgejo = await startForgejo();
  try {
    forgejo.addCommit(COMMIT);
    const run = (tag: string) =>
      runMain(
        [
          "verify",
          "--server",
          forgejo.url,
          "--repo",
          "ops/runners",
          "--tag",
          tag,
          "--timeout",
          "3",
        ],
        { env: baseEnv(FAST) },
      );
    const none = await run("latest");
    assert.equal(none.code, 1);
    assert.equal(
      none.stderr,
      "==> Find the release\nrelease-boot: ops/runners has no published boot-v* release yet; pass --tag\n",
    );
    // A release someone made by hand: nothing says what its files should be.
    await makeRelease(forgejo, { tag: "boot-v3.0.0", daysAgo: 1 });
    const bare = await run("latest");
    assert.equal(bare.code, 1);
    assert.match(
      lines(bare.stderr).at(-1)!,
      /^release-boot: boot-v3\.0\.0 has no SHA256SUMS and manifest\.json: it was not made by release-boot, or not finished; nothing can be verified$/,
    );
    assert.equal(bare.stdout, "");
  } finally {
    await forgejo.close();
  }
});

async function verify(w: World, args: string[], env: Record<string, string> = {}): Promise<Run> {
  return await runMain(
    ["verify", "--server", w.forgejo.url, "--repo", "ops/runners", "--timeout", "3", ...args],
    { cwd: w.work.dir, env: baseEnv({ ...FAST, ...env }) },
  );
}

nixTest(
  "verify rebuilds a release from its commit: every file identical, exit 0, JSON and step summary",
  () =>
    withWorld(async (w) => {
      const checkout = await publishFromGit(w, "netboot", `verify-${crypto.randomUUID()}`);
      try {
        const summary = path.join(checkout.dir, "summary.md");
        const run = await verify(w, ["--tag", TAG, "--flake", checkout.pinned], {
          GITHUB_STEP_SUMMARY: summary,
        });
        assert.equal(run.code, 0, run.stderr);
        const verdict = `${TAG} rebuilds identically from commit ${checkout.commit}: 4 of 4 files`;
        assert.equal(lines(run.stderr).at(-1), verdict);
        assert.deepEqual(
          lines(run.stdout).map((line) => line.replace(new RegExp(SHA), "SHA")),
          [
            "identical  netboot-x86_64-linux.built.ipxe  SHA",
            "identical  netboot-x86_64-linux.bzImage  SHA",
            "identical  netboot-x86_64-linux.initrd  SHA",
            // Regenerated with the release's download URLs, exactly as published.
            "identical  netboot-x86_64-linux.ipxe  SHA",
          ],
        );
        assert.match(await fs.readFile(summary, "utf8"), new RegExp(`^${verdict}$`, "m"));

        // latest is the newest published boot-v*; --json is the document alone on stdout.
        const json = await verify(w, ["--tag", "latest", "--flake", checkout.pinned, "--json"]);
        assert.equal(json.code, 0, json.stderr);
        const document = JSON.parse(json.stdout);
        assert.equal(document.tag, TAG);
        assert.equal(document.commit, checkout.commit);
        assert.equal(document.identical, true);
        assert.equal(document.assets.length, 4);

        // Without --flake the release's tag and commit in its own repository are rebuilt. The
        // emulator serves no git, but nix's fetcher cache holds that commit (by rev, whatever
        // the URL) from the runs above, so only the right commit could be found.
        const defaulted = await verify(w, ["--tag", TAG]);
        assert.equal(defaulted.code, 0, defaulted.stderr);
        const reference =
          `git+${w.forgejo.url}/ops/runners?ref=refs%2Ftags%2F${TAG}&rev=${checkout.commit}`;
        assert.match(defaulted.stderr, new RegExp(`^Rebuilding ${TAG} from (.*)$`, "m"));
        assert.equal(defaulted.stderr.match(/^Rebuilding \S+ from (.*)$/m)![1], reference);

        // The checkout itself, moved on by a commit, is refused in one line naming the fix.
        await fs.writeFile(path.join(checkout.dir, "salt.nix"), '"later"\n');
        await git(checkout.dir, "commit", "-q", "-a", "-m", "later");
        const later = await git(checkout.dir, "rev-parse", "HEAD");
        const moved = await verify(w, ["--tag", TAG, "--flake", checkout.dir]);
        assert.equal(moved.code, 1);
        assert.equal(moved.stdout, "");
        assert.deepEqual(lines(moved.stderr).filter((l) => l.startsWith("release-boot:")), [
          `release-boot: the flake ${checkout.dir} is at commit ${later}, but ${TAG} was built from ${checkout.commit}: check out ${checkout.commit}, or pass --flake 'git+file://${checkout.dir}?rev=${checkout.commit}'`,
        ]);
      } finally {
        await fs.rm(checkout.dir, { recursive: true, force: true });
      }
    }),
);

nixTest(
  "verify reports a file that does not rebuild the same with both sums and exits 1",
  () =>
    withWorld(async (w) => {
      const checkout = await publishFromGit(w, "unstable", `unstable-${crypto.randomUUID()}`);
      try {
        const run = await verify(w, ["--tag", TAG, "--flake", checkout.pinned]);
        assert.equal(run.code, 1, run.stderr);
        const [sums] = await w.forgejo.assetBytes(w.release().id, "SHA256SUMS");
        const published = new TextDecoder().decode(sums).match(
          new RegExp(`^(${SHA})  unstable-x86_64-linux\\.img$`, "m"),
        )![1];
        const line = lines(run.stdout).find((l) => l.includes("unstable-x86_64-linux.img"))!;
        const [, release, rebuilt] = line.match(
          new RegExp(`^different  unstable-x86_64-linux\\.img  release (${SHA})  rebuilt (${SHA})`),
        )!;
        assert.equal(release, published);
        assert.notEqual(rebuilt, published);
        assert.match(run.stdout, /^identical {2}unstable-x86_64-linux\.notes\.txt {2}/m);
        // The build log is named after the build time: the rebuild made another name.
        assert.match(run.stdout, /^missing {4}unstable-x86_64-linux\.build-\d+\.log {2}release /m);
        assert.match(
          run.stderr,
          new RegExp(
            `^release-boot: ${TAG} does NOT rebuild identically from commit ${checkout.commit}: 1 different and 1 missing of 3 files; find what differs with diffoscope`,
            "m",
          ),
        );
      } finally {
        await fs.rm(checkout.dir, { recursive: true, force: true });
      }
    }),
);

nixTest(
  "verify --trust requires SHA256SUMS.sig by a trusted key, and never sends the token to a mirror",
  () =>
    withWorld(async (w) => {
      const checkout = await publishFromGit(w, "netboot", `signed-${crypto.randomUUID()}`);
      try {
        const keyFile = path.join(checkout.dir, "release-key");
        const other = path.join(checkout.dir, "other-key");
        for (const file of [keyFile, other]) {
          await new Deno.Command("ssh-keygen", {
            args: ["-q", "-t", "ed25519", "-N", "", "-C", "release", "-f", file],
          }).output();
        }
        const trusted = path.join(checkout.dir, "trusted.pub");
        await fs.copyFile(`${keyFile}.pub`, trusted);
        const untrusted = path.join(checkout.dir, "untrusted.pub");
        await fs.copyFile(`${other}.pub`, untrusted);
        const args = ["--tag", TAG, "--flake", checkout.pinned];

        const unsigned = await verify(w, [...args, "--trust", trusted]);
        assert.equal(unsigned.code, 1);
        assert.match(
          unsigned.stderr,
          /^release-boot: boot-v1\.0\.0 has no SHA256SUMS\.sig, so nothing proves who made its SHA256SUMS/m,
        );

        const release = w.release();
        const [sums] = await w.forgejo.assetBytes(release.id, "SHA256SUMS");
        const key = await parseSigningKey(await fs.readFile(keyFile, "utf8"));
        const signature = await signSums(key, sums);
        const upload = await fetch(
          `${w.forgejo.url}/api/v1/repos/ops/runners/releases/${release.id}/assets?name=SHA256SUMS.sig`,
          {
            method: "POST",
            headers: { authorization: `token ${TOKEN}`, "content-type": "text/plain" },
            body: signature,
          },
        );
        await upload.body?.cancel();
        assert.equal(upload.status, 201);

        const wrongKey = await verify(w, [...args, "--trust", untrusted]);
        assert.equal(wrongKey.code, 1);
        assert.match(wrongKey.stderr, /^release-boot: .*SHA256SUMS\.sig/m);
        assert.equal(wrongKey.stdout, "", "nothing was rebuilt on an untrusted index");

        const mark = w.forgejo.requests.length;
        const signed = await verify(w, [...args, "--trust", trusted, "--mirrors", w.forgejo.url], {
          FORGEJO_TOKEN: TOKEN,
        });
        assert.equal(signed.code, 0, signed.stderr);
        assert.match(signed.stderr, /SHA256SUMS is signed by /);
        assert.ok(w.forgejo.requests.slice(mark).every((r) => !r.headers.authorization));
        assert.doesNotMatch(signed.stdout + signed.stderr, new RegExp(TOKEN));
      } finally {
        await fs.rm(checkout.dir, { recursive: true, force: true });
      }
    }),
);

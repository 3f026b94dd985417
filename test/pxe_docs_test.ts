/**
 * docs/PXE.md's commands, run as an operator runs them. The block marked
 * `<!-- test: fetch-current -->` fetches a signed release into a boot directory, which must then
 * hold the layout the doc describes. The block marked `<!-- test: make-ca -->` makes a CA and a
 * code-signing certificate, and openssl then checks what iPXE and release-boot need of them.
 * Needs openssl (.ci/install installs it).
 */
import assert from "node:assert/strict";
import * as fs from "node:fs/promises";
import * as os from "node:os";
import * as path from "node:path";
import { $ } from "zx";
import { NETBOOT, world } from "./forgejo_world.ts";
import { nixTest } from "./nix_helpers.ts";
import { baseEnv, repoRoot } from "./run_helpers.ts";
import { makeKeys } from "./signing_helpers.ts";

const PXE_DOC = path.join(repoRoot, "docs", "PXE.md");

/** The shell block that follows `<!-- test: NAME -->` in the doc; exactly one must. */
async function markedBlock(name: string): Promise<string> {
  const doc = await fs.readFile(PXE_DOC, "utf8");
  const blocks = [
    ...doc.matchAll(
      new RegExp(`<!-- test: ${name} -->\\n\\n?\`\`\`sh\\n([\\s\\S]*?)\\n\`\`\`\\n`, "g"),
    ),
  ];
  assert.equal(blocks.length, 1, `docs/PXE.md has one sh block marked <!-- test: ${name} -->`);
  return blocks[0][1];
}

/** The certificates of a PEM file, in order. */
function pemCertificates(text: string): string[] {
  return text.match(/-----BEGIN CERTIFICATE-----\n[\s\S]*?-----END CERTIFICATE-----\n/g) ?? [];
}

async function x509Text(pem: string): Promise<string> {
  return (await $({ input: pem })`openssl x509 -noout -text`.quiet()).stdout;
}

/** The text after an extension's name in `openssl x509 -text`, e.g. "critical" and its values. */
function extension(text: string, name: string): string {
  const match = text.match(new RegExp(`X509v3 ${name}:( critical)? *\\n\\s*(.*)\\n`));
  assert.ok(match, `the certificate has X509v3 ${name}`);
  return `${match[1] ? "critical " : ""}${match[2].trim()}`;
}

nixTest(
  "the fetch commands of docs/PXE.md's choice (a) leave current pointing at the release, which sha256sum -c checks",
  async () => {
    const w = await world();
    const keys = await makeKeys();
    const srv = await fs.mkdtemp(path.join(os.tmpdir(), "release-boot-srv-"));
    try {
      const published = await w.publish(["--targets", "netboot", "--tag", "boot-v1.2.0"], {
        RELEASE_BOOT_SIGNING_KEY: keys.keyText,
      });
      assert.equal(published.code, 0, published.stderr);
      // The doc's server, trust file and /srv, here; the operator's sudo is this user already.
      const netboot = path.join(srv, "netboot");
      const block = (await markedBlock("fetch-current"))
        .replaceAll("sudo ", "")
        .replaceAll("https://git.example.org", w.forgejo.url)
        .replaceAll("/etc/release-boot/allowed_signers", keys.allowedSigners)
        .replaceAll("/srv/netboot", netboot);
      const env = baseEnv({ USER: os.userInfo().username });
      const run = await $({ cwd: repoRoot, env, nothrow: true })`sh -eu -c ${block}`.quiet();
      assert.equal(run.exitCode, 0, `${run.stdout}${run.stderr}`);
      assert.match(run.stdout, /^netboot-x86_64-linux\.bzImage: OK$/m, "sha256sum -c checked");

      // What the doc says /srv/netboot then holds.
      assert.deepEqual((await fs.readdir(netboot)).filter((name) => !name.startsWith(".")).sort(), [
        "boot-v1.2.0",
        "current",
      ]);
      assert.equal(await fs.readlink(path.join(netboot, "current")), "boot-v1.2.0");
      // The four netboot-x86_64-linux.* files, netboot.ipxe and SHA256SUMS.
      const release = (await fs.readdir(path.join(netboot, "boot-v1.2.0")))
        .filter((name) => !name.startsWith("."));
      assert.deepEqual(release.sort(), ["SHA256SUMS", ...NETBOOT, "netboot.ipxe"].sort());
    } finally {
      await w.close();
      await fs.rm(keys.dir, { recursive: true, force: true });
      await fs.rm(srv, { recursive: true, force: true });
    }
  },
);

Deno.test("the make-ca commands of docs/PXE.md leave a CA, and a code-signing key with its certificate chain up to that CA", async () => {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), "release-boot-make-ca-"));
  try {
    await $({ cwd: dir })`sh -eu -c ${await markedBlock("make-ca")}`.quiet();
    const file = (name: string) => path.join(dir, name);
    assert.deepEqual((await fs.readdir(dir)).sort(), [
      "ca.crt",
      "ca.key",
      "ca.srl",
      "ipxe-signing.crt",
      "ipxe-signing.key",
    ]);
    for (const key of ["ca.key", "ipxe-signing.key"]) {
      assert.equal(
        (await fs.stat(file(key))).mode & 0o077,
        0,
        `${key} is readable by its owner only`,
      );
    }

    const ca = await fs.readFile(file("ca.crt"), "utf8");
    const caText = await x509Text(ca);
    assert.equal(extension(caText, "Basic Constraints"), "critical CA:TRUE");
    assert.match(extension(caText, "Key Usage"), /Certificate Sign/);

    // What release-boot takes as --ipxe-signing-cert: the signer first, the root last.
    const chain = pemCertificates(await fs.readFile(file("ipxe-signing.crt"), "utf8"));
    assert.equal(chain.length, 2);
    assert.equal(chain[1], ca, "the chain ends with the root certificate itself");
    const signer = await x509Text(chain[0]);
    assert.equal(extension(signer, "Basic Constraints"), "critical CA:FALSE");
    assert.equal(extension(signer, "Key Usage"), "critical Digital Signature");
    assert.equal(extension(signer, "Extended Key Usage"), "Code Signing");
    const bits = Number(signer.match(/Public-Key: \((\d+) bit\)/)?.[1]);
    assert.match(signer, /Public Key Algorithm: rsaEncryption/);
    assert.ok(bits >= 2048, `RSA of 2048 bits or more, not ${bits}`);
    await $({ input: chain[0] })`openssl x509 -noout -checkend 0`.quiet();

    const verified = await $`openssl verify -purpose any -CAfile ${file("ca.crt")} ${
      file("ipxe-signing.crt")
    }`
      .quiet();
    assert.equal(verified.stdout.trim(), `${file("ipxe-signing.crt")}: OK`);

    const fromCert = await $({ input: chain[0] })`openssl x509 -noout -pubkey`.quiet();
    const fromKey = await $`openssl pkey -in ${file("ipxe-signing.key")} -pubout`.quiet();
    assert.equal(fromCert.stdout, fromKey.stdout, "the key is the certificate's");

    // A signature as the release carries it (detached CMS, DER, SHA-256, no signed attributes,
    // the whole chain) verifies under the CA alone.
    await fs.writeFile(file("netboot.ipxe"), "#!ipxe\nboot\n");
    await fs.writeFile(file("issuers.pem"), chain.slice(1).join(""));
    const sign = [
      ["-in", file("netboot.ipxe"), "-signer", file("ipxe-signing.crt")],
      ["-inkey", file("ipxe-signing.key"), "-certfile", file("issuers.pem")],
      ["-outform", "DER", "-out", file("netboot.ipxe.sig")],
    ].flat();
    await $`openssl cms -sign -binary -noattr -md sha256 ${sign}`.quiet();
    const verify = [
      ["-in", file("netboot.ipxe.sig"), "-content", file("netboot.ipxe")],
      ["-CAfile", file("ca.crt"), "-purpose", "any", "-out", "/dev/null"],
    ].flat();
    await $`openssl cms -verify -binary -inform DER ${verify}`.quiet();
    const carried = await $`openssl cms -cmsout -print -inform DER -in ${file("netboot.ipxe.sig")}`
      .quiet();
    assert.equal(carried.stdout.match(/cert_info:/g)?.length, 2, "the signature carries the root");
  } finally {
    await fs.rm(dir, { recursive: true, force: true });
  }
});

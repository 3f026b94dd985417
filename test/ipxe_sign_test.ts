/**
 * iPXE signatures made from a digest alone: `openssl cms -verify` accepts them, and a key or
 * chain iPXE would refuse is refused before anything is signed.
 */
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import * as fs from "node:fs/promises";
import * as os from "node:os";
import * as path from "node:path";
import { checkSigningIdentity, signDigest } from "../scripts/lib/ipxe_sign.ts";
import { ReleaseError, UsageError } from "../scripts/lib/run.ts";
import { type Issued, makeCa, makeCodeSigning, makeIntermediate } from "./boot/pki.ts";
import { runCommand } from "./run_helpers.ts";

const DAY = 24 * 60 * 60 * 1000;

async function scratch(test: (dir: string) => Promise<void>): Promise<void> {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), "release-boot-ipxe-sign-"));
  try {
    await test(dir);
  } finally {
    await fs.rm(dir, { recursive: true, force: true });
  }
}

/** Writes `content` and its signature made from the digest, and asks openssl to verify. */
async function signAndVerify(
  dir: string,
  signer: Issued,
  chain: string,
  caFile: string,
  content: string,
): Promise<{ code: number; stderr: string; signature: Uint8Array }> {
  const file = path.join(dir, "image");
  await fs.writeFile(file, content);
  const digest = createHash("sha256").update(content).digest("hex");
  const signature = signDigest(checkSigningIdentity(signer.key, chain, new Date()), digest);
  await fs.writeFile(`${file}.sig`, signature);
  const verified = await runCommand("openssl", [
    "cms",
    "-verify",
    "-binary",
    "-inform",
    "DER",
    "-in",
    `${file}.sig`,
    "-content",
    file,
    "-CAfile",
    caFile,
    "-purpose",
    "any",
    "-out",
    "/dev/null",
  ]);
  return { code: verified.code, stderr: verified.stderr, signature };
}

function refusal(keyPem: string, chainPem: string, now = new Date()): string {
  try {
    checkSigningIdentity(keyPem, chainPem, now);
  } catch (error) {
    assert.ok(error instanceof UsageError, `bad input (exit 2): ${error}`);
    return error.message;
  }
  assert.fail("the signing identity was accepted");
}

Deno.test("an RSA signature made from the digest verifies with openssl cms and equals openssl's own", () =>
  scratch(async (dir) => {
    const ca = await makeCa(dir, "Runner boot CA");
    const signer = await makeCodeSigning(dir, "Runner boot signing", ca);
    const chain = signer.cert + ca.cert;
    const verified = await signAndVerify(dir, signer, chain, ca.certFile, "a kernel\n");
    assert.equal(verified.code, 0, verified.stderr);
    assert.match(verified.stderr, /Verification successful/);

    const opensslSig = path.join(dir, "openssl.sig");
    const signed = await runCommand("openssl", [
      "cms",
      "-sign",
      "-binary",
      "-noattr",
      "-md",
      "sha256",
      "-in",
      path.join(dir, "image"),
      "-signer",
      signer.certFile,
      "-inkey",
      signer.keyFile,
      "-certfile",
      ca.certFile,
      "-outform",
      "DER",
      "-out",
      opensslSig,
    ]);
    assert.equal(signed.code, 0, signed.stderr);
    assert.deepEqual(verified.signature, new Uint8Array(await fs.readFile(opensslSig)));
  }));

Deno.test("an ECDSA P-256 signature verifies with openssl cms and is the same for the same digest", () =>
  scratch(async (dir) => {
    const ca = await makeCa(dir, "Runner boot CA");
    const signer = await makeCodeSigning(dir, "Runner boot signing", ca, { key: "p256" });
    const chain = signer.cert + ca.cert;
    const verified = await signAndVerify(dir, signer, chain, ca.certFile, "an initrd\n");
    assert.equal(verified.code, 0, verified.stderr);
    const digest = createHash("sha256").update("an initrd\n").digest("hex");
    const again = signDigest(checkSigningIdentity(signer.key, chain, new Date()), digest);
    assert.deepEqual(again, verified.signature);
  }));

Deno.test("a signature carries an intermediate CA and the root, so the root alone verifies it", () =>
  scratch(async (dir) => {
    const root = await makeCa(dir, "Runner boot root", "p256");
    const intermediate = await makeIntermediate(dir, "Runner boot intermediate", root);
    const signer = await makeCodeSigning(dir, "Runner boot signing", intermediate);
    const chain = signer.cert + intermediate.cert + root.cert;
    const verified = await signAndVerify(dir, signer, chain, root.certFile, "a script\n");
    assert.equal(verified.code, 0, verified.stderr);
  }));

Deno.test("a signature made under another CA does not verify against the site's CA", () =>
  scratch(async (dir) => {
    const ca = await makeCa(dir, "Runner boot CA");
    const other = await makeCa(dir, "Someone else's CA");
    const signer = await makeCodeSigning(dir, "Someone else's signing", other);
    const verified = await signAndVerify(dir, signer, signer.cert + other.cert, ca.certFile, "x");
    assert.notEqual(verified.code, 0);
  }));

Deno.test("a key that is not the signer certificate's is refused", () =>
  scratch(async (dir) => {
    const ca = await makeCa(dir, "Runner boot CA");
    const signer = await makeCodeSigning(dir, "Runner boot signing", ca);
    const stranger = await makeCodeSigning(dir, "Another signing", ca);
    assert.equal(
      refusal(stranger.key, signer.cert + ca.cert),
      "the iPXE signing key does not belong to the signer certificate CN=Runner boot signing: put the key's own certificate first in the certificate file",
    );
    assert.match(
      refusal(signer.key, ca.cert + signer.cert),
      /does not belong to the signer certificate CN=Runner boot CA/,
    );
  }));

Deno.test("a signer certificate without digitalSignature or without codeSigning is refused", () =>
  scratch(async (dir) => {
    const ca = await makeCa(dir, "Runner boot CA");
    const noSigning = await makeCodeSigning(dir, "encipherment only", ca, {
      extensions: ["keyUsage=critical,keyEncipherment", "extendedKeyUsage=codeSigning"],
    });
    assert.equal(
      refusal(noSigning.key, noSigning.cert + ca.cert),
      "the signer certificate CN=encipherment only lacks keyUsage digitalSignature, so iPXE refuses its signatures: issue it with keyUsage=critical,digitalSignature",
    );
    const serverOnly = await makeCodeSigning(dir, "a web server", ca, {
      extensions: ["keyUsage=critical,digitalSignature", "extendedKeyUsage=serverAuth"],
    });
    assert.equal(
      refusal(serverOnly.key, serverOnly.cert + ca.cert),
      "the signer certificate CN=a web server lacks extendedKeyUsage codeSigning, so iPXE refuses its signatures: issue it with extendedKeyUsage=codeSigning",
    );
    const noUsages = await makeCodeSigning(dir, "no usages", ca, { extensions: [] });
    assert.match(refusal(noUsages.key, noUsages.cert + ca.cert), /lacks keyUsage digitalSignature/);
  }));

Deno.test("a certificate expired, or not valid yet, is refused", () =>
  scratch(async (dir) => {
    const ca = await makeCa(dir, "Runner boot CA");
    const signer = await makeCodeSigning(dir, "Runner boot signing", ca);
    const chain = signer.cert + ca.cert;
    assert.match(
      refusal(signer.key, chain, new Date(Date.now() + 31 * DAY)),
      /^the certificate CN=Runner boot signing expired on \d{4}-\d\d-\d\dT[\d:.]+Z: renew it$/,
    );
    assert.match(
      refusal(signer.key, chain, new Date(Date.now() - DAY)),
      /^the certificate CN=Runner boot signing is not valid until \d{4}-\d\d-\d\dT[\d:.]+Z: check this machine's clock, or use a certificate valid now$/,
    );
  }));

Deno.test("an RSA key under 2048 bits, or a key iPXE cannot verify, is refused", () =>
  scratch(async (dir) => {
    const ca = await makeCa(dir, "Runner boot CA");
    const short = await makeCodeSigning(dir, "short", ca, { key: "rsa1024" });
    assert.equal(
      refusal(short.key, short.cert + ca.cert),
      "the iPXE signing key is RSA with 1024 bits: use an RSA key of at least 2048 bits (or ECDSA P-256)",
    );
    const p384 = await makeCodeSigning(dir, "p384", ca, { key: "p384" });
    assert.equal(
      refusal(p384.key, p384.cert + ca.cert),
      "the iPXE signing key is ECDSA on secp384r1: iPXE image signatures need RSA (2048 bits or more) or ECDSA P-256",
    );
    const ed25519 = await makeCodeSigning(dir, "ed25519", ca, { key: "ed25519" });
    assert.match(
      refusal(ed25519.key, ed25519.cert + ca.cert),
      /^the iPXE signing key is ed25519: /,
    );
    assert.match(
      refusal(
        "-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----\n",
        ca.cert,
      ),
      /^the iPXE signing key is not an unencrypted PEM private key: /,
    );
  }));

Deno.test("a chain that does not end in a self-signed root, or is out of order, is refused", () =>
  scratch(async (dir) => {
    const root = await makeCa(dir, "Runner boot root");
    const intermediate = await makeIntermediate(dir, "Runner boot intermediate", root);
    const signer = await makeCodeSigning(dir, "Runner boot signing", intermediate);
    assert.equal(
      refusal(signer.key, signer.cert + intermediate.cert),
      "the iPXE signing certificate file ends at CN=Runner boot intermediate, which is not a self-signed root: append the root certificate (iPXE finds the root only in the signature)",
    );
    assert.match(
      refusal(signer.key, signer.cert),
      /ends at CN=Runner boot signing, which is not a self-signed root/,
    );
    assert.equal(
      refusal(signer.key, signer.cert + root.cert + intermediate.cert),
      "the certificate CN=Runner boot signing is not issued by CN=Runner boot root, the next one in the certificate file: order it signer first, then each issuer up to the root",
    );
    assert.match(refusal(signer.key, ""), /holds no PEM certificate/);
  }));

Deno.test("a chain whose issuer is not a CA is refused", () =>
  scratch(async (dir) => {
    const ca = await makeCa(dir, "Runner boot CA");
    const notCa = await makeCodeSigning(dir, "an end entity", ca);
    const signer = await makeCodeSigning(dir, "Runner boot signing", notCa);
    assert.match(
      refusal(signer.key, signer.cert + notCa.cert + ca.cert),
      /^the certificate CN=an end entity issues another in the chain but is not a CA/,
    );
  }));

Deno.test("signing refuses anything but a SHA-256 digest in hex", () =>
  scratch(async (dir) => {
    const ca = await makeCa(dir, "Runner boot CA");
    const signer = await makeCodeSigning(dir, "Runner boot signing", ca);
    const identity = checkSigningIdentity(signer.key, signer.cert + ca.cert, new Date());
    assert.throws(
      () => signDigest(identity, "not a digest"),
      new ReleaseError(
        'cannot sign "not a digest" for iPXE: a SHA-256 digest is 64 lowercase hex digits',
      ),
    );
  }));

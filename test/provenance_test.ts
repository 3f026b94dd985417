/**
 * SLSA provenance: the statement made from a release's facts, its DSSE envelope, and the checks
 * that read them back; the envelope also checked by code release-boot did not write (node:crypto,
 * ssh-keygen and openssl). test/provenance_release_test.ts checks what releases carry.
 */
import assert from "node:assert/strict";
import { Buffer } from "node:buffer";
import { createPublicKey, verify as nodeVerify } from "node:crypto";
import * as fs from "node:fs/promises";
import * as os from "node:os";
import * as path from "node:path";
import {
  builderOf,
  buildStatement,
  BY_HAND_BUILDER,
  checkSubjects,
  keyIdOf,
  type ProvenanceFacts,
  provenanceFile,
  readStatement,
  renderStatement,
  signEnvelope,
  verifyEnvelope,
} from "../scripts/lib/provenance.ts";
import { ReleaseError } from "../scripts/lib/run.ts";
import { INDEX_NAMES as INDEX, type Manifest } from "../types/manifest.ts";
import { ENVELOPE_NAME, type Statement, STATEMENT_NAME } from "../types/provenance.ts";
import {
  docBlock,
  encodeJson,
  envelopeJson,
  sh,
  withChangedPayload,
  withChangedSignature,
} from "./provenance_helpers.ts";
import { runCommand } from "./run_helpers.ts";

const SHA = (digit: string) => digit.repeat(64);
const DRV_NETBOOT = "/nix/store/8rjw9l2h0jm8b3x3rw4cv5mb4v2k6yq1-netboot.drv";
const DRV_ISO = "/nix/store/0m1l9d5wbxwk1hq2j0l4ydb4lxz5s3c0-nixos-runner-iso.drv";
const COMMIT = "5b0e1f4c9d2a7b8e6f3a1c0d9e8f7a6b5c4d3e2f";
const NIXPKGS_REV = "e2b8fe2e0a9c1d3f4b5a6c7d8e9f0a1b2c3d4e5f";
const FLAKE = `git+https://git.example.org/ops/runners?ref=refs/tags/boot-v1.2.0&rev=${COMMIT}`;

function asset(name: string, sha256: string, target: string, drvPath: string, system?: string) {
  return {
    name,
    size: 1024,
    sha256,
    target,
    system: system ?? "x86_64-linux",
    storePath: `${drvPath.replace(/\.drv$/, "")}/${name}`,
    drvPath,
  };
}

const MANIFEST: Manifest = {
  schema: 1,
  tag: "boot-v1.2.0",
  commit: COMMIT,
  flake: {
    ref: ".",
    url: `git+file:///runner/work/runners?rev=${COMMIT}`,
    revision: COMMIT,
    narHash: "sha256-Xk1f0g3aQv2mWlqk3uWjQeR0o2J5yV7dq7iHqv8q0nA=",
    locked: true,
    dirty: false,
    inputs: {
      nixpkgs: {
        type: "github",
        url: "github:NixOS/nixpkgs",
        rev: NIXPKGS_REV,
        narHash: "sha256-pq2d9GZ6CjOe2aE4oYvS3gWm8bR0Kc3N4y1pA7fT0uI=",
        lastModified: 1767225600,
      },
      "flake-utils": {
        type: "tarball",
        url: "https://example.org/flake-utils.tar.gz",
        narHash: "sha256-0aTq8mHf9Zl8zEw3bUu2G0M3mN1XyXgq6YJmT9v2KjA=",
      },
    },
  },
  nixVersion: "2.24.11",
  ciRun: "https://git.example.org/ops/runners/actions/runs/42",
  createdAt: "2026-03-01T10:40:00.000Z",
  assets: [
    asset("netboot-x86_64-linux.ipxe", SHA("4"), "netboot", DRV_NETBOOT),
    asset("iso-x86_64-linux.iso", SHA("1"), "iso", DRV_ISO),
    asset("netboot-x86_64-linux.bzImage", SHA("2"), "netboot", DRV_NETBOOT),
    asset("netboot-x86_64-linux.initrd", SHA("3"), "netboot", DRV_NETBOOT),
  ],
};

const RUN = {
  builderId:
    "https://git.example.org/ops/runners/.forgejo/workflows/boot-images.yml@refs/tags/boot-v1.2.0",
  invocationId: "https://git.example.org/ops/runners/actions/runs/42",
  startedOn: new Date("2026-03-01T10:00:00Z"),
  finishedOn: new Date("2026-03-01T10:41:07Z"),
};

const WORKFLOW = {
  repository: "https://git.example.org/ops/runners",
  path: ".forgejo/workflows/boot-images.yml",
  ref: "refs/tags/boot-v1.2.0",
};

const FACTS: ProvenanceFacts = { manifest: MANIFEST, flake: FLAKE, run: RUN, workflow: WORKFLOW };

/** SHA256SUMS of the release as a map: every asset, manifest.json and the provenance file. */
function sumsOf(manifest: Pick<Manifest, "assets">, provenance = ENVELOPE_NAME) {
  return new Map<string, string>([
    ...manifest.assets.map((a) => [a.name, a.sha256] as [string, string]),
    ["manifest.json", SHA("9")],
    [provenance, SHA("8")],
  ]);
}

function sshString(bytes: Uint8Array): Uint8Array {
  const out = new Uint8Array(4 + bytes.length);
  new DataView(out.buffer).setUint32(0, bytes.length);
  out.set(bytes, 4);
  return out;
}

/** A fresh Ed25519 key: its sign function, raw public key and `ssh-ed25519 AAAA...` line. */
async function makeKey(comment = "release-boot") {
  const pair = await crypto.subtle.generateKey("Ed25519", false, [
    "sign",
    "verify",
  ]) as CryptoKeyPair;
  const publicKey = new Uint8Array(await crypto.subtle.exportKey("raw", pair.publicKey));
  const sign = async (bytes: Uint8Array) =>
    new Uint8Array(await crypto.subtle.sign("Ed25519", pair.privateKey, new Uint8Array(bytes)));
  const type = sshString(new TextEncoder().encode("ssh-ed25519"));
  const blob = new Uint8Array([...type, ...sshString(publicKey)]);
  return { sign, publicKey, line: `ssh-ed25519 ${blob.toBase64()} ${comment}\n` };
}

/** DSSE's PAE, written from envelope.md here rather than taken from the module under test. */
function pae(payloadType: string, payload: Uint8Array): Uint8Array {
  const head = `DSSEv1 ${new TextEncoder().encode(payloadType).length} ${payloadType} ` +
    `${payload.length} `;
  return new Uint8Array([...new TextEncoder().encode(head), ...payload]);
}

async function signed(statement: Statement, key: Awaited<ReturnType<typeof makeKey>>) {
  return await signEnvelope(renderStatement(statement), key.sign, key.publicKey);
}

async function refusal(work: Promise<unknown>): Promise<string> {
  const error = await work.then(() => undefined, (error: Error) => error);
  assert.ok(error instanceof ReleaseError, `expected a refusal, got ${error}`);
  assert.doesNotMatch(error.message, /\n/, "a refusal is one line");
  return error.message;
}

Deno.test("the statement attests every release file SHA256SUMS lists, by name, and none of the index", () => {
  const statement = buildStatement(FACTS);
  assert.equal(statement._type, "https://in-toto.io/Statement/v1");
  assert.equal(statement.predicateType, "https://slsa.dev/provenance/v1");
  assert.deepEqual(statement.subject, [
    { name: "iso-x86_64-linux.iso", digest: { sha256: SHA("1") } },
    { name: "netboot-x86_64-linux.bzImage", digest: { sha256: SHA("2") } },
    { name: "netboot-x86_64-linux.initrd", digest: { sha256: SHA("3") } },
    { name: "netboot-x86_64-linux.ipxe", digest: { sha256: SHA("4") } },
  ]);
  assert.deepEqual(checkSubjects(statement, sumsOf(MANIFEST), INDEX), []);
  assert.deepEqual(checkSubjects(statement, sumsOf(MANIFEST, STATEMENT_NAME), INDEX), []);
});

Deno.test("the statement records the flake, its locked inputs, each derivation once, and the run", () => {
  const { buildDefinition, runDetails } = buildStatement(FACTS).predicate;
  assert.equal(buildDefinition.buildType, "https://release-boot.invalid/buildtypes/nix-flake/v1");
  assert.deepEqual(buildDefinition.externalParameters, {
    flake: FLAKE,
    attributes: ["packages.x86_64-linux.iso", "packages.x86_64-linux.netboot"],
    workflow: WORKFLOW,
  });
  assert.deepEqual(buildDefinition.internalParameters, {
    nixVersion: "2.24.11",
    systems: ["x86_64-linux"],
  });
  assert.deepEqual(buildDefinition.resolvedDependencies, [
    {
      name: "flake",
      uri: FLAKE,
      digest: { gitCommit: COMMIT, narHash: MANIFEST.flake.narHash },
      annotations: { dirty: false, locked: true },
    },
    {
      name: "inputs.flake-utils",
      uri: "https://example.org/flake-utils.tar.gz",
      digest: { narHash: MANIFEST.flake.inputs["flake-utils"].narHash },
    },
    {
      name: "inputs.nixpkgs",
      uri: "github:NixOS/nixpkgs",
      digest: { gitCommit: NIXPKGS_REV, narHash: MANIFEST.flake.inputs.nixpkgs.narHash },
    },
    { name: "packages.x86_64-linux.iso", digest: { nixStorePath: DRV_ISO } },
    { name: "packages.x86_64-linux.netboot", digest: { nixStorePath: DRV_NETBOOT } },
  ]);
  assert.deepEqual(runDetails, {
    builder: { id: RUN.builderId },
    metadata: {
      invocationId: RUN.invocationId,
      startedOn: "2026-03-01T10:00:00.000Z",
      finishedOn: "2026-03-01T10:41:07.000Z",
    },
  });
});

Deno.test("a release from a dirty tree by hand is attested as dirty, without a commit or workflow", () => {
  const { revision: _, ...flake } = { ...MANIFEST.flake, dirty: true };
  const statement = buildStatement({
    manifest: { ...MANIFEST, flake },
    flake: "git+file:///home/op/runners",
    run: { ...RUN, builderId: BY_HAND_BUILDER, invocationId: "3f2c9a1e" },
  });
  const { externalParameters, resolvedDependencies } = statement.predicate.buildDefinition;
  assert.equal(externalParameters.workflow, undefined);
  assert.deepEqual(resolvedDependencies[0], {
    name: "flake",
    uri: "git+file:///home/op/runners",
    digest: { narHash: MANIFEST.flake.narHash },
    annotations: { dirty: true, locked: true },
  });
  assert.equal(statement.predicate.runDetails.builder.id, BY_HAND_BUILDER);
});

Deno.test("the same facts give the same bytes, in whatever order the manifest lists them", () => {
  const reordered: ProvenanceFacts = {
    ...FACTS,
    manifest: {
      ...MANIFEST,
      assets: [...MANIFEST.assets].reverse(),
      flake: {
        ...MANIFEST.flake,
        inputs: Object.fromEntries(Object.entries(MANIFEST.flake.inputs).reverse()),
      },
    },
  };
  const bytes = renderStatement(buildStatement(FACTS));
  assert.deepEqual(renderStatement(buildStatement(reordered)), bytes);
  assert.deepEqual(renderStatement(readStatement(STATEMENT_NAME, bytes)), bytes, "it reads back");
});

Deno.test("facts that make no valid statement are refused in one line", async () => {
  const message = await refusal(
    Promise.resolve().then(() => buildStatement({ ...FACTS, run: { ...RUN, builderId: "ci" } })),
  );
  assert.match(message, /^the provenance statement would be invalid: .*not a URI/);
  await refusal(
    Promise.resolve().then(() =>
      buildStatement({ ...FACTS, manifest: { ...MANIFEST, assets: [] } })
    ),
  );
});

Deno.test("in CI the builder is the workflow at its ref, or the repository's Actions without one", () => {
  assert.deepEqual(
    builderOf({
      server: "https://git.example.org/",
      repository: "ops/runners",
      workflowRef: "ops/runners/.forgejo/workflows/boot-images.yml@refs/tags/boot-v1.2.0",
    }),
    { builderId: RUN.builderId, workflow: WORKFLOW },
  );
  assert.deepEqual(builderOf({ server: "https://git.example.org", repository: "ops/runners" }), {
    builderId: "https://git.example.org/ops/runners/actions",
  });
  assert.deepEqual(
    builderOf({ server: "https://git.example.org", repository: "ops/runners", workflowRef: "x" }),
    { builderId: "https://git.example.org/ops/runners/actions" },
  );
});

Deno.test("without a key the provenance is the bare statement, with one a signed envelope", async () => {
  const statement = buildStatement(FACTS);
  const bare = await provenanceFile(statement, undefined);
  assert.equal(bare.name, STATEMENT_NAME);
  assert.deepEqual(bare.bytes, renderStatement(statement));
  const key = await makeKey();
  const wrapped = await provenanceFile(statement, key);
  assert.equal(wrapped.name, ENVELOPE_NAME);
  assert.deepEqual(readStatement(ENVELOPE_NAME, wrapped.bytes), statement);
});

Deno.test("the envelope is one JSON line, keyed by the fingerprint ssh-keygen prints, signed over DSSE's PAE", async () => {
  const key = await makeKey();
  const statementBytes = renderStatement(buildStatement(FACTS));
  const bytes = await signEnvelope(statementBytes, key.sign, key.publicKey);
  const text = new TextDecoder().decode(bytes);
  assert.match(text, /^\{[^\n]*\}\n$/, "one line and a newline");
  const envelope = envelopeJson(bytes);
  assert.deepEqual(Object.keys(envelope), ["payload", "payloadType", "signatures"]);
  assert.equal(envelope.payloadType, "application/vnd.in-toto+json");
  assert.deepEqual(Uint8Array.fromBase64(envelope.payload), statementBytes);

  const dir = await fs.mkdtemp(path.join(os.tmpdir(), "release-boot-provenance-"));
  try {
    await fs.writeFile(path.join(dir, "key.pub"), key.line);
    const listed = await runCommand("ssh-keygen", ["-lf", path.join(dir, "key.pub")]);
    assert.equal(listed.code, 0, listed.stderr);
    assert.equal(envelope.signatures[0].keyid, listed.stdout.split(" ")[1]);
    assert.equal(keyIdOf(key.publicKey), listed.stdout.split(" ")[1]);
  } finally {
    await fs.rm(dir, { recursive: true, force: true });
  }

  const spki = createPublicKey({
    key: Buffer.from([...Uint8Array.fromHex("302a300506032b6570032100"), ...key.publicKey]),
    format: "der",
    type: "spki",
  });
  const signature = Uint8Array.fromBase64(envelope.signatures[0].sig);
  assert.ok(nodeVerify(null, pae(envelope.payloadType, statementBytes), spki, signature));
  assert.ok(!nodeVerify(null, statementBytes, spki, signature), "the PAE is signed, not the body");
});

Deno.test("a sign function of another key than the public key is refused before anything is written", async () => {
  const key = await makeKey();
  const other = await makeKey();
  const message = await refusal(
    signEnvelope(renderStatement(buildStatement(FACTS)), other.sign, key.publicKey),
  );
  assert.match(message, /does not verify with SHA256:\S+: sign and publicKey are not one key pair/);
});

Deno.test("a trusted key's envelope verifies and names its signer", async () => {
  const key = await makeKey();
  const other = await makeKey("someone else");
  const bytes = await signed(buildStatement(FACTS), key);
  const trusted = [
    { publicKey: other.publicKey, principal: "other@example.org" },
    { publicKey: key.publicKey, principal: "ci@example.org" },
  ];
  const verified = await verifyEnvelope(bytes, trusted);
  assert.equal(verified.keyid, keyIdOf(key.publicKey));
  assert.equal(verified.principal, "ci@example.org");
  assert.deepEqual(verified.statement, buildStatement(FACTS));
});

Deno.test("a changed payload, a changed signature, an untrusted key or a foreign envelope are refused in one line", async () => {
  const key = await makeKey();
  const stranger = await makeKey("stranger");
  const trusted = [{ publicKey: key.publicKey, principal: "ci@example.org" }];
  const bytes = await signed(buildStatement(FACTS), key);
  const fingerprint = keyIdOf(key.publicKey).replace(/[+/]/g, "\\$&");
  const changed = new RegExp(
    `^provenance\\.intoto\\.jsonl does not verify with ${fingerprint} \\(ci@example\\.org\\): its statement or signature was changed`,
  );

  assert.match(await refusal(verifyEnvelope(withChangedPayload(bytes), trusted)), changed);
  assert.match(await refusal(verifyEnvelope(withChangedSignature(bytes), trusted)), changed);
  assert.match(
    await refusal(verifyEnvelope(await signed(buildStatement(FACTS), stranger), trusted)),
    /^provenance\.intoto\.jsonl is signed by SHA256:\S+, a key the trust file does not list/,
  );
  // A stranger's signature under the trusted key's keyid is still the stranger's.
  const forged = envelopeJson(await signed(buildStatement(FACTS), stranger));
  forged.signatures[0].keyid = keyIdOf(key.publicKey);
  assert.match(await refusal(verifyEnvelope(encodeJson(forged), trusted)), changed);

  const envelope = envelopeJson(bytes);
  assert.match(
    await refusal(verifyEnvelope(encodeJson({ ...envelope, payloadType: "text/plain" }), trusted)),
    /carries "text\/plain", not an in-toto statement/,
  );
  assert.match(
    await refusal(verifyEnvelope(new TextEncoder().encode("<html>"), trusted)),
    /^provenance\.intoto\.jsonl is not JSON, so it is not a DSSE envelope$/,
  );
  const unsigned = { ...envelope, signatures: [] };
  assert.match(await refusal(verifyEnvelope(encodeJson(unsigned), trusted)), /no signatures/);
  const otherStatement = { ...buildStatement(FACTS), predicateType: "https://example.org/v1" };
  const foreign = await signEnvelope(encodeJson(otherStatement), key.sign, key.publicKey);
  assert.match(
    await refusal(verifyEnvelope(foreign, trusted)),
    /^provenance\.intoto\.jsonl is not release-boot's SLSA provenance \(.*predicateType/,
  );
});

Deno.test("subjects that SHA256SUMS does not list, or lists otherwise, are each named", () => {
  const statement = buildStatement(FACTS);
  const sums = sumsOf(MANIFEST);
  sums.delete("iso-x86_64-linux.iso");
  sums.set("netboot-x86_64-linux.initrd", SHA("e"));
  sums.set("kexec-x86_64-linux.tar.gz", SHA("5"));
  assert.deepEqual(checkSubjects(statement, sums, INDEX), [
    "the provenance attests iso-x86_64-linux.iso, which SHA256SUMS does not list as a release file",
    `the provenance gives netboot-x86_64-linux.initrd sha256 ${SHA("3")}, SHA256SUMS gives ${
      SHA("e")
    }`,
    "SHA256SUMS lists kexec-x86_64-linux.tar.gz, which the provenance does not attest",
  ]);
  const naming = {
    ...statement,
    subject: [{ name: "manifest.json", digest: { sha256: SHA("9") } }],
  };
  assert.match(checkSubjects(naming, sumsOf(MANIFEST), INDEX)[0], /attests manifest\.json, which/);
});

// --- Checked by code release-boot did not write: docs/PROVENANCE.md's commands ---

Deno.test("the documented PEM line gives a key node:crypto verifies the envelope with", async () => {
  const key = await makeKey();
  const statementBytes = renderStatement(buildStatement(FACTS));
  const envelope = envelopeJson(await signEnvelope(statementBytes, key.sign, key.publicKey));
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), "release-boot-provenance-"));
  try {
    await fs.writeFile(path.join(dir, "release-boot-key.pub"), key.line);
    const made = await sh((await docBlock("**The key for cosign.**", "sh")).trim(), dir);
    assert.equal(made.code, 0, made.stderr);
    const pem = await fs.readFile(path.join(dir, "release-boot-key.pem"), "utf8");
    assert.match(pem, /^-----BEGIN PUBLIC KEY-----\n/);
    const signature = Uint8Array.fromBase64(envelope.signatures[0].sig);
    assert.ok(
      nodeVerify(null, pae(envelope.payloadType, statementBytes), createPublicKey(pem), signature),
    );
  } finally {
    await fs.rm(dir, { recursive: true, force: true });
  }
});

/**
 * docs/PROVENANCE.md's commands and @sigstore/verify program, run as a consumer of a release
 * runs them: code release-boot did not write, checking what release-boot published.
 */
import assert from "node:assert/strict";
import * as fs from "node:fs/promises";
import * as path from "node:path";
import { repoRoot, type Run, runCommand } from "./run_helpers.ts";

/** The body of the `skip`-th ```lang block after `heading` in docs/PROVENANCE.md. */
export async function docBlock(heading: string, lang: string, skip = 0): Promise<string> {
  const doc = await fs.readFile(path.join(repoRoot, "docs", "PROVENANCE.md"), "utf8");
  const blocks = doc.slice(doc.indexOf(heading)).split(`\`\`\`${lang}\n`).slice(1);
  assert.ok(blocks.length > skip, `docs/PROVENANCE.md has a ${lang} block after ${heading}`);
  return blocks[skip].slice(0, blocks[skip].indexOf("```"));
}

export async function sh(script: string, cwd: string): Promise<Run> {
  const output = await new Deno.Command("sh", {
    args: ["-c", script],
    cwd,
    stdout: "piped",
    stderr: "piped",
  }).output();
  const text = new TextDecoder();
  return {
    code: output.code,
    stdout: text.decode(output.stdout),
    stderr: text.decode(output.stderr),
  };
}

/** SHA256SUMS without the index files: the lines a release's statement must attest. */
export function releaseFileLines(sums: string): string[] {
  return sums.split("\n").filter((line) =>
    line && !/ {2}(SHA256SUMS.*|manifest\.json|provenance\.intoto\.jsonl?)$/.test(line)
  );
}

/**
 * Checks `envelope` with `publicKeyLine` (`ssh-ed25519 AAAA...`) as the documentation says: its
 * @sigstore/verify program in `dir`, beside `sums`, then its comparison with SHA256SUMS.
 */
export async function checkAsDocumented(
  dir: string,
  envelope: Uint8Array,
  sums: Uint8Array,
  publicKeyLine: string,
): Promise<{ program: Run; compared: Run }> {
  await fs.mkdir(dir, { recursive: true });
  await fs.writeFile(path.join(dir, "SHA256SUMS"), sums);
  await fs.writeFile(path.join(dir, "release-boot-key.pub"), publicKeyLine);
  await fs.writeFile(path.join(dir, "provenance.intoto.jsonl"), envelope);
  await fs.writeFile(
    path.join(dir, "check-provenance.ts"),
    await docBlock("### With @sigstore/verify", "ts"),
  );
  const program = await runCommand(Deno.execPath(), [
    "run",
    "--allow-read",
    "--config",
    path.join(repoRoot, "deno.json"),
    path.join(dir, "check-provenance.ts"),
    path.join(dir, "provenance.intoto.jsonl"),
    path.join(dir, "release-boot-key.pub"),
  ]);
  // The documented comparison, verbatim, with the program on the same files.
  const compared = await sh(await docBlock("Its output is `SHA256SUMS`", "sh"), dir);
  return { program, compared };
}

export interface EnvelopeJson {
  payload: string;
  payloadType: string;
  signatures: { keyid: string; sig: string }[];
}

export function envelopeJson(bytes: Uint8Array): EnvelopeJson {
  return JSON.parse(new TextDecoder().decode(bytes));
}

export function encodeJson(value: unknown): Uint8Array {
  return new TextEncoder().encode(`${JSON.stringify(value)}\n`);
}

/** The envelope with its statement's first subject given another digest, signature kept. */
export function withChangedPayload(bytes: Uint8Array): Uint8Array {
  const envelope = envelopeJson(bytes);
  const statement = JSON.parse(new TextDecoder().decode(Uint8Array.fromBase64(envelope.payload)));
  statement.subject[0].digest.sha256 = "f".repeat(64);
  const payload = new TextEncoder().encode(`${JSON.stringify(statement, null, 2)}\n`);
  return encodeJson({ ...envelope, payload: payload.toBase64() });
}

/** The envelope with one bit of its signature flipped. */
export function withChangedSignature(bytes: Uint8Array): Uint8Array {
  const envelope = envelopeJson(bytes);
  const sig = Uint8Array.fromBase64(envelope.signatures[0].sig);
  sig[10] ^= 1;
  return encodeJson({
    ...envelope,
    signatures: [{ ...envelope.signatures[0], sig: sig.toBase64() }],
  });
}

/**
 * A test CA and code-signing certificates made with the openssl CLI, by the same commands
 * docs/PXE.md gives operators. Writes only into the directory it is given.
 */
import assert from "node:assert/strict";
import * as fs from "node:fs/promises";
import * as path from "node:path";
import { runCommand } from "../run_helpers.ts";

/** openssl -newkey arguments per key kind. */
const NEW_KEY = {
  rsa2048: ["-newkey", "rsa:2048"],
  rsa1024: ["-newkey", "rsa:1024"],
  p256: ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
  p384: ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-384"],
  ed25519: ["-newkey", "ed25519"],
};
export type KeyKind = keyof typeof NEW_KEY;

/** A key and its certificate, as files and as PEM text. */
export interface Issued {
  keyFile: string;
  certFile: string;
  key: string;
  cert: string;
}

/** A root CA: self-signed, CA:TRUE, allowed to sign certificates. */
export function makeCa(dir: string, name: string, key: KeyKind = "rsa2048"): Promise<Issued> {
  return issue(dir, name, key, undefined, [
    "basicConstraints=critical,CA:TRUE",
    "keyUsage=critical,keyCertSign,cRLSign",
  ]);
}

/** An intermediate CA under `issuer`. */
export function makeIntermediate(dir: string, name: string, issuer: Issued): Promise<Issued> {
  return issue(dir, name, "rsa2048", issuer, [
    "basicConstraints=critical,CA:TRUE",
    "keyUsage=critical,keyCertSign,cRLSign",
  ]);
}

/**
 * A code-signing certificate under `issuer`. `extensions` replaces the usual keyUsage and
 * extendedKeyUsage, for certificates iPXE must refuse.
 */
export function makeCodeSigning(
  dir: string,
  name: string,
  issuer: Issued,
  options: { key?: KeyKind; extensions?: string[] } = {},
): Promise<Issued> {
  return issue(dir, name, options.key ?? "rsa2048", issuer, [
    "basicConstraints=critical,CA:FALSE",
    ...(options.extensions ??
      ["keyUsage=critical,digitalSignature", "extendedKeyUsage=codeSigning"]),
  ]);
}

async function issue(
  dir: string,
  name: string,
  key: KeyKind,
  issuer: Issued | undefined,
  extensions: string[],
): Promise<Issued> {
  const keyFile = path.join(dir, `${name}.key`);
  const certFile = path.join(dir, `${name}.crt`);
  const made = await runCommand("openssl", [
    "req",
    "-x509",
    ...NEW_KEY[key],
    "-noenc",
    "-keyout",
    keyFile,
    "-out",
    certFile,
    "-days",
    "30",
    "-subj",
    `/CN=${name}`,
    ...(issuer ? ["-CA", issuer.certFile, "-CAkey", issuer.keyFile] : []),
    ...extensions.flatMap((extension) => ["-addext", extension]),
  ]);
  assert.equal(made.code, 0, made.stderr);
  return {
    keyFile,
    certFile,
    key: await fs.readFile(keyFile, "utf8"),
    cert: await fs.readFile(certFile, "utf8"),
  };
}

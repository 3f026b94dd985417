/**
 * A test CA and code-signing certificates made with the openssl CLI, by the same commands
 * docs/PXE.md gives operators. Writes only into the directory it is given.
 *
 * RSA keys come from test/boot/keys/, one per certificate name, made once with
 * `openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:BITS`: generating them was most of
 * the suite's CPU time, and no check of a certificate depends on its key being new. Names share
 * no key, so a key that is not a certificate's own is still a different key. A name without
 * one there gets a new key.
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

const KEYS = new URL("./keys/", import.meta.url).pathname;

/**
 * openssl arguments giving the certificate `name` its key in `keyFile`: the pooled RSA key
 * copied there, or a new key written there.
 */
async function keyArguments(name: string, key: KeyKind, keyFile: string): Promise<string[]> {
  const slug = name.toLowerCase().replace(/[^a-z0-9]+/g, "-");
  try {
    await fs.copyFile(path.join(KEYS, `${slug}.${key}.pem`), keyFile);
    return ["-key", keyFile];
  } catch (error) {
    if (!(error instanceof Deno.errors.NotFound)) throw error;
    return [...NEW_KEY[key], "-keyout", keyFile];
  }
}

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
 * extendedKeyUsage, for certificates iPXE must refuse; `validity` replaces the usual 30 days
 * from now (openssl's `YYYYMMDDHHMMSSZ`), for one expired or not valid yet.
 */
export function makeCodeSigning(
  dir: string,
  name: string,
  issuer: Issued,
  options: { key?: KeyKind; extensions?: string[]; validity?: { from: string; to: string } } = {},
): Promise<Issued> {
  const extensions = [
    "basicConstraints=critical,CA:FALSE",
    ...(options.extensions ??
      ["keyUsage=critical,digitalSignature", "extendedKeyUsage=codeSigning"]),
  ];
  return options.validity
    ? issueDated(dir, name, issuer, extensions, options.validity)
    : issue(dir, name, options.key ?? "rsa2048", issuer, extensions);
}

/**
 * An RSA certificate under `issuer` valid from `from` to `to`: `openssl req` gives only days
 * from now, `openssl ca` any dates. Its database and serial live in a directory of their own.
 */
async function issueDated(
  dir: string,
  name: string,
  issuer: Issued,
  extensions: string[],
  { from, to }: { from: string; to: string },
): Promise<Issued> {
  const keyFile = path.join(dir, `${name}.key`);
  const certFile = path.join(dir, `${name}.crt`);
  const ca = await fs.mkdtemp(path.join(dir, "ca-"));
  const request = path.join(ca, "request.csr");
  const config = path.join(ca, "ca.cnf");
  const extfile = path.join(ca, "extensions");
  await fs.writeFile(path.join(ca, "index.txt"), "");
  await fs.writeFile(path.join(ca, "serial"), "01\n");
  await fs.writeFile(extfile, extensions.map((line) => `${line}\n`).join(""));
  await fs.writeFile(
    config,
    [
      "[ca]",
      "default_ca = test",
      "[test]",
      `database = ${path.join(ca, "index.txt")}`,
      `new_certs_dir = ${ca}`,
      `serial = ${path.join(ca, "serial")}`,
      "default_md = sha256",
      "policy = any",
      "[any]",
      "commonName = supplied",
      "",
    ].join("\n"),
  );
  const requested = await runCommand("openssl", [
    ...["req", "-new", ...await keyArguments(name, "rsa2048", keyFile), "-noenc", "-out", request],
    ...["-subj", `/CN=${name}`],
  ]);
  assert.equal(requested.code, 0, requested.stderr);
  const signed = await runCommand("openssl", [
    ...["ca", "-batch", "-notext", "-config", config, "-extfile", extfile],
    ...["-cert", issuer.certFile, "-keyfile", issuer.keyFile],
    ...["-startdate", from, "-enddate", to, "-in", request, "-out", certFile],
  ]);
  assert.equal(signed.code, 0, signed.stderr);
  return {
    keyFile,
    certFile,
    key: await fs.readFile(keyFile, "utf8"),
    cert: await fs.readFile(certFile, "utf8"),
  };
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
    ...await keyArguments(name, key, keyFile),
    "-noenc",
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

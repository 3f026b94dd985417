/**
 * SHA256SUMS.sig: SSH signatures (SSHSIG) made and checked natively, the signing key read and
 * held as a non-extractable key, and the SSH wire format and armor they are written in. It
 * does not parse trust files (allowed_signers.ts) or know where a signature is stored.
 *
 * OpenSSH's PROTOCOL.sshsig, done here rather than by `ssh-keygen -Y sign` so that the signing
 * key never reaches a file, a child process's environment or an ssh-agent: its text becomes a
 * non-extractable CryptoKey and its bytes are zeroed. `ssh-keygen -Y verify` checks what
 * signSums writes, byte for byte the signature `ssh-keygen -Y sign` would write (Ed25519 is
 * deterministic); verifySums checks what `ssh-keygen -Y sign` writes.
 */
import { Buffer } from "node:buffer";
import { createHash } from "node:crypto";
import { SIGNATURE_NAME, SUMS_NAME } from "../../types/manifest.ts";
import { type Env, ReleaseError, type Run, UsageError } from "./run.ts";
import { readSmallFile } from "./small_file.ts";

export const SIGNING_KEY_ENV = "RELEASE_BOOT_SIGNING_KEY";

/** Key, signature and trust files are hundreds of bytes; anything larger is not one of them. */
export const MAX_SIGNING_TEXT = 64 * 1024;

export const ED25519 = "ssh-ed25519";

const SSHSIG_MAGIC = "SSHSIG";

const SSHSIG_VERSION = 1;

/** OpenSSH writes sha512 and accepts both when it verifies. */
const SSHSIG_HASHES = new Set(["sha512", "sha256"]);

const SIGNATURE_ARMOR = {
  begin: "-----BEGIN SSH SIGNATURE-----",
  end: "-----END SSH SIGNATURE-----",
};

const KEY_ARMOR = {
  begin: "-----BEGIN OPENSSH PRIVATE KEY-----",
  end: "-----END OPENSSH PRIVATE KEY-----",
};

const KEY_MAGIC = "openssh-key-v1\0";

/** RFC 8410 PKCS#8 DER of an Ed25519 private key, up to the 32-byte seed that ends it. */
const ED25519_PKCS8_PREFIX = "302e020100300506032b657004220420";

const MAKE_KEY = "make one with ssh-keygen -t ed25519 -N '' -C release-boot";

/**
 * The release's signing key: its public half in the clear, its private half only as a
 * non-extractable CryptoKey. Printing or serialising it shows the fingerprint, never the seed.
 */
export class SigningKey {
  readonly #privateKey: CryptoKey;
  /** The public key in SSH wire format (string "ssh-ed25519", string key). */
  readonly publicBlob: Uint8Array;
  /** `SHA256:...`, as `ssh-keygen -l` prints it. */
  readonly fingerprint: string;
  readonly comment: string;

  constructor(privateKey: CryptoKey, publicBlob: Uint8Array, comment: string) {
    this.#privateKey = privateKey;
    this.publicBlob = publicBlob;
    this.fingerprint = sshFingerprint(publicBlob);
    this.comment = comment;
  }

  sign(data: Uint8Array): Promise<ArrayBuffer> {
    return crypto.subtle.sign("Ed25519", this.#privateKey, ownBytes(data));
  }

  /** `ssh-ed25519 AAAA... comment`: a line for allowed_signers or --trust. */
  publicKeyLine(): string {
    return [ED25519, Buffer.from(this.publicBlob).toString("base64"), this.comment]
      .filter(Boolean).join(" ");
  }

  toString(): string {
    return `${ED25519} ${this.fingerprint}${this.comment ? ` ${this.comment}` : ""}`;
  }

  toJSON(): { type: string; fingerprint: string; comment: string } {
    return { type: ED25519, fingerprint: this.fingerprint, comment: this.comment };
  }

  [Symbol.for("Deno.customInspect")](): string {
    return `SigningKey(${this})`;
  }

  [Symbol.for("nodejs.util.inspect.custom")](): string {
    return `SigningKey(${this})`;
  }
}

/** A public key the fetch side accepts signatures from, with its allowed_signers limits. */
export interface TrustedKey {
  /** The allowed_signers principals, or for a bare key line its comment or fingerprint. */
  principal: string;
  fingerprint: string;
  publicBlob: Uint8Array;
  /** The raw 32-byte Ed25519 public key. */
  publicKey: Uint8Array;
  /** allowed_signers `namespaces="..."` patterns; undefined means every namespace. */
  namespaces?: string;
  /** allowed_signers `valid-after` / `valid-before`, in ms since the epoch. */
  validAfter?: number;
  validBefore?: number;
  /** Where it was read, for messages: `--trust FILE, line 3`. */
  origin: string;
}

/**
 * The signing key from `--signing-key FILE` or from RELEASE_BOOT_SIGNING_KEY (the key's text,
 * as a CI secret), undefined when neither is given. The key's text in the environment is a
 * secret: the run masks it line by line and prints none of it (and child processes never get
 * it: the run's shell leaves it out of their environment).
 */
export async function readSigningKey(
  flagFile: string | undefined,
  env: Env,
  run: Pick<Run, "log" | "maskKeyText" | "resolve">,
): Promise<SigningKey | undefined> {
  run.maskKeyText(env[SIGNING_KEY_ENV]);
  const fromEnv = env[SIGNING_KEY_ENV]?.trim() ? env[SIGNING_KEY_ENV] : undefined;
  if (flagFile !== undefined && fromEnv !== undefined) {
    throw new UsageError(
      `both --signing-key and ${SIGNING_KEY_ENV} are set: give the signing key one way only`,
    );
  }
  if (flagFile !== undefined) {
    const source = `--signing-key ${flagFile}`;
    const { text, mode } = await readSmallText(run.resolve(flagFile), source);
    if (mode & 0o077) {
      run.log(
        `warning: ${source} can be read by other users (mode ${(mode & 0o777).toString(8)}): ` +
          `chmod 600 ${flagFile}`,
      );
    }
    return await withSource(source, () => parseSigningKey(text));
  }
  if (fromEnv !== undefined) {
    return await withSource(SIGNING_KEY_ENV, () => parseSigningKey(fromEnv));
  }
  return undefined;
}

/**
 * Parses the text of an unencrypted OpenSSH Ed25519 private key (openssh-key-v1, as
 * `ssh-keygen -t ed25519 -N ''` writes it). Every refusal is one line that never quotes the key.
 */
export async function parseSigningKey(text: string): Promise<SigningKey> {
  const bytes = dearmorKey(text);
  try {
    const damaged = (problem: string) =>
      new UsageError(
        `the signing key is damaged (${problem}): copy the whole key file again, or ${MAKE_KEY}`,
      );
    if (!startsWithAscii(bytes, KEY_MAGIC)) throw damaged("not openssh-key-v1");
    const file = new WireReader(bytes.subarray(KEY_MAGIC.length), damaged);
    const cipher = file.text();
    const kdf = file.text();
    file.string();
    const count = file.u32();
    if (count !== 1) {
      throw new UsageError(`the signing key holds ${count} keys, not one: ${MAKE_KEY}`);
    }
    const publicBlob = file.string();
    const type = new WireReader(publicBlob, damaged).text();
    if (type !== ED25519) {
      throw new UsageError(
        `the signing key is ${describeKeyType(type)}: release-boot signs with Ed25519, ${MAKE_KEY}`,
      );
    }
    if (cipher !== "none" || kdf !== "none") {
      throw new UsageError(
        `the signing key is encrypted: release-boot needs an unencrypted key, ${MAKE_KEY}`,
      );
    }
    const publicKey = readEd25519Blob(publicBlob, damaged);
    const secret = new WireReader(file.string(), damaged);
    file.end();
    if (secret.u32() !== secret.u32()) throw damaged("its check numbers differ");
    if (secret.text() !== ED25519) throw damaged("its private part is not ssh-ed25519");
    if (!equalBytes(secret.string(), publicKey)) throw damaged("its two public keys differ");
    const seedAndPublic = secret.string();
    if (seedAndPublic.length !== 64 || !equalBytes(seedAndPublic.subarray(32), publicKey)) {
      throw damaged("its private key is not seed and public key");
    }
    const comment = secret.text();
    const padding = secret.rest();
    if (padding.length >= 8 || padding.some((byte, at) => byte !== at + 1)) {
      throw damaged("bad padding");
    }
    const privateKey = await importEd25519Seed(seedAndPublic.subarray(0, 32));
    const key = new SigningKey(privateKey, publicBlob.slice(), comment);
    if (!await keyPairMatches(key, publicKey)) {
      throw damaged("its private key does not belong to its public key");
    }
    return key;
  } finally {
    bytes.fill(0);
  }
}

/**
 * Signs `sums` as `ssh-keygen -Y sign -n NAMESPACE` does: SSHSIG version 1 over its SHA-512,
 * armored and wrapped at 70 columns.
 */
export async function signSums(
  key: SigningKey,
  sums: Uint8Array,
  namespace = "file",
): Promise<string> {
  const hash = "sha512";
  const signature = new Uint8Array(await key.sign(signedData(namespace, hash, sums)));
  const blob = concatBytes(
    ascii(SSHSIG_MAGIC),
    u32Bytes(SSHSIG_VERSION),
    sshString(key.publicBlob),
    sshString(namespace),
    sshString(""),
    sshString(hash),
    sshString(concatBytes(sshString(ED25519), sshString(signature))),
  );
  const lines = Buffer.from(blob).toString("base64").match(/.{1,70}/g)!;
  return `${SIGNATURE_ARMOR.begin}\n${lines.join("\n")}\n${SIGNATURE_ARMOR.end}\n`;
}

/**
 * Checks `armored` (SHA256SUMS.sig) over `sums` as `ssh-keygen -Y verify` does, against the
 * trusted keys only, and names the signer. Every failure is a ReleaseError of one line.
 */
export async function verifySums(
  trusted: TrustedKey[],
  sums: Uint8Array,
  armored: string,
  namespace = "file",
): Promise<{ principal: string; fingerprint: string }> {
  const damaged = (problem: string) =>
    new ReleaseError(`${SIGNATURE_NAME} is damaged (${problem}): download it again`);
  const blob = dearmorSignature(armored);
  if (!startsWithAscii(blob, SSHSIG_MAGIC)) throw damaged("no SSHSIG magic");
  const sig = new WireReader(blob.subarray(SSHSIG_MAGIC.length), damaged);
  const version = sig.u32();
  if (version !== SSHSIG_VERSION) {
    throw new ReleaseError(
      `${SIGNATURE_NAME} is SSHSIG version ${version}; release-boot checks version 1`,
    );
  }
  const publicBlob = sig.string();
  const signedNamespace = sig.text();
  sig.string();
  const hash = sig.text();
  const signature = new WireReader(sig.string(), damaged);
  sig.end();

  if (signedNamespace !== namespace) {
    throw new ReleaseError(
      `${SIGNATURE_NAME} is signed for namespace "${signedNamespace}", not "${namespace}": ` +
        `it must be made with ssh-keygen -Y sign -n ${namespace} (or by release-boot)`,
    );
  }
  if (!SSHSIG_HASHES.has(hash)) {
    throw new ReleaseError(
      `${SIGNATURE_NAME} uses hash "${hash}": OpenSSH signatures use sha512 (or sha256)`,
    );
  }
  const fingerprint = sshFingerprint(publicBlob);
  const signerType = new WireReader(publicBlob, damaged).text();
  if (signerType !== ED25519) {
    throw new ReleaseError(
      `${SIGNATURE_NAME} was made with ${describeKeyType(signerType)} (${fingerprint}): ` +
        `release-boot checks ssh-ed25519 signatures only`,
    );
  }
  const signer = chooseTrustedSigner(trusted, publicBlob, fingerprint, namespace);
  if (signature.text() !== ED25519) throw damaged("its signature is not ssh-ed25519");
  const raw = signature.string();
  signature.end();
  if (raw.length !== 64) throw damaged("its signature is not 64 bytes");

  const publicKey = await crypto.subtle.importKey(
    "raw",
    ownBytes(signer.publicKey),
    { name: "Ed25519" },
    false,
    ["verify"],
  );
  const data = signedData(namespace, hash, sums);
  if (!await crypto.subtle.verify("Ed25519", publicKey, ownBytes(raw), data)) {
    throw new ReleaseError(
      `${SIGNATURE_NAME} does not match ${SUMS_NAME}: it was changed after ${fingerprint} ` +
        `(${signer.principal}) signed it, or the two files are from different releases`,
    );
  }
  return { principal: signer.principal, fingerprint };
}

/**
 * The key a signature says made it, as a trusted key of its own: checking the signature with
 * it proves which key signed, never that the key is trusted. An unreadable one: ReleaseError.
 */
export function signatureKey(armored: string): TrustedKey {
  const fail = () => new ReleaseError(`${SIGNATURE_NAME} is not an SSH signature`);
  const blob = dearmorSignature(armored);
  if (!startsWithAscii(blob, SSHSIG_MAGIC)) throw fail();
  const reader = new WireReader(blob.subarray(SSHSIG_MAGIC.length), fail);
  reader.u32();
  const publicBlob = reader.string();
  const fingerprint = sshFingerprint(publicBlob);
  return {
    principal: fingerprint,
    fingerprint,
    publicBlob,
    publicKey: readEd25519Blob(publicBlob, fail),
    origin: SIGNATURE_NAME,
  };
}

/** The trusted entry for the signer's key that allows this namespace now, or why none does. */
function chooseTrustedSigner(
  trusted: TrustedKey[],
  publicBlob: Uint8Array,
  fingerprint: string,
  namespace: string,
): TrustedKey {
  const entries = trusted.filter((key) => equalBytes(key.publicBlob, publicBlob));
  if (entries.length === 0) {
    throw new ReleaseError(
      `${SIGNATURE_NAME} was made by ${fingerprint}, a key the trust file does not list: ` +
        `add its public key if you trust it, or find out who signed this release`,
    );
  }
  const now = Date.now();
  const problem = (key: TrustedKey) => {
    if (!matchesPatternList(namespace, key.namespaces ?? "*")) {
      return `allows it only for namespaces "${key.namespaces}", not "${namespace}"`;
    }
    if (key.validAfter !== undefined && now < key.validAfter) {
      return `trusts it only from ${new Date(key.validAfter).toISOString()}`;
    }
    if (key.validBefore !== undefined && now > key.validBefore) {
      return `trusted it only until ${new Date(key.validBefore).toISOString()}`;
    }
    return undefined;
  };
  const usable = entries.find((key) => problem(key) === undefined);
  if (usable) return usable;
  throw new ReleaseError(
    `${SIGNATURE_NAME} was made by ${fingerprint}, but ${entries[0].origin} ${problem(entries[0])}`,
  );
}

/** OpenSSH's match_pattern_list: comma-separated globs (* and ?), `!` negates and wins. */
export function matchesPatternList(name: string, list: string): boolean {
  let matched = false;
  for (const entry of list.split(",")) {
    const negated = entry.startsWith("!");
    if (!matchesGlob(name, negated ? entry.slice(1) : entry)) continue;
    if (negated) return false;
    matched = true;
  }
  return matched;
}

/** Glob match in O(name × pattern): on a mismatch, only the last `*` is retried. */
function matchesGlob(name: string, pattern: string): boolean {
  let n = 0;
  let p = 0;
  let star = -1;
  let resume = 0;
  while (n < name.length) {
    if (p < pattern.length && (pattern[p] === "?" || pattern[p] === name[n])) {
      n++;
      p++;
    } else if (p < pattern.length && pattern[p] === "*") {
      star = p++;
      resume = n;
    } else if (star >= 0) {
      p = star + 1;
      n = ++resume;
    } else {
      return false;
    }
  }
  while (p < pattern.length && pattern[p] === "*") p++;
  return p === pattern.length;
}

export function isKeyType(field: string | undefined): boolean {
  return field !== undefined &&
    /^(ssh-(ed25519|rsa|dss)|ecdsa-sha2-nistp\d+|sk-[a-z0-9-]+@openssh\.com)(-cert-v01@openssh\.com)?$/
      .test(field);
}

export function describeKeyType(type: string): string {
  if (type === "ssh-rsa") return "an RSA key (ssh-rsa)";
  if (type.startsWith("ecdsa-")) return `an ECDSA key (${type})`;
  if (type.startsWith("sk-")) return `a security-key key (${type})`;
  if (type.includes("-cert-")) return `a certificate (${type})`;
  return `a ${type} key`;
}

export function readEd25519Blob(blob: Uint8Array, fail: (problem: string) => Error): Uint8Array {
  const reader = new WireReader(blob, fail);
  if (reader.text() !== ED25519) throw fail("not an ssh-ed25519 key");
  const key = reader.string();
  reader.end();
  if (key.length !== 32) throw fail("an Ed25519 public key is 32 bytes");
  return key;
}

/** The armored private key's bytes; refusals name the kind of text without quoting it. */
function dearmorKey(text: string): Uint8Array {
  if (text.length > MAX_SIGNING_TEXT) {
    throw new UsageError(`the signing key is over 64 KiB, so it is not an SSH key: ${MAKE_KEY}`);
  }
  const trimmed = text.trim();
  const pem = trimmed.match(/^-----BEGIN ([A-Z0-9 ]+)-----/)?.[1];
  if (pem === "ENCRYPTED PRIVATE KEY") {
    throw new UsageError(
      `the signing key is encrypted: release-boot needs an unencrypted key, ${MAKE_KEY}`,
    );
  }
  if (pem !== undefined && pem !== "OPENSSH PRIVATE KEY") {
    const what = pem === "RSA PRIVATE KEY"
      ? "a PEM RSA key"
      : pem === "EC PRIVATE KEY"
      ? "a PEM ECDSA key"
      : `a PEM "${pem}" file`;
    throw new UsageError(
      `the signing key is ${what}: release-boot reads OpenSSH Ed25519 keys, ${MAKE_KEY}`,
    );
  }
  if (isKeyType(trimmed.split(/\s/)[0])) {
    throw new UsageError(
      "the signing key is a public key: give the private key file (the one without .pub)",
    );
  }
  if (pem === undefined || !trimmed.endsWith(KEY_ARMOR.end)) {
    throw new UsageError(
      `the signing key is not an OpenSSH private key (${KEY_ARMOR.begin} ... ` +
        `${KEY_ARMOR.end}): ${MAKE_KEY}`,
    );
  }
  const body = trimmed.slice(KEY_ARMOR.begin.length, -KEY_ARMOR.end.length).replace(/\s+/g, "");
  return decodeBase64(
    body,
    () => new UsageError(`the signing key is damaged (its body is not base64): ${MAKE_KEY}`),
  );
}

function dearmorSignature(text: string): Uint8Array {
  if (text.length > MAX_SIGNING_TEXT) {
    throw new ReleaseError(`${SIGNATURE_NAME} is over 64 KiB, so it is not an SSH signature`);
  }
  const trimmed = text.trim();
  if (!trimmed.startsWith(SIGNATURE_ARMOR.begin) || !trimmed.endsWith(SIGNATURE_ARMOR.end)) {
    throw new ReleaseError(
      `${SIGNATURE_NAME} is not an SSH signature (${SIGNATURE_ARMOR.begin} ... ` +
        `${SIGNATURE_ARMOR.end})`,
    );
  }
  const body = trimmed.slice(SIGNATURE_ARMOR.begin.length, -SIGNATURE_ARMOR.end.length);
  return decodeBase64(
    body.replace(/\s+/g, ""),
    () => new ReleaseError(`${SIGNATURE_NAME} is damaged (its body is not base64)`),
  );
}

/** Strict base64 (Buffer.from skips stray characters); Buffer's pooled copy is zeroed. */
export function decodeBase64(text: string, fail: () => Error): Uint8Array {
  if (text.length % 4 !== 0 || !/^[A-Za-z0-9+/]*={0,2}$/.test(text)) throw fail();
  const decoded = Buffer.from(text, "base64");
  const bytes = new Uint8Array(decoded);
  decoded.fill(0);
  if (bytes.length !== text.length / 4 * 3 - (text.match(/=*$/)![0].length)) throw fail();
  return bytes;
}

/** What SSHSIG signs: magic, namespace, reserved, hash name, hash of the message. */
function signedData(namespace: string, hash: string, message: Uint8Array): Uint8Array<ArrayBuffer> {
  return concatBytes(
    ascii(SSHSIG_MAGIC),
    sshString(namespace),
    sshString(""),
    sshString(hash),
    sshString(createHash(hash).update(message).digest()),
  );
}

async function importEd25519Seed(seed: Uint8Array): Promise<CryptoKey> {
  const pkcs8 = concatBytes(Buffer.from(ED25519_PKCS8_PREFIX, "hex"), seed);
  try {
    return await crypto.subtle.importKey("pkcs8", pkcs8, { name: "Ed25519" }, false, ["sign"]);
  } finally {
    pkcs8.fill(0);
  }
}

/** The file's public key must be the one its seed makes; a sign-and-verify proves it. */
async function keyPairMatches(key: SigningKey, publicKey: Uint8Array): Promise<boolean> {
  const probe = ascii("release-boot key check");
  const verifier = await crypto.subtle.importKey(
    "raw",
    ownBytes(publicKey),
    { name: "Ed25519" },
    false,
    ["verify"],
  );
  return await crypto.subtle.verify("Ed25519", verifier, await key.sign(probe), probe);
}

/** Runs `parse`, prefixing a UsageError with where the text came from. */
async function withSource<T>(source: string, parse: () => Promise<T>): Promise<T> {
  try {
    return await parse();
  } catch (error) {
    if (error instanceof UsageError) throw new UsageError(`${source}: ${error.message}`);
    throw error;
  }
}

/**
 * A key or trust file, refused unreadable, not a regular file (a FIFO, a device), or over
 * 64 KiB, before it is read. A link to a file is followed: secrets are often mounted as links.
 */
export async function readSmallText(
  file: string,
  source: string,
): Promise<{ text: string; mode: number }> {
  const read = await readSmallFile(file, MAX_SIGNING_TEXT, { followLinks: true });
  if ("problem" in read) {
    throw new UsageError(
      read.problem === "unreadable"
        ? `${source}: cannot open it (${read.code})`
        : read.problem === "too large"
        ? `${source}: over 64 KiB, not a key file`
        : `${source}: not a regular file`,
    );
  }
  const text = new TextDecoder().decode(read.bytes);
  read.bytes.fill(0);
  return { text, mode: read.mode };
}

/** Reads SSH wire format (RFC 4251): every length is checked against what is left. */
export class WireReader {
  #bytes: Uint8Array;
  #at = 0;
  #fail: (problem: string) => Error;

  constructor(bytes: Uint8Array, fail: (problem: string) => Error) {
    this.#bytes = bytes;
    this.#fail = fail;
  }

  u32(): number {
    if (this.#bytes.length - this.#at < 4) throw this.#fail("it ends early");
    const view = new DataView(this.#bytes.buffer, this.#bytes.byteOffset, this.#bytes.length);
    const value = view.getUint32(this.#at);
    this.#at += 4;
    return value;
  }

  string(): Uint8Array {
    const length = this.u32();
    if (length > this.#bytes.length - this.#at) throw this.#fail("a field runs past its end");
    const value = this.#bytes.subarray(this.#at, this.#at + length);
    this.#at += length;
    return value;
  }

  text(): string {
    const bytes = this.string();
    try {
      return new TextDecoder("utf-8", { fatal: true }).decode(bytes);
    } catch {
      throw this.#fail("a name is not UTF-8");
    }
  }

  rest(): Uint8Array {
    const value = this.#bytes.subarray(this.#at);
    this.#at = this.#bytes.length;
    return value;
  }

  end(): void {
    if (this.#at !== this.#bytes.length) throw this.#fail("bytes follow its end");
  }
}

/** The SSH wire-format blob (string "ssh-ed25519", string key) of a raw Ed25519 public key. */
export function ed25519Blob(publicKey: Uint8Array): Uint8Array {
  return concatBytes(sshString(ED25519), sshString(publicKey));
}

export function sshFingerprint(publicBlob: Uint8Array): string {
  return `SHA256:${createHash("sha256").update(publicBlob).digest("base64").replace(/=+$/, "")}`;
}

function sshString(value: Uint8Array | string): Uint8Array {
  const bytes = typeof value === "string" ? ascii(value) : value;
  return concatBytes(u32Bytes(bytes.length), bytes);
}

function u32Bytes(value: number): Uint8Array {
  const bytes = new Uint8Array(4);
  new DataView(bytes.buffer).setUint32(0, value);
  return bytes;
}

function ascii(text: string): Uint8Array<ArrayBuffer> {
  return new TextEncoder().encode(text);
}

export function concatBytes(...parts: Uint8Array[]): Uint8Array<ArrayBuffer> {
  const out = new Uint8Array(parts.reduce((sum, part) => sum + part.length, 0));
  let at = 0;
  for (const part of parts) {
    out.set(part, at);
    at += part.length;
  }
  return out;
}

/** A copy on its own ArrayBuffer, which is what Web Crypto's types ask for. */
function ownBytes(bytes: Uint8Array): Uint8Array<ArrayBuffer> {
  return new Uint8Array(bytes);
}

function startsWithAscii(bytes: Uint8Array, prefix: string): boolean {
  return equalBytes(bytes.subarray(0, prefix.length), ascii(prefix));
}

function equalBytes(a: Uint8Array, b: Uint8Array): boolean {
  return a.length === b.length && a.every((byte, at) => byte === b[at]);
}

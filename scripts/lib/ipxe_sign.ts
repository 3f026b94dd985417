/**
 * iPXE image signatures: reads a code-signing key and its certificate chain and checks them
 * the way iPXE's `imgverify` will judge them, and signs a file's SHA-256 digest as the
 * detached CMS SignedData iPXE reads. It never reads the files it signs and never writes
 * anything.
 */
import { Buffer } from "node:buffer";
import {
  constants as cryptoConstants,
  createPrivateKey,
  createPublicKey,
  type KeyObject,
  privateEncrypt,
  X509Certificate,
} from "node:crypto";
import * as cms from "@peculiar/asn1-cms";
import { AsnConvert, OctetString } from "@peculiar/asn1-schema";
import {
  AlgorithmIdentifier,
  BasicConstraints,
  Certificate,
  ExtendedKeyUsage,
  id_ce_basicConstraints,
  id_ce_extKeyUsage,
  id_ce_keyUsage,
  id_kp_codeSigning,
  KeyUsage,
  KeyUsageFlags,
} from "@peculiar/asn1-x509";
import { p256 } from "@noble/curves/nist.js";
import * as v from "valibot";
import { type Env, ReleaseError, type Run, UsageError } from "./run.ts";
import { type IpxeSigningSource, nameOf, type TextSource } from "./cli.ts";
import { readSmallText } from "./sshsig.ts";

/** A key and chain that passed every check: what `signDigest` signs with. */
export interface IpxeSigningIdentity {
  key: KeyObject;
  algorithm: "rsa" | "ecdsa-p256";
  /** DER certificates as the chain file gave them: signer first, self-signed root last. */
  chain: Uint8Array[];
  /** The signer certificate's subject, for progress lines. */
  signer: string;
}

const OID_SHA256 = "2.16.840.1.101.3.4.2.1";
const OID_RSA_ENCRYPTION = "1.2.840.113549.1.1.1";
const OID_ECDSA_WITH_SHA256 = "1.2.840.10045.4.3.2";
/** DER of DigestInfo { sha256, NULL } up to the 32 digest bytes (RFC 8017, section 9.2). */
const SHA256_DIGEST_INFO_PREFIX = Buffer.from("3031300d060960864801650304020105000420", "hex");
const DER_NULL = new Uint8Array([0x05, 0x00]);
const MIN_RSA_BITS = 2048;

const Sha256HexSchema = v.pipe(v.string(), v.regex(/^[0-9a-f]{64}$/));

interface ChainCertificate {
  der: Uint8Array;
  x509: X509Certificate;
  asn1: Certificate;
  name: string;
}

/**
 * The signing identity from its two sources (cli's `ipxeSigning`), checked as of now; undefined
 * when none is given. The key's text in the environment is a secret: the run masks it line by
 * line (and child processes never get it: the run's shell leaves *KEY* variables out). The
 * certificate chain is public.
 */
export async function readIpxeSigningIdentity(
  source: IpxeSigningSource | undefined,
  env: Env,
  run: Pick<Run, "log" | "maskKeyText" | "resolve">,
): Promise<IpxeSigningIdentity | undefined> {
  if (!source) return undefined;
  if ("variable" in source.key) run.maskKeyText(env[source.key.variable]);
  const keyPem = await readText(source.key, env, run, true);
  const chainPem = await readText(source.cert, env, run, false);
  return checkSigningIdentity(keyPem, chainPem, new Date());
}

async function readText(
  source: TextSource,
  env: Env,
  run: Pick<Run, "log" | "resolve">,
  secret: boolean,
): Promise<string> {
  if (!("file" in source)) return env[source.variable] ?? "";
  // Relative to the run's directory, as the SSH key's path is.
  const { text, mode } = await readSmallText(run.resolve(source.file), nameOf(source));
  if (secret && mode & 0o077) {
    run.log(
      `warning: ${nameOf(source)} can be read by other users (mode ${
        (mode & 0o777).toString(8)
      }): chmod 600 ${source.file}`,
    );
  }
  return text;
}

/**
 * Parses the key and chain and refuses, one problem per message, anything iPXE would not
 * accept: a key that is not RSA ≥ 2048 bits or ECDSA P-256, a key that is not the signer
 * certificate's, a signer without digitalSignature and codeSigning, a certificate outside its
 * validity at `now`, a chain that is out of order or does not end in a self-signed root: bad
 * input, refused before any work.
 */
export function checkSigningIdentity(
  keyPem: string,
  chainPem: string,
  now: Date,
): IpxeSigningIdentity {
  const key = parsePrivateKey(keyPem);
  const algorithm = signingAlgorithm(key);
  const chain = parseChain(chainPem);
  const signer = chain[0];
  if (!samePublicKey(key, signer.x509.publicKey)) {
    throw new UsageError(
      `the iPXE signing key does not belong to the signer certificate ${signer.name}: put the key's own certificate first in the certificate file`,
    );
  }
  requireCodeSigning(signer);
  for (const cert of chain) requireValidAt(cert, now);
  for (let at = 0; at + 1 < chain.length; at++) requireIssuedBy(chain[at], chain[at + 1]);
  requireSelfSignedRoot(chain[chain.length - 1]);
  return { key, algorithm, chain: chain.map((cert) => cert.der), signer: signer.name };
}

/**
 * A detached CMS SignedData (DER) over a file whose SHA-256 is `sha256Hex`: SHA-256, no signed
 * attributes, the whole chain included, since iPXE's TRUST= holds only the root's
 * fingerprint and must find the root certificate in the signature. The same digest gives the
 * same bytes (PKCS#1 v1.5 and RFC 6979 ECDSA are deterministic).
 */
export function signDigest(identity: IpxeSigningIdentity, sha256Hex: string): Uint8Array {
  const parsed = v.safeParse(Sha256HexSchema, sha256Hex);
  if (!parsed.success) {
    throw new ReleaseError(
      `cannot sign ${
        JSON.stringify(sha256Hex)
      } for iPXE: a SHA-256 digest is 64 lowercase hex digits`,
    );
  }
  const digest = Buffer.from(parsed.output, "hex");
  const signer = AsnConvert.parse(identity.chain[0], Certificate);
  const sha256 = new AlgorithmIdentifier({ algorithm: OID_SHA256 });
  const signerInfo = new cms.SignerInfo({
    version: cms.CMSVersion.v1,
    sid: new cms.SignerIdentifier({
      issuerAndSerialNumber: new cms.IssuerAndSerialNumber({
        issuer: signer.tbsCertificate.issuer,
        serialNumber: signer.tbsCertificate.serialNumber,
      }),
    }),
    digestAlgorithm: sha256,
    signatureAlgorithm: identity.algorithm === "rsa"
      ? new AlgorithmIdentifier({ algorithm: OID_RSA_ENCRYPTION, parameters: DER_NULL.buffer })
      : new AlgorithmIdentifier({ algorithm: OID_ECDSA_WITH_SHA256 }),
    signature: new OctetString(signatureOverDigest(identity, digest)),
  });
  const signedData = new cms.SignedData({
    version: cms.CMSVersion.v1,
    digestAlgorithms: new cms.DigestAlgorithmIdentifiers([sha256]),
    encapContentInfo: new cms.EncapsulatedContentInfo({ eContentType: cms.id_data }),
    // DER orders a SET OF by its encodings; openssl writes the same order.
    certificates: new cms.CertificateSet(
      [...identity.chain].sort(Buffer.compare).map((der) =>
        new cms.CertificateChoices({ certificate: AsnConvert.parse(der, Certificate) })
      ),
    ),
    signerInfos: new cms.SignerInfos([signerInfo]),
  });
  const contentInfo = new cms.ContentInfo({
    contentType: cms.id_signedData,
    content: AsnConvert.serialize(signedData),
  });
  return new Uint8Array(AsnConvert.serialize(contentInfo));
}

/** With no signed attributes, CMS signs the content's digest itself, never the content. */
function signatureOverDigest(identity: IpxeSigningIdentity, digest: Buffer): Uint8Array {
  if (identity.algorithm === "rsa") {
    // PKCS#1 v1.5 signing is the private-key operation over DigestInfo with type-1 padding.
    return new Uint8Array(privateEncrypt(
      { key: identity.key, padding: cryptoConstants.RSA_PKCS1_PADDING },
      Buffer.concat([SHA256_DIGEST_INFO_PREFIX, digest]),
    ));
  }
  // node:crypto hashes whatever it signs with ECDSA; the digest must be signed as it is.
  const jwk = identity.key.export({ format: "jwk" });
  const secret = Buffer.from(jwk.d ?? "", "base64url");
  return p256.sign(digest, secret, { prehash: false, format: "der" });
}

function parsePrivateKey(keyPem: string): KeyObject {
  try {
    return createPrivateKey({ key: keyPem, format: "pem" });
  } catch {
    throw new UsageError(
      "the iPXE signing key is not an unencrypted PEM private key: give the key file openssl wrote (BEGIN PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY)",
    );
  }
}

function signingAlgorithm(key: KeyObject): IpxeSigningIdentity["algorithm"] {
  const details = key.asymmetricKeyDetails ?? {};
  if (key.asymmetricKeyType === "rsa") {
    const bits = details.modulusLength ?? 0;
    if (bits < MIN_RSA_BITS) {
      throw new UsageError(
        `the iPXE signing key is RSA with ${bits} bits: use an RSA key of at least ${MIN_RSA_BITS} bits (or ECDSA P-256)`,
      );
    }
    return "rsa";
  }
  if (key.asymmetricKeyType === "ec" && details.namedCurve === "prime256v1") return "ecdsa-p256";
  const kind = key.asymmetricKeyType === "ec"
    ? `ECDSA on ${details.namedCurve}`
    : key.asymmetricKeyType;
  throw new UsageError(
    `the iPXE signing key is ${kind}: iPXE image signatures need RSA (${MIN_RSA_BITS} bits or more) or ECDSA P-256`,
  );
}

function parseChain(chainPem: string): ChainCertificate[] {
  const blocks = [
    ...chainPem.matchAll(/-----BEGIN CERTIFICATE-----([^-]*)-----END CERTIFICATE-----/g),
  ];
  if (blocks.length === 0) {
    throw new UsageError(
      "the iPXE signing certificate file holds no PEM certificate: give the signer's certificate first, then each issuer up to and including the root",
    );
  }
  return blocks.map((block, at) => {
    const der = new Uint8Array(Buffer.from(block[1].replace(/\s+/g, ""), "base64"));
    const position = `certificate ${at + 1} of the iPXE signing certificate file`;
    let x509: X509Certificate;
    let asn1: Certificate;
    try {
      x509 = new X509Certificate(der);
      asn1 = AsnConvert.parse(der, Certificate);
    } catch {
      throw new UsageError(`${position} is not a valid X.509 certificate: replace it`);
    }
    // Signatures carry each certificate re-encoded from its parsed form: it must come out
    // byte for byte, or its own signature would no longer verify.
    if (!Buffer.from(AsnConvert.serialize(asn1)).equals(der)) {
      throw new UsageError(
        `${position} is not in canonical DER: re-encode it with openssl x509 and try again`,
      );
    }
    return { der, x509, asn1, name: x509.subject.replaceAll("\n", ", ") };
  });
}

function samePublicKey(key: KeyObject, certificateKey: KeyObject): boolean {
  const spki = (k: KeyObject) => k.export({ format: "der", type: "spki" });
  return spki(createPublicKey(key)).equals(spki(certificateKey));
}

function extension<T>(cert: ChainCertificate, oid: string, type: new () => T): T | undefined {
  const found = cert.asn1.tbsCertificate.extensions?.find((ext) => ext.extnID === oid);
  return found && AsnConvert.parse(found.extnValue, type);
}

function requireCodeSigning(signer: ChainCertificate): void {
  const usage = extension(signer, id_ce_keyUsage, KeyUsage);
  if (!usage || !(usage.toNumber() & KeyUsageFlags.digitalSignature)) {
    throw new UsageError(
      `the signer certificate ${signer.name} lacks keyUsage digitalSignature, so iPXE refuses its signatures: issue it with keyUsage=critical,digitalSignature`,
    );
  }
  const extended = extension(signer, id_ce_extKeyUsage, ExtendedKeyUsage);
  if (!extended || !extended.includes(id_kp_codeSigning)) {
    throw new UsageError(
      `the signer certificate ${signer.name} lacks extendedKeyUsage codeSigning, so iPXE refuses its signatures: issue it with extendedKeyUsage=codeSigning`,
    );
  }
}

function requireValidAt(cert: ChainCertificate, now: Date): void {
  const { notBefore, notAfter } = cert.asn1.tbsCertificate.validity;
  if (now < notBefore.getTime()) {
    throw new UsageError(
      `the certificate ${cert.name} is not valid until ${notBefore.getTime().toISOString()}: check this machine's clock, or use a certificate valid now`,
    );
  }
  if (now > notAfter.getTime()) {
    throw new UsageError(
      `the certificate ${cert.name} expired on ${notAfter.getTime().toISOString()}: renew it`,
    );
  }
}

function requireIssuedBy(cert: ChainCertificate, issuer: ChainCertificate): void {
  if (!signedBy(cert, issuer)) {
    throw new UsageError(
      `the certificate ${cert.name} is not issued by ${issuer.name}, the next one in the certificate file: order it signer first, then each issuer up to the root`,
    );
  }
  requireCa(issuer);
}

/** Names and signature only: whether `issuer` may issue is requireCa's question. */
function signedBy(cert: ChainCertificate, issuer: ChainCertificate): boolean {
  return cert.x509.issuer === issuer.x509.subject && cert.x509.verify(issuer.x509.publicKey);
}

/** iPXE lets a certificate issue others only with CA:TRUE and, if keyUsage is there, keyCertSign. */
function requireCa(issuer: ChainCertificate): void {
  const usage = extension(issuer, id_ce_keyUsage, KeyUsage);
  const isCa = extension(issuer, id_ce_basicConstraints, BasicConstraints)?.cA === true;
  if (!isCa || (usage && !(usage.toNumber() & KeyUsageFlags.keyCertSign))) {
    throw new UsageError(
      `the certificate ${issuer.name} issues another in the chain but is not a CA (basicConstraints CA:TRUE${
        usage ? " and keyUsage keyCertSign" : ""
      }), so iPXE refuses the chain: issue it as a CA`,
    );
  }
}

function requireSelfSignedRoot(root: ChainCertificate): void {
  if (!signedBy(root, root)) {
    throw new UsageError(
      `the iPXE signing certificate file ends at ${root.name}, which is not a self-signed root: append the root certificate (iPXE finds the root only in the signature)`,
    );
  }
}

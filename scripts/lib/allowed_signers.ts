/**
 * Trust files (`--trust FILE`): allowed_signers lines or bare ssh-ed25519 public keys, read into
 * the keys a signature may come from. It decides nothing about a signature itself (sshsig.ts).
 */
import { type Run, UsageError } from "./run.ts";
import {
  decodeBase64,
  describeKeyType,
  ED25519,
  isKeyType,
  matchesPatternList,
  MAX_SIGNING_TEXT,
  readEd25519Blob,
  readSmallText,
  sshFingerprint,
  type TrustedKey,
  WireReader,
} from "./sshsig.ts";

const ALLOWED_SIGNERS_OPTIONS = "cert-authority, namespaces=, valid-after=, valid-before=";

/**
 * The trust file of `fetch --trust FILE`: allowed_signers, or public key lines. A file others
 * can write gets a warning, as a readable signing key does.
 */
export async function readTrust(
  file: string,
  run: Pick<Run, "log" | "resolve">,
  namespace = "file",
): Promise<TrustedKey[]> {
  const source = `--trust ${file}`;
  const { text, mode } = await readSmallText(run.resolve(file), source);
  if (mode & 0o022) {
    run.log(
      `warning: ${source} can be written by other users (mode ${
        (mode & 0o777).toString(8)
      }), who then choose whose signature counts: chmod go-w ${file}`,
    );
  }
  return parseTrust(text, { namespace, source, note: run.log });
}

/**
 * Reads trusted keys: allowed_signers lines (`principals [options] keytype key [comment]`) or
 * bare `ssh-ed25519 AAAA... [comment]` lines. Keys of other types and cert-authority lines are
 * skipped with a note to `note` (readTrust gives it the run's log; a shared allowed_signers file
 * may hold them for other uses); a line that cannot be read, or a file without an Ed25519 key
 * valid for `namespace`, is refused.
 */
export function parseTrust(
  text: string,
  { namespace = "file", source = "the trust file", note = () => {} }: {
    namespace?: string;
    source?: string;
    note?: (message: string) => void;
  } = {},
): TrustedKey[] {
  if (text.length > MAX_SIGNING_TEXT) {
    throw new UsageError(`${source} is over 64 KiB: give an allowed_signers file or key lines`);
  }
  const trusted: TrustedKey[] = [];
  const lines = text.split("\n");
  for (let index = 0; index < lines.length; index++) {
    const line = lines[index].trim();
    if (line === "" || line.startsWith("#")) continue;
    const origin = `${source}, line ${index + 1}`;
    const key = parseTrustLine(line, origin);
    if (typeof key === "string") note(`${origin}: skipped: ${key}`);
    else trusted.push(key);
  }
  if (!trusted.some((key) => matchesPatternList(namespace, key.namespaces ?? "*"))) {
    throw new UsageError(
      `${source} has no ssh-ed25519 key for namespace "${namespace}": give it the signing ` +
        `key's public line (ssh-ed25519 AAAA... release-boot) or an allowed_signers line for it`,
    );
  }
  return trusted;
}

/** A trusted key, or why the line's key is skipped. */
function parseTrustLine(line: string, origin: string): TrustedKey | string {
  const fields = splitUnquoted(line, " \t", origin);
  const typeAt = fields.slice(0, 3).findIndex(isKeyType);
  if (typeAt < 0 || fields[typeAt + 1] === undefined) {
    throw new UsageError(
      `${origin}: expected "principals [options] ssh-ed25519 AAAA..." or "ssh-ed25519 AAAA..."`,
    );
  }
  const principal = typeAt === 0 ? undefined : unquote(fields[0]);
  const options = typeAt === 2 ? parseSignerOptions(fields[1], origin) : {};
  const [type, encoded, ...comment] = fields.slice(typeAt);
  const bad = (problem: string) =>
    new UsageError(
      `${origin}: the key is damaged (${problem}): copy the line from its .pub file again`,
    );
  const publicBlob = decodeBase64(encoded, () => bad("not base64"));
  const blobType = new WireReader(publicBlob, bad).text();
  if (blobType !== type) throw bad(`it says ${type} but holds ${blobType}`);
  if (options.certAuthority) {
    return "cert-authority: release-boot checks plain ssh-ed25519 keys, not certificates";
  }
  if (type !== ED25519) {
    return `${describeKeyType(type)}: release-boot checks ssh-ed25519 signatures only`;
  }
  const publicKey = readEd25519Blob(publicBlob, bad);
  const fingerprint = sshFingerprint(publicBlob);
  return {
    principal: principal ?? (comment.join(" ") || fingerprint),
    fingerprint,
    publicBlob,
    publicKey,
    namespaces: options.namespaces,
    validAfter: options.validAfter,
    validBefore: options.validBefore,
    origin,
  };
}

interface SignerOptions {
  certAuthority?: boolean;
  namespaces?: string;
  validAfter?: number;
  validBefore?: number;
}

/** allowed_signers options, as ssh-keygen(1) lists them; any other option is refused. */
function parseSignerOptions(field: string, origin: string): SignerOptions {
  const options: SignerOptions = {};
  for (const option of splitUnquoted(field, ",", origin)) {
    const [, name, value] = option.match(/^([A-Za-z-]+)(?:=(.*))?$/s) ?? [];
    const lower = name?.toLowerCase();
    if (lower === "cert-authority" && value === undefined) {
      options.certAuthority = true;
      continue;
    }
    if (value !== undefined && !/^".*"$/s.test(value)) {
      throw new UsageError(`${origin}: write the value of ${name} in double quotes: ${name}="..."`);
    }
    if (value === undefined) {
      throw new UsageError(
        `${origin}: unknown option ${option} (allowed_signers options: ${ALLOWED_SIGNERS_OPTIONS})`,
      );
    }
    const text = unquote(value);
    if (lower === "namespaces") options.namespaces = text;
    else if (lower === "valid-after") options.validAfter = parseSignerTime(text, option, origin);
    else if (lower === "valid-before") options.validBefore = parseSignerTime(text, option, origin);
    else {
      throw new UsageError(
        `${origin}: unknown option ${name} (allowed_signers options: ${ALLOWED_SIGNERS_OPTIONS})`,
      );
    }
  }
  return options;
}

/** ssh-keygen's YYYYMMDD[HHMM[SS]][Z]: local time unless it ends in Z. */
function parseSignerTime(text: string, option: string, origin: string): number {
  const parts = text.match(/^(\d{4})(\d{2})(\d{2})(?:(\d{2})(\d{2})(\d{2})?)?(Z?)$/);
  if (!parts) {
    throw new UsageError(`${origin}: ${option} is not a time: write YYYYMMDD[HHMM[SS]][Z]`);
  }
  const [year, month, day, hour, minute, second] = parts.slice(1, 7).map((n) => Number(n ?? 0));
  const time = parts[7]
    ? Date.UTC(year, month - 1, day, hour, minute, second)
    : new Date(year, month - 1, day, hour, minute, second).getTime();
  const back = new Date(time);
  const fields = parts[7]
    ? [back.getUTCMonth() + 1, back.getUTCDate(), back.getUTCHours(), back.getUTCMinutes()]
    : [back.getMonth() + 1, back.getDate(), back.getHours(), back.getMinutes()];
  if (fields[0] !== month || fields[1] !== day || hour > 23 || minute > 59 || second > 59) {
    throw new UsageError(`${origin}: ${option} is not a date`);
  }
  return time;
}

/** Splits at separators outside double quotes; an unclosed quote is refused. */
function splitUnquoted(text: string, separators: string, origin: string): string[] {
  const fields: string[] = [];
  let field = "";
  let quoted = false;
  for (const char of text) {
    if (char === '"') quoted = !quoted;
    if (!quoted && separators.includes(char)) {
      if (field) fields.push(field);
      field = "";
    } else {
      field += char;
    }
  }
  if (quoted) throw new UsageError(`${origin}: a double quote is not closed`);
  if (field) fields.push(field);
  return fields;
}

function unquote(text: string): string {
  return /^".*"$/s.test(text) ? text.slice(1, -1) : text;
}

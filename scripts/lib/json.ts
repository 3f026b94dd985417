/**
 * JSON from outside (nix, Forgejo, a release's files) read through a valibot schema: a failure
 * is one line naming the source. It must not know what any particular document means.
 */
import * as v from "valibot";
import { formatBytes, ReleaseError } from "./run.ts";

export function safeJson(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch {
    return undefined;
  }
}

export function parseJson<T>(schema: v.GenericSchema<unknown, T>, text: string, source: string): T {
  const data = safeJson(text);
  if (data === undefined) {
    throw new ReleaseError(`${source}: not JSON: ${JSON.stringify(text.slice(0, 120))}`);
  }
  return checked(schema, data, (issue) => `${source}: unexpected JSON (${issue})`);
}

/**
 * A document read back from its bytes: at most `maxBytes`, UTF-8, JSON, and as `schema` says;
 * each refusal says that `source` is therefore not `what` ("a DSSE envelope").
 */
export function parseJsonDocument<T>(
  schema: v.GenericSchema<unknown, T>,
  bytes: Uint8Array,
  source: string,
  what: string,
  maxBytes: number,
): T {
  if (bytes.length > maxBytes) {
    throw new ReleaseError(`${source} is over ${formatBytes(maxBytes)}, so it is not ${what}`);
  }
  let data: unknown;
  try {
    data = safeJson(new TextDecoder("utf-8", { fatal: true }).decode(bytes));
  } catch {
    // Not UTF-8: not JSON either.
  }
  if (data === undefined) throw new ReleaseError(`${source} is not JSON, so it is not ${what}`);
  return checked(schema, data, (issue) => `${source} is not ${what} (${issue})`);
}

/** The first problem valibot found, and where in the document it is. */
export function firstIssue([issue]: [v.BaseIssue<unknown>, ...v.BaseIssue<unknown>[]]): string {
  const at = v.getDotPath(issue);
  return `${issue.message}${at ? ` at ${at}` : ""}`;
}

function checked<T>(
  schema: v.GenericSchema<unknown, T>,
  data: unknown,
  refusal: (issue: string) => string,
): T {
  const result = v.safeParse(schema, data);
  if (!result.success) throw new ReleaseError(refusal(firstIssue(result.issues)));
  return result.output;
}

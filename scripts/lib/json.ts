/**
 * JSON from outside (nix, Forgejo, a release's files) read through a valibot schema: a failure
 * is one line naming the source. It must not know what any particular document means.
 */
import * as v from "valibot";
import { ReleaseError } from "./run.ts";

export function safeJson(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch {
    return undefined;
  }
}

export function parseJson<T>(schema: v.GenericSchema<unknown, T>, text: string, source: string): T {
  let data: unknown;
  try {
    data = JSON.parse(text);
  } catch {
    throw new ReleaseError(
      `${source}: not JSON: ${JSON.stringify(text.slice(0, 120))}`,
    );
  }
  const result = v.safeParse(schema, data);
  if (!result.success) {
    throw new ReleaseError(
      `${source}: unexpected JSON (${v.summarize(result.issues).split("\n")[0]})`,
    );
  }
  return result.output;
}

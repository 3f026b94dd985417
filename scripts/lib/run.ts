/**
 * The run's plumbing: the two error classes (exit 2 and exit 1), where output goes (progress
 * on stderr, results on stdout, secrets redacted) and how child processes get their
 * environment. It knows nothing of releases, Forgejo or nix.
 */
import { $ } from "zx";

/** Bad flags or environment: exit 2, and nothing was done. */
export class UsageError extends Error {}

/** The release could not be made as asked: exit 1, nothing half-done visible. */
export class ReleaseError extends Error {}

export const output = { ci: false, secrets: [] as string[] };

export function configureOutput(env: Env): void {
  output.ci = env.CI === "true" || env.GITHUB_ACTIONS === "true";
}

/** Registers a secret: masked by the CI log, and replaced by *** in everything we print. */
export function mask(secret: string): void {
  // The mask command is the one line that must carry the secret itself.
  if (output.ci) console.error(`::add-mask::${secret}`);
  output.secrets.push(secret);
}

function redact(text: string): string {
  return output.secrets.reduce((out, secret) => out.replaceAll(secret, "***"), text);
}

/** Progress and problems, for people: stderr. */
export function log(message: string): void {
  console.error(redact(message));
}

/** The result a caller may capture (a URL, a directory, a plan): stdout. */
export function result(line: string): void {
  console.log(redact(line));
}

/** Rewrites the current terminal line: upload progress bars. */
export function drawProgress(line: string): void {
  Deno.stderr.writeSync(new TextEncoder().encode(redact(line)));
}

export async function step<T>(title: string, work: () => Promise<T>): Promise<T> {
  log(output.ci ? `::group::${title}` : `==> ${title}`);
  try {
    return await work();
  } finally {
    if (output.ci) log("::endgroup::");
  }
}

export function formatBytes(bytes: number): string {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit++;
  }
  return unit === 0 ? `${bytes} B` : `${value.toFixed(1)} ${units[unit]}`;
}

export type Env = Record<string, string | undefined>;

/** Child processes (nix, git) never see a token or key: zx passes $.env to them. */
export function hideSecretsFromChildren(env: Env): void {
  $.env = Object.fromEntries(
    Object.entries(env).filter(([name]) => !/TOKEN|SECRET|PASSWORD|KEY/i.test(name)),
  );
}

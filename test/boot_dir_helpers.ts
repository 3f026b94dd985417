/**
 * Releases made "by another tool" (files and SHA256SUMS uploaded through the API, no
 * manifest.json), a scratch boot directory beside a place outside it, and the checks of a
 * one-line failure: what the boot-directory tests share.
 */
import assert from "node:assert/strict";
import * as fs from "node:fs/promises";
import * as os from "node:os";
import * as path from "node:path";
import { baseEnv, type Run, runMain } from "./run_helpers.ts";
import { sha256, TOKEN, type World, world } from "./forgejo_world.ts";

const API = "/api/v1/repos/ops/runners";

/** An iPXE script that fetches its kernel and initrd from another host, as other tools write. */
export const SCRIPT = `#!ipxe
kernel https://boot.example.org/files/bzImage init=/nix/store/abc-system/init initrd=initrd \${cmdline}
initrd https://boot.example.org/files/initrd
boot
`;

/** One API call on the repository with the write token; the answer's JSON, if any. */
export async function api(w: World, method: string, route: string, body?: BodyInit, json = true) {
  const answer = await fetch(`${w.forgejo.url}${API}${route}`, {
    method,
    headers: {
      authorization: `token ${TOKEN}`,
      "content-type": json ? "application/json" : "application/octet-stream",
    },
    body,
  });
  const text = await answer.text();
  assert.ok(answer.ok, `${method} ${route}: ${answer.status} ${text}`);
  return text ? JSON.parse(text) : undefined;
}

/** Publishes `files` and their SHA256SUMS under `tag` the way another tool would. */
export async function releaseByHand(
  w: World,
  tag: string,
  files: Record<string, string>,
): Promise<Record<string, string>> {
  const release = await api(
    w,
    "POST",
    "/releases",
    JSON.stringify({ tag_name: tag, target_commitish: w.work.commit, name: tag }),
  );
  const sums = Object.entries(files)
    .map(([name, text]) => `${sha256(new TextEncoder().encode(text))}  ${name}\n`).join("");
  for (const [name, text] of [...Object.entries(files), ["SHA256SUMS", sums]]) {
    const query = new URLSearchParams({ name });
    await api(w, "POST", `/releases/${release.id}/assets?${query}`, text, false);
  }
  return files;
}

/** A netboot release of another tool's making; its bytes carry the tag. */
export function netboot(tag: string): Record<string, string> {
  return {
    "runner.ipxe": SCRIPT,
    bzImage: `kernel of ${tag}\n`,
    initrd: `initrd of ${tag}\n`,
    "notes.txt": "not a boot file\n",
  };
}

/** The uuid of the asset `name` of the release `tag`, for faults on its download. */
export async function assetUuid(w: World, tag: string, name: string): Promise<string> {
  const release = await api(w, "GET", `/releases/tags/${tag}`);
  return release.assets.find((a: { name: string }) => a.name === name).uuid;
}

export function fetchTag(w: World, out: string, tag: string, args: string[] = []): Promise<Run> {
  return w.fetch(out, ["--tag", tag, ...args]);
}

export async function rollback(out: string): Promise<Run> {
  return await runMain(["fetch", "--rollback", "--out", out], { env: baseEnv() });
}

/**
 * A world, a scratch directory holding DIR (`pxe`) and a place outside it. Its fetches run
 * main in this process unless `makeWorld` is `world` (child processes).
 */
export async function scene(
  test: (w: World, out: string, outside: string) => Promise<void>,
  makeWorld: () => Promise<World> = world,
) {
  const w = await makeWorld();
  const scratch = await fs.mkdtemp(path.join(os.tmpdir(), "release-boot-bootdir-"));
  const outside = path.join(scratch, "outside");
  await fs.mkdir(outside);
  try {
    await test(w, path.join(scratch, "pxe"), outside);
  } finally {
    await w.close();
    await fs.rm(scratch, { recursive: true, force: true });
  }
}

export function problemLines(run: Run): string[] {
  return run.stderr.split("\n").filter((line) => line.startsWith("release-boot:"));
}

/** Exit 1, one `release-boot:` line matching `pattern`, and no stack trace. */
export function assertOneLineFailure(run: Run, pattern: RegExp): void {
  assert.equal(run.code, 1, run.stderr);
  const problems = problemLines(run);
  assert.equal(problems.length, 1, run.stderr);
  assert.match(problems[0], pattern);
  assert.doesNotMatch(run.stderr, /\n\s+at /, "no stack trace");
}

/** Every path under `dir` (empty when it does not exist), to show nothing changed there. */
export async function listing(dir: string): Promise<string[]> {
  return (await fs.readdir(dir, { recursive: true }).catch(() => [])).sort();
}

/**
 * A Forgejo emulator, a scratch git checkout and a fixture flake, wired together so a test
 * can run release-boot against them and inspect what the server ended up holding.
 */
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import * as fs from "node:fs/promises";
import * as v from "valibot";
import { type Release, ReleaseSchema } from "../types/forgejo.ts";
import { type Emulator, type EmulatorOptions, startForgejo } from "./forgejo/emulator.ts";
import {
  baseEnv,
  makeFixture,
  makeWorkdir,
  type Run,
  runMain,
  type Runner,
} from "./run_helpers.ts";

export const TOKEN = "test-token";
export const TAG = "boot-v1.0.0";
export const NETBOOT = [
  "netboot-x86_64-linux.built.ipxe",
  "netboot-x86_64-linux.bzImage",
  "netboot-x86_64-linux.initrd",
  "netboot-x86_64-linux.ipxe",
];
export const ALL = [...NETBOOT, "iso-x86_64-linux.iso"];

export interface World {
  forgejo: Emulator;
  work: { dir: string; commit: string };
  fixture: { dir: string; ref: string };
  /** Runs release-boot against the emulator with the fixture flake. */
  publish(
    args?: string[],
    env?: Record<string, string>,
    fixtureRef?: string,
    signal?: AbortSignal,
  ): Promise<Run>;
  /** Runs release-boot fetch against the emulator into `out` (no token unless `env` has one). */
  fetch(out: string, args?: string[], env?: Record<string, string>): Promise<Run>;
  release(): Release;
  close(): Promise<void>;
}

/**
 * `runner`: runMain (in this process, the default: what main decides) or runRelease (a child
 * process, as operators run it: for what only a process shows, a signal, its permissions).
 */
export async function world(
  options: EmulatorOptions = {},
  salt = "one",
  runner: Runner = runMain,
): Promise<World> {
  const forgejo = await startForgejo(options);
  const work = await makeWorkdir();
  const fixture = await makeFixture(salt);
  forgejo.addCommit(work.commit);
  return {
    forgejo,
    work,
    fixture,
    publish: (args = [], env = {}, fixtureRef = fixture.ref, signal) =>
      runner(
        [
          "--server",
          forgejo.url,
          "--repo",
          "ops/runners",
          "--flake",
          fixtureRef,
          ...(args.includes("--tag") ? [] : ["--tag", TAG]),
          ...(args.includes("--timeout") ? [] : ["--timeout", "3"]),
          // The fixture copies are path: flakes, not git checkouts tied to the commit.
          ...(fixtureRef.startsWith("path:") ? ["--allow-dirty"] : []),
          ...args,
        ],
        { cwd: work.dir, env: baseEnv({ FORGEJO_TOKEN: TOKEN, ...env }), signal },
      ),
    fetch: (out, args = [], env = {}) =>
      runner(
        [
          "fetch",
          "--server",
          forgejo.url,
          "--repo",
          "ops/runners",
          "--out",
          out,
          ...(args.includes("--timeout") ? [] : ["--timeout", "3"]),
          ...args,
        ],
        { cwd: work.dir, env: baseEnv(env) },
      ),
    release: () => {
      const releases = forgejo.releases().map((r) => v.parse(ReleaseSchema, r));
      assert.equal(releases.length, 1, "exactly one release");
      return releases[0];
    },
    close: async () => {
      await forgejo.close();
      await fs.rm(work.dir, { recursive: true, force: true });
      await fs.rm(fixture.dir, { recursive: true, force: true });
    },
  };
}

export function names(release: Release): string[] {
  return release.assets.map((a) => a.name).sort();
}

export function writes(forgejo: Emulator) {
  return forgejo.requests.filter((r) => r.host === "forgejo" && r.method !== "GET");
}

export function uploadsOf(forgejo: Emulator, name: string) {
  return forgejo.requests.filter((r) =>
    r.method === "POST" && r.path.endsWith("/assets") && r.query.name === name && r.status === 201
  );
}

export function sha256(bytes: Uint8Array): string {
  return createHash("sha256").update(bytes).digest("hex");
}

/** Reads the release's SHA256SUMS and checks every listed asset's stored bytes against it. */
export async function verifyAgainstSums(
  forgejo: Emulator,
  release: Release,
): Promise<Map<string, string>> {
  const [sumsBytes] = await forgejo.assetBytes(release.id, "SHA256SUMS");
  const sums = new Map(
    new TextDecoder().decode(sumsBytes).trim().split("\n").map((line) => {
      const [sum, name] = line.split("  ");
      return [name, sum] as [string, string];
    }),
  );
  for (const [name, sum] of sums) {
    const copies = await forgejo.assetBytes(release.id, name);
    assert.equal(copies.length, 1, `${name} stored once`);
    assert.equal(sha256(copies[0]), sum, `${name} matches SHA256SUMS`);
  }
  return sums;
}

export function assertNoToken(run: Run, forgejo: Emulator) {
  assert.doesNotMatch(
    run.stdout + run.stderr,
    new RegExp(TOKEN),
    "the token never appears in output",
  );
  for (const request of forgejo.requests.filter((r) => r.host === "storage")) {
    assert.equal(request.headers.authorization, undefined, "no token sent to the storage host");
  }
}

/** Runs `test` in a fresh world and tears the world down afterwards, whatever the outcome. */
export async function withWorld(
  test: (w: World) => Promise<void>,
  options: EmulatorOptions = {},
  runner: Runner = runMain,
): Promise<void> {
  const w = await world(options, "one", runner);
  try {
    await test(w);
  } finally {
    await w.close();
  }
}

/** Uploads `body` as asset `name` straight through the API, as someone other than release-boot. */
export async function uploadBehindItsBack(w: World, name: string, body: string): Promise<void> {
  const release = w.release();
  const answer = await fetch(
    `${w.forgejo.url}/api/v1/repos/ops/runners/releases/${release.id}/assets?name=${name}`,
    {
      method: "POST",
      headers: { authorization: `token ${TOKEN}`, "content-type": "application/octet-stream" },
      body,
    },
  );
  await answer.body?.cancel();
  assert.equal(answer.status, 201);
}

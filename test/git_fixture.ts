/** The fixture flake as a git checkout, published as built from its commit: what verify rebuilds. */
import assert from "node:assert/strict";
import * as fs from "node:fs/promises";
import * as os from "node:os";
import * as path from "node:path";
import type { World } from "./forgejo_world.ts";
import { fixtureDir } from "./run_helpers.ts";

export async function git(dir: string, ...args: string[]): Promise<string> {
  const output = await new Deno.Command("git", {
    args: ["-c", "user.name=t", "-c", "user.email=t@example.org", ...args],
    cwd: dir,
    stdout: "piped",
    stderr: "piped",
  }).output();
  assert.ok(output.success, new TextDecoder().decode(output.stderr));
  return new TextDecoder().decode(output.stdout).trim();
}

/** The fixture flake as a git checkout with one commit: what a release is built from. */
async function gitFixture(salt: string): Promise<{ dir: string; commit: string }> {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), "release-boot-verify-"));
  await fs.copyFile(path.join(fixtureDir, "flake.nix"), path.join(dir, "flake.nix"));
  await fs.writeFile(path.join(dir, "salt.nix"), `${JSON.stringify(salt)}\n`);
  await git(dir, "init", "-q");
  await git(dir, "add", "flake.nix", "salt.nix");
  await git(dir, "commit", "-q", "-m", "release");
  return { dir, commit: await git(dir, "rev-parse", "HEAD") };
}

/**
 * Publishes `targets` of a git checkout of the fixture, recorded as built from its commit;
 * `env` adds to the publish's environment (a signing key).
 */
export async function publishFromGit(
  w: World,
  targets: string,
  salt: string,
  env: Record<string, string> = {},
) {
  const checkout = await gitFixture(salt);
  w.forgejo.addCommit(checkout.commit);
  const published = await w.publish(
    ["--targets", targets, "--commit", checkout.commit],
    env,
    `git+file://${checkout.dir}`,
  );
  assert.equal(published.code, 0, published.stderr);
  return { ...checkout, pinned: `git+file://${checkout.dir}?rev=${checkout.commit}` };
}

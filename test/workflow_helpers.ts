/** Running a workflow step's shell line for real, with a stand-in `nix` that records its call. */
import assert from "node:assert/strict";
import * as fs from "node:fs/promises";
import * as os from "node:os";
import * as path from "node:path";
import { $ } from "zx";

/** What the step handed to nix, and the DENO_DIR it ran with. */
export interface NixCall {
  argv: string[];
  denoDir: string | null;
}

export async function runWithStandInNix(
  run: string | undefined,
  env: Record<string, string> = {},
): Promise<NixCall> {
  assert.ok(run, "the step has a shell line");
  const bin = await fs.mkdtemp(path.join(os.tmpdir(), "release-boot-bin-"));
  try {
    const record = path.join(bin, "record.json");
    await fs.writeFile(
      path.join(bin, "nix"),
      `#!/usr/bin/env python3\nimport json, os, sys\njson.dump({"argv": sys.argv[1:], "denoDir": os.environ.get("DENO_DIR")}, open(${
        JSON.stringify(record)
      }, "w"))\n`,
      { mode: 0o755 },
    );
    await $({ env: { PATH: `${bin}:/usr/bin:/bin`, ...env } })`bash -euc ${run}`.quiet();
    return JSON.parse(await fs.readFile(record, "utf8"));
  } finally {
    await fs.rm(bin, { recursive: true, force: true });
  }
}

/**
 * The part of a step's `nix develop --no-write-lock-file --command deno task --frozen release`
 * line that reaches release-boot: every step runs release-boot that one way.
 */
export function releaseArgs(call: NixCall): string[] {
  assert.deepEqual(call.argv.slice(0, 7), [
    "develop",
    "--no-write-lock-file",
    "--command",
    "deno",
    "task",
    "--frozen",
    "release",
  ]);
  return call.argv.slice(7);
}

/**
 * `.ci/run` itself, run whole in a scratch copy of its directory with `deno`, `nix` and
 * `.ci/install` standing in: what it requires of the tests, and the summary it prints.
 */
import assert from "node:assert/strict";
import * as fs from "node:fs/promises";
import * as os from "node:os";
import * as path from "node:path";
import { repoRoot, runCommand } from "./run_helpers.ts";

/**
 * A `deno` whose `task test` (or `task test:all`) records the variables the tests would see and prints `summary`
 * as deno test's last line, failing when it says FAILED; every other call succeeds.
 */
function denoStandIn(record: string, summary: string): string {
  return `#!/usr/bin/env bash
if [ "$1" = task ] && [ "\${2%%:*}" = test ]; then
  echo "REQUIRE_NIX=\${REQUIRE_NIX:-} REQUIRE_BOOT=\${REQUIRE_BOOT:-}" >"${record}"
  echo "some test ... ok (1ms)"
  echo
  echo "${summary}"
  case "${summary}" in FAILED*) exit 1 ;; esac
fi
exit 0
`;
}

async function runCi(summary: string) {
  const scratch = await fs.mkdtemp(path.join(os.tmpdir(), "release-boot-ci-"));
  try {
    const bin = path.join(scratch, "bin");
    const record = path.join(scratch, "test-env");
    await fs.mkdir(path.join(scratch, "tree", ".ci"), { recursive: true });
    await fs.mkdir(bin);
    const run = path.join(scratch, "tree", ".ci", "run");
    await fs.copyFile(path.join(repoRoot, ".ci", "run"), run);
    const stubs: [string, string][] = [
      [path.join(scratch, "tree", ".ci", "install"), "#!/usr/bin/env bash\nexit 0\n"],
      [path.join(bin, "deno"), denoStandIn(record, summary)],
      [path.join(bin, "nix"), "#!/usr/bin/env bash\necho 'nix (Nix) 2.0'\n"],
    ];
    for (const [file, text] of stubs) await fs.writeFile(file, text, { mode: 0o755 });
    const ci = await runCommand("env", [
      `PATH=${bin}:/usr/bin:/bin`,
      "REQUIRE_NIX=",
      "REQUIRE_BOOT=",
      "bash",
      run,
    ]);
    return { ...ci, testEnv: await fs.readFile(record, "utf8") };
  } finally {
    await fs.rm(scratch, { recursive: true, force: true });
  }
}

Deno.test(".ci/run makes the real-nix and the boot tests fail rather than skip", async () => {
  const ci = await runCi("ok | 3 passed | 0 failed (2s)");
  assert.equal(ci.code, 0, ci.stderr);
  assert.equal(ci.testEnv, "REQUIRE_NIX=1 REQUIRE_BOOT=1\n");
});

Deno.test(".ci/run repeats the summary as a plain line, and the ignored count on its own", async () => {
  const failed = await runCi("FAILED | 3 passed | 1 failed | 2 ignored (5s)");
  assert.equal(failed.code, 1, failed.stderr);
  const lines = failed.stdout.trim().split("\n");
  assert.deepEqual(lines.slice(-2), ["tests: 3 passed, 1 failed", "tests: 2 ignored"]);
  const clean = await runCi("ok | 3 passed | 0 failed | 4 filtered out (2s)");
  assert.equal(clean.code, 0, clean.stderr);
  assert.equal(clean.stdout.trim().split("\n").at(-1), "tests: 3 passed, 0 failed");
  assert.doesNotMatch(clean.stdout, /ignored/, "no ignored line when none was ignored");
});

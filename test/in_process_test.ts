/**
 * release-boot's main run in this process, as most tests run it, or in a program of its own
 * that embeds it: a run takes nothing from the process it happens to be in (its directory) and
 * leaves nothing behind in it (connections, signal listeners), and a signal stops the
 * run, not the program running it.
 */
import assert from "node:assert/strict";
import * as fs from "node:fs/promises";
import { createServer } from "node:http";
import type { AddressInfo } from "node:net";
import * as os from "node:os";
import * as path from "node:path";
import { nixTest } from "./nix_helpers.ts";
import {
  baseEnv,
  fixtureDir,
  makeWorkdir,
  repoRoot,
  runMain,
  stageUnderWay,
  startRelease,
} from "./run_helpers.ts";

/** A program that runs main inside itself, as another program embedding release-boot would. */
const EMBEDDING_HOST = path.join(repoRoot, "test", "embedding_host.ts");

async function inTempDir(test: (dir: string) => Promise<void>): Promise<void> {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), "release-boot-cwd-"));
  try {
    await test(dir);
  } finally {
    await fs.rm(dir, { recursive: true, force: true });
  }
}

Deno.test("relative paths and the default commit come from the run's directory, not the process's", () =>
  inTempDir(async (dir) => {
    // This process runs in the repository, a git checkout; the run's directory is not one.
    const noCommit = await runMain(["--dry-run"], { cwd: dir });
    assert.equal(noCommit.code, 2, noCommit.stderr);
    assert.match(noCommit.stderr, /no commit to release: this is not a git checkout/);

    const rollback = await runMain(["fetch", "--rollback", "--out", "boot"], { cwd: dir });
    assert.equal(rollback.code, 1, rollback.stderr);
    assert.match(rollback.stderr, new RegExp(`there is no ${path.join(dir, "boot")} to roll back`));

    await fs.writeFile(path.join(dir, "key"), "not a key\n", { mode: 0o600 });
    const key = await runMain(
      ["--dry-run", "--commit", "a".repeat(40), "--signing-key", "key"],
      { cwd: dir },
    );
    assert.equal(key.code, 2, key.stderr);
    assert.match(key.stderr, /^release-boot: --signing-key key: /m, "the file is named as given");
    assert.doesNotMatch(key.stderr, /cannot open it/, "and found in the run's directory");

    await fs.writeFile(path.join(dir, "allowed_signers"), "not a key line\n");
    const trust = await runMain(
      [
        ...["fetch", "--server", "http://127.0.0.1:9", "--repo", "ops/runners"],
        ...["--tag", "boot-v1", "--out", "boot", "--trust", "allowed_signers"],
      ],
      { cwd: dir },
    );
    assert.equal(trust.code, 2, trust.stderr);
    assert.match(trust.stderr, /^release-boot: --trust allowed_signers/m);
    assert.doesNotMatch(trust.stderr, /cannot open it/);
  }));

Deno.test("a run closes its connections to the server when it ends", async () => {
  const server = createServer((_request, response) => {
    response.writeHead(404, { "content-type": "application/json" });
    response.end('{"message":"not found"}');
  });
  server.listen(0, "127.0.0.1");
  await new Promise((resolve) => server.once("listening", resolve));
  const url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  const open = () =>
    new Promise<number>((resolve, reject) =>
      server.getConnections((error, count) => error ? reject(error) : resolve(count))
    );
  try {
    const run = await runMain(
      ["--server", url, "--repo", "ops/runners", "--tag", "boot-v1", "--commit", "a".repeat(40)],
      { env: baseEnv({ FORGEJO_TOKEN: "test-token" }) },
    );
    assert.equal(run.code, 1, run.stderr);
    assert.match(run.stderr, /does not look like Forgejo/);
    // An idle keep-alive connection would stay open for seconds; a closed one goes at once.
    const deadline = Date.now() + 1000;
    while (await open() > 0 && Date.now() < deadline) {
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
    assert.equal(await open(), 0, "no connection outlives the run");
  } finally {
    server.closeAllConnections();
    await new Promise((resolve) => server.close(resolve));
  }
});

nixTest(
  "a SIGTERM during a stage ends main with 143, not the program running it, and leaves no listener",
  async () => {
    const work = await makeWorkdir();
    try {
      // A signal to this process would reach every test file running beside it: the stage
      // runs in a program of its own that embeds main, as another tool would.
      const host = startRelease(
        ["--flake", `path:${fixtureDir}`, "--targets", "large", "--out", "staged"],
        { cwd: work.dir, env: baseEnv({ EMBEDDING_HOST_THEN: "SIGTERM" }) },
        EMBEDDING_HOST,
      );
      const output = host.output();
      assert.ok(await stageUnderWay(work.dir, "staged", output), "the stage never started");
      host.kill("SIGTERM");
      const { stdout, stderr, signal } = await output;
      const text = new TextDecoder();
      assert.match(text.decode(stdout), /^main returned 143$/m, text.decode(stderr));
      assert.doesNotMatch(text.decode(stderr), /^release-boot:/m, "a stop says nothing more");
      assert.equal(signal, "SIGTERM", "after main, SIGTERM ends the program: no listener is left");
      assert.doesNotMatch(text.decode(stdout), /survived/);
      const left = (await fs.readdir(work.dir)).filter((name) => name !== ".git");
      assert.deepEqual(left, [], "neither the stage nor its partial copy is left");
    } finally {
      await fs.rm(work.dir, { recursive: true, force: true });
    }
  },
);

/**
 * release-boot's main run in this process, as most tests run it: a run takes nothing from the
 * process it happens to be in (its directory) and leaves nothing behind in it (connections).
 */
import assert from "node:assert/strict";
import * as fs from "node:fs/promises";
import { createServer } from "node:http";
import type { AddressInfo } from "node:net";
import * as os from "node:os";
import * as path from "node:path";
import { baseEnv, runMain } from "./run_helpers.ts";

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

/** The boot tests' machine probes start only when a boot test is declared, never on import. */
import assert from "node:assert/strict";
import * as fs from "node:fs/promises";
import * as os from "node:os";
import * as path from "node:path";
import { pathToFileURL } from "node:url";
import { repoRoot } from "./run_helpers.ts";

/** Programs the probes run, each standing in as a script that records that it ran. */
const PROBED = ["qemu-system-x86_64", "cpio", "gcc", "make", "perl", "xz"];

Deno.test("importing the boot helpers starts no process; declaring a boot test probes the machine", async () => {
  const scratch = await fs.mkdtemp(path.join(os.tmpdir(), "release-boot-probes-"));
  try {
    const log = path.join(scratch, "ran");
    const bin = path.join(scratch, "bin");
    await fs.mkdir(bin);
    for (const program of PROBED) {
      await fs.writeFile(
        path.join(bin, program),
        `#!/bin/sh\necho ${program} >>"${log}"\n`,
        { mode: 0o755 },
      );
    }
    const url = (file: string) => pathToFileURL(path.join(repoRoot, "test", "boot", file)).href;
    // Outside `deno test`, Deno.test declares nothing: only the probes bootTest makes run.
    const script = `
      await import(${JSON.stringify(url("ipxe_build.ts"))});
      await import(${JSON.stringify(url("kit.ts"))});
      const { bootTest } = await import(${JSON.stringify(url("requirements.ts"))});
      await Deno.writeTextFile(${JSON.stringify(log)}, "imported\\n", { append: true });
      bootTest("one", async () => {});
      bootTest("two", async () => {});
    `;
    const output = await new Deno.Command(Deno.execPath(), {
      args: ["eval", "--config", path.join(repoRoot, "deno.json"), script],
      env: { PATH: `${bin}:${Deno.env.get("PATH")}`, NO_COLOR: "1" },
      stdout: "piped",
      stderr: "piped",
    }).output();
    assert.ok(output.success, new TextDecoder().decode(output.stderr));
    const [first, ...probes] = (await fs.readFile(log, "utf8")).trim().split("\n");
    assert.equal(first, "imported", "no probe ran before the imports were done");
    assert.deepEqual(probes.sort(), [...PROBED].sort(), "each probe ran once, for the first test");
  } finally {
    await fs.rm(scratch, { recursive: true, force: true });
  }
});

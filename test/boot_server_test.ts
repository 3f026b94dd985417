/** The boot tests' HTTP server serves its directory and nothing outside it. */
import assert from "node:assert/strict";
import * as fs from "node:fs/promises";
import * as os from "node:os";
import * as path from "node:path";
import { serveDirectory } from "./boot/http_server.ts";

Deno.test("the boot server serves files and in-directory links, and refuses paths that leave the directory", async () => {
  const top = await fs.mkdtemp(path.join(os.tmpdir(), "release-boot-serve-"));
  const root = path.join(top, "srv");
  await fs.mkdir(path.join(root, "boot-v1"), { recursive: true });
  await fs.writeFile(path.join(root, "boot-v1", "netboot.ipxe"), "#!ipxe\n");
  await fs.symlink("boot-v1", path.join(root, "current"));
  await fs.writeFile(path.join(top, "secret"), "not for the guest\n");
  await fs.symlink(path.join(top, "secret"), path.join(root, "escape"));
  const server = await serveDirectory(root);
  const get = async (pathname: string, method = "GET") => {
    const response = await fetch(`http://127.0.0.1:${server.port}${pathname}`, { method });
    return { status: response.status, body: await response.text() };
  };
  try {
    assert.deepEqual(await get("/current/netboot.ipxe"), { status: 200, body: "#!ipxe\n" });
    assert.equal((await get("/escape")).status, 403);
    assert.equal((await get("/boot-v1%2f..%2f..%2fsecret")).status, 403);
    assert.equal((await get("/current/missing")).status, 404);
    assert.equal((await get("/current")).status, 404, "a directory is not a file");
    assert.equal((await get("/current/netboot.ipxe", "DELETE")).status, 405);
    assert.deepEqual(server.requests.slice(0, 2), [
      "GET /current/netboot.ipxe 200",
      "GET /escape 403",
    ]);
  } finally {
    await server.close();
    await fs.rm(top, { recursive: true, force: true });
  }
});

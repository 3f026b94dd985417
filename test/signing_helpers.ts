/** A fresh Ed25519 release key made by ssh-keygen, and an allowed_signers file trusting it. */
import assert from "node:assert/strict";
import * as fs from "node:fs/promises";
import * as os from "node:os";
import * as path from "node:path";
import { runCommand } from "./run_helpers.ts";

export interface Keys {
  dir: string;
  /** The private key file, as `ssh-keygen -t ed25519 -N '' -C release-boot` writes it. */
  key: string;
  keyText: string;
  /** allowed_signers trusting the key as principal "ops" for namespace "file". */
  allowedSigners: string;
}

export async function makeKeys(name = "release-key"): Promise<Keys> {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), "release-boot-keys-"));
  const key = path.join(dir, name);
  const made = await runCommand("ssh-keygen", [
    "-q",
    "-t",
    "ed25519",
    "-N",
    "",
    "-C",
    "release-boot",
    "-f",
    key,
  ]);
  assert.equal(made.code, 0, made.stderr);
  const publicLine = (await fs.readFile(`${key}.pub`, "utf8")).trim();
  const allowedSigners = path.join(dir, "allowed_signers");
  await fs.writeFile(allowedSigners, `ops namespaces="file" ${publicLine}\n`);
  return { dir, key, keyText: await fs.readFile(key, "utf8"), allowedSigners };
}

/** `ssh-keygen -Y sign -n file` of `bytes` with the key: the armored signature's bytes. */
export async function sshSign(keys: Keys, bytes: Uint8Array): Promise<Uint8Array> {
  const file = path.join(keys.dir, `signed-${crypto.randomUUID()}`);
  await fs.writeFile(file, bytes);
  const signed = await runCommand("ssh-keygen", ["-Y", "sign", "-f", keys.key, "-n", "file", file]);
  assert.equal(signed.code, 0, signed.stderr);
  return await fs.readFile(`${file}.sig`);
}

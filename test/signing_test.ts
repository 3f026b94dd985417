/** SHA256SUMS.sig: release-boot's native SSHSIG signing and checking, against real ssh-keygen. */
import assert from "node:assert/strict";
import { Buffer } from "node:buffer";
import * as fs from "node:fs/promises";
import * as os from "node:os";
import * as path from "node:path";
import {
  parseSigningKey,
  readSigningKey,
  SIGNING_KEY_ENV,
  signSums,
  verifySums,
} from "../scripts/lib/sshsig.ts";
import { parseTrust, readTrust } from "../scripts/lib/allowed_signers.ts";
import { ReleaseError, UsageError } from "../scripts/lib/run.ts";
import { type Run, runCommand, startTestRun } from "./run_helpers.ts";

const SUMS = new TextEncoder().encode(
  `${"a".repeat(64)}  bzImage-x86_64-linux\n${"b".repeat(64)}  initrd-x86_64-linux\n`,
);

function sshKeygen(args: string[], stdin?: Uint8Array): Promise<Run> {
  return runCommand("ssh-keygen", args, stdin);
}

/** A temporary directory for one test, removed afterwards. */
async function inTempDir(work: (dir: string) => Promise<void>): Promise<void> {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), "release-boot-signing-"));
  try {
    await work(dir);
  } finally {
    await fs.rm(dir, { recursive: true, force: true });
  }
}

/** `ssh-keygen -t TYPE` into DIR/NAME; returns the private key's path. */
async function makeKey(
  dir: string,
  name: string,
  { type = "ed25519", passphrase = "" } = {},
): Promise<string> {
  const file = path.join(dir, name);
  const made = await sshKeygen([
    "-q",
    "-t",
    type,
    // Refused whatever its size: the smallest RSA key ssh-keygen makes takes milliseconds.
    ...(type === "rsa" ? ["-b", "1024"] : []),
    "-N",
    passphrase,
    "-C",
    "release-boot",
    "-f",
    file,
  ]);
  assert.equal(made.code, 0, made.stderr);
  return file;
}

async function publicLine(keyFile: string): Promise<string> {
  return (await fs.readFile(`${keyFile}.pub`, "utf8")).trim();
}

/** `ssh-keygen -Y sign` of SUMS; returns the armored signature. */
async function sshSign(dir: string, keyFile: string, extra: string[] = []): Promise<string> {
  const sums = path.join(dir, "SHA256SUMS");
  await fs.writeFile(sums, SUMS);
  await fs.rm(`${sums}.sig`, { force: true });
  const signed = await sshKeygen(["-Y", "sign", "-f", keyFile, ...extra, sums]);
  assert.equal(signed.code, 0, signed.stderr);
  return await fs.readFile(`${sums}.sig`, "utf8");
}

async function fingerprintOf(keyFile: string): Promise<string> {
  const listed = await sshKeygen(["-lf", `${keyFile}.pub`]);
  assert.equal(listed.code, 0, listed.stderr);
  return listed.stdout.split(" ")[1];
}

/** Every 16-character run of the key file's base64 body: none may appear in a message. */
async function keyMaterial(keyFile: string): Promise<string[]> {
  const body = (await fs.readFile(keyFile, "utf8")).split("\n")
    .filter((line) => line && !line.startsWith("-----")).join("");
  const runs: string[] = [];
  for (let at = 0; at + 16 <= body.length; at += 8) runs.push(body.slice(at, at + 16));
  return runs;
}

/** The Ed25519 seed inside an unencrypted OpenSSH key file, to prove it is never shown. */
async function seedOf(keyFile: string): Promise<Uint8Array> {
  const text = await fs.readFile(keyFile, "utf8");
  const bytes = Buffer.from(text.replace(/-----[^-]+-----/g, "").replace(/\s+/g, ""), "base64");
  const at = bytes.indexOf(Buffer.from([0, 0, 0, 64]));
  assert.ok(at > 0);
  return bytes.subarray(at + 4, at + 4 + 32);
}

Deno.test("a release-boot signature is what ssh-keygen -Y sign writes and ssh-keygen verifies it", async () => {
  await inTempDir(async (dir) => {
    const keyFile = await makeKey(dir, "key");
    const key = await parseSigningKey(await fs.readFile(keyFile, "utf8"));
    const armored = await signSums(key, SUMS);

    const sig = path.join(dir, "release-boot.sig");
    await fs.writeFile(sig, armored);
    const signers = path.join(dir, "allowed_signers");
    await fs.writeFile(signers, `ops ${await publicLine(keyFile)}\n`);
    const verified = await sshKeygen(
      ["-Y", "verify", "-f", signers, "-I", "ops", "-n", "file", "-s", sig],
      SUMS,
    );
    assert.equal(verified.code, 0, verified.stderr);
    assert.match(verified.stdout + verified.stderr, /Good "file" signature for ops/);
    assert.equal(armored, await sshSign(dir, keyFile, ["-n", "file"]));
  });
});

Deno.test("ssh-keygen -Y verify refuses a release-boot signature over other bytes", async () => {
  await inTempDir(async (dir) => {
    const keyFile = await makeKey(dir, "key");
    const key = await parseSigningKey(await fs.readFile(keyFile, "utf8"));
    const sig = path.join(dir, "SHA256SUMS.sig");
    await fs.writeFile(sig, await signSums(key, SUMS));
    const signers = path.join(dir, "allowed_signers");
    await fs.writeFile(signers, `ops ${await publicLine(keyFile)}\n`);
    const tampered = new TextEncoder().encode(new TextDecoder().decode(SUMS).replace("a", "c"));
    const verified = await sshKeygen(
      ["-Y", "verify", "-f", signers, "-I", "ops", "-n", "file", "-s", sig],
      tampered,
    );
    assert.notEqual(verified.code, 0);
  });
});

Deno.test("an ssh-keygen signature is accepted and names its principal and fingerprint", async () => {
  await inTempDir(async (dir) => {
    const keyFile = await makeKey(dir, "key");
    const armored = await sshSign(dir, keyFile, ["-n", "file"]);
    const trusted = parseTrust(`ops ${await publicLine(keyFile)}\n`);
    assert.deepEqual(await verifySums(trusted, SUMS, armored), {
      principal: "ops",
      fingerprint: await fingerprintOf(keyFile),
    });
  });
});

Deno.test("an ssh-keygen signature hashed with sha256 is accepted, as OpenSSH does", async () => {
  await inTempDir(async (dir) => {
    const keyFile = await makeKey(dir, "key");
    const armored = await sshSign(dir, keyFile, ["-n", "file", "-O", "hashalg=sha256"]);
    const trusted = parseTrust(`ops ${await publicLine(keyFile)}\n`);
    assert.equal((await verifySums(trusted, SUMS, armored)).principal, "ops");
  });
});

Deno.test("a changed SHA256SUMS does not match its signature", async () => {
  await inTempDir(async (dir) => {
    const keyFile = await makeKey(dir, "key");
    const armored = await sshSign(dir, keyFile, ["-n", "file"]);
    const trusted = parseTrust(`ops ${await publicLine(keyFile)}\n`);
    const tampered = SUMS.slice();
    tampered[3] ^= 1;
    await assert.rejects(
      verifySums(trusted, tampered, armored),
      (error: Error) =>
        error instanceof ReleaseError &&
        error.message.startsWith("SHA256SUMS.sig does not match SHA256SUMS: ") &&
        !error.message.includes("\n"),
    );
  });
});

Deno.test("a signature made for namespace git is refused for file", async () => {
  await inTempDir(async (dir) => {
    const keyFile = await makeKey(dir, "key");
    const armored = await sshSign(dir, keyFile, ["-n", "git"]);
    const trusted = parseTrust(`ops ${await publicLine(keyFile)}\n`);
    await assert.rejects(
      verifySums(trusted, SUMS, armored),
      (error: Error) =>
        error instanceof ReleaseError &&
        /signed for namespace "git", not "file"/.test(error.message),
    );
  });
});

Deno.test("a signature by a key the trust file does not list is refused with its fingerprint", async () => {
  await inTempDir(async (dir) => {
    const trustedKey = await makeKey(dir, "trusted");
    const strangerKey = await makeKey(dir, "stranger");
    const armored = await sshSign(dir, strangerKey, ["-n", "file"]);
    const trusted = parseTrust(`ops ${await publicLine(trustedKey)}\n`);
    const stranger = await fingerprintOf(strangerKey);
    await assert.rejects(
      verifySums(trusted, SUMS, armored),
      (error: Error) =>
        error instanceof ReleaseError && error.message.includes(stranger) &&
        /does not list/.test(error.message),
    );
  });
});

Deno.test("during a key rotation, signatures by either listed key verify", async () => {
  await inTempDir(async (dir) => {
    const oldKey = await makeKey(dir, "old");
    const newKey = await makeKey(dir, "new");
    const trusted = parseTrust(
      [
        "# release signing keys",
        `ops-2025 ${await publicLine(oldKey)}`,
        "",
        `ops-2026 namespaces="file" ${await publicLine(newKey)}`,
      ].join("\n"),
    );
    const byOld = await verifySums(trusted, SUMS, await sshSign(dir, oldKey, ["-n", "file"]));
    const byNew = await verifySums(trusted, SUMS, await sshSign(dir, newKey, ["-n", "file"]));
    assert.deepEqual(byOld, { principal: "ops-2025", fingerprint: await fingerprintOf(oldKey) });
    assert.deepEqual(byNew, { principal: "ops-2026", fingerprint: await fingerprintOf(newKey) });
  });
});

Deno.test("a bare public key line (the .pub file) is trust, named by its comment", async () => {
  await inTempDir(async (dir) => {
    const keyFile = await makeKey(dir, "key");
    const armored = await sshSign(dir, keyFile, ["-n", "file"]);
    const trusted = await readTrust(`${keyFile}.pub`, startTestRun());
    assert.deepEqual(await verifySums(trusted, SUMS, armored), {
      principal: "release-boot",
      fingerprint: await fingerprintOf(keyFile),
    });
  });
});

Deno.test('a key restricted to namespaces="git" is not trusted for file', async () => {
  await inTempDir(async (dir) => {
    const gitKey = await makeKey(dir, "git");
    const fileKey = await makeKey(dir, "file");
    const restricted = `dev namespaces="git,ssh-*" ${await publicLine(gitKey)}`;
    const trusted = parseTrust(`${restricted}\nops ${await publicLine(fileKey)}\n`);
    await assert.rejects(
      verifySums(trusted, SUMS, await sshSign(dir, gitKey, ["-n", "file"])),
      (error: Error) =>
        error instanceof ReleaseError && error.message.includes(`namespaces "git,ssh-*"`) &&
        error.message.includes("line 1"),
    );
    assert.throws(
      () => parseTrust(`${restricted}\n`),
      (error: Error) =>
        error instanceof UsageError &&
        /no ssh-ed25519 key for namespace "file"/.test(error.message),
    );
  });
});

Deno.test("a key whose valid-before has passed is no longer trusted", async () => {
  await inTempDir(async (dir) => {
    const keyFile = await makeKey(dir, "key");
    const trusted = parseTrust(`ops valid-before="20200101Z" ${await publicLine(keyFile)}\n`);
    await assert.rejects(
      verifySums(trusted, SUMS, await sshSign(dir, keyFile, ["-n", "file"])),
      (error: Error) =>
        error instanceof ReleaseError &&
        /trusted it only until 2020-01-01T00:00:00/.test(error.message),
    );
  });
});

Deno.test("trust lines release-boot cannot use are skipped with a note; bad lines are refused", async () => {
  await inTempDir(async (dir) => {
    const ed = await publicLine(await makeKey(dir, "ed"));
    const rsa = await publicLine(await makeKey(dir, "rsa", { type: "rsa" }));
    const notes: string[] = [];
    const trusted = parseTrust(
      `ops ${rsa}\nca cert-authority ${ed}\nops ${ed}\n`,
      { source: "--trust signers", note: (line) => notes.push(line) },
    );
    assert.equal(trusted.length, 1);
    assert.deepEqual(notes.map((note) => note.split(":")[0]), [
      "--trust signers, line 1",
      "--trust signers, line 2",
    ]);
    assert.match(notes[0], /RSA key/);
    assert.match(notes[1], /cert-authority/);

    const refused = [
      [`ops ${ed}\nops ssh-ed25519 AAAA!notbase64\n`, /line 2: the key is damaged/],
      [`ops unknown-option ${ed}\n`, /line 1: unknown option unknown-option/],
      [`ops namespaces=file ${ed}\n`, /line 1: write the value of namespaces in double quotes/],
      [`ops valid-after="yesterday" ${ed}\n`, /line 1: valid-after="yesterday" is not a time/],
      [`just some words\n`, /line 1: expected/],
      [`ops ${rsa}\n`, /no ssh-ed25519 key/],
      [`# nothing here\n\n`, /no ssh-ed25519 key/],
    ] as const;
    for (const [text, message] of refused) {
      assert.throws(
        () => parseTrust(text, { note: () => {} }),
        (error: Error) =>
          error instanceof UsageError && message.test(error.message) &&
          !error.message.includes("\n"),
        text,
      );
    }
  });
});

Deno.test("the signing key's fingerprint is the one ssh-keygen -lf prints", async () => {
  await inTempDir(async (dir) => {
    const keyFile = await makeKey(dir, "key");
    const key = await parseSigningKey(await fs.readFile(keyFile, "utf8"));
    assert.equal(key.fingerprint, await fingerprintOf(keyFile));
    assert.equal(key.publicKeyLine(), await publicLine(keyFile));
  });
});

Deno.test("printing or serialising the signing key never shows its seed", async () => {
  await inTempDir(async (dir) => {
    const keyFile = await makeKey(dir, "key");
    const key = await parseSigningKey(await fs.readFile(keyFile, "utf8"));
    const seed = Buffer.from(await seedOf(keyFile));
    const shown = [String(key), JSON.stringify(key), Deno.inspect(key), Deno.inspect({ key })];
    for (const text of shown) {
      assert.match(text, /SHA256:/);
      for (const form of [seed.toString("hex"), seed.toString("base64"), [...seed].join(",")]) {
        assert.ok(!text.includes(form), text);
      }
      for (const run of await keyMaterial(keyFile)) assert.ok(!text.includes(run), text);
    }
  });
});

Deno.test("keys release-boot cannot sign with are refused in one line that quotes none of them", async () => {
  await inTempDir(async (dir) => {
    const encrypted = await makeKey(dir, "encrypted", { passphrase: "secret" });
    const rsa = await makeKey(dir, "rsa", { type: "rsa" });
    const ecdsa = await makeKey(dir, "ecdsa", { type: "ecdsa" });
    const good = await fs.readFile(await makeKey(dir, "good"), "utf8");
    const cases: [string, string, RegExp][] = [
      [
        encrypted,
        await fs.readFile(encrypted, "utf8"),
        /^the signing key is encrypted: release-boot needs an unencrypted key, make one with ssh-keygen -t ed25519 -N '' -C release-boot$/,
      ],
      [
        rsa,
        await fs.readFile(rsa, "utf8"),
        /^the signing key is an RSA key \(ssh-rsa\): .*ssh-keygen -t ed25519/,
      ],
      [ecdsa, await fs.readFile(ecdsa, "utf8"), /^the signing key is an ECDSA key/],
      [
        rsa,
        "-----BEGIN RSA PRIVATE KEY-----\nMIIEow==\n-----END RSA PRIVATE KEY-----\n",
        /a PEM RSA key/,
      ],
      [rsa, "hunter2 is not a key", /not an OpenSSH private key/],
      [rsa, `${await publicLine(rsa)}\n`, /is a public key: give the private key file/],
      [
        dir + "/good",
        good.replace(/\n(.{10})/, "\n!$1"),
        /damaged \(its body is not base64\)/,
      ],
      [dir + "/good", good.replace(/\n[^-\n]+\n-----END/, "\n-----END"), /damaged/],
    ];
    for (const [keyFile, text, message] of cases) {
      const error = await parseSigningKey(text).then(() => undefined, (error: Error) => error);
      assert.ok(error instanceof UsageError, `${message}: ${error}`);
      assert.match(error.message, message);
      assert.ok(!error.message.includes("\n"), error.message);
      for (const run of await keyMaterial(keyFile)) {
        assert.ok(!error.message.includes(run), error.message);
      }
    }
  });
});

Deno.test("the signing key comes from --signing-key or RELEASE_BOOT_SIGNING_KEY, never both", async () => {
  await inTempDir(async (dir) => {
    const keyFile = await makeKey(dir, "key");
    const text = await fs.readFile(keyFile, "utf8");
    const fingerprint = await fingerprintOf(keyFile);

    assert.equal(await readSigningKey(undefined, {}, startTestRun()), undefined);
    assert.equal(
      await readSigningKey(undefined, { [SIGNING_KEY_ENV]: "" }, startTestRun()),
      undefined,
    );
    assert.equal((await readSigningKey(keyFile, {}, startTestRun()))?.fingerprint, fingerprint);

    const run = startTestRun({ PATH: "/usr/bin", [SIGNING_KEY_ENV]: text });
    const fromEnv = await readSigningKey(undefined, { [SIGNING_KEY_ENV]: text }, run);
    assert.equal(fromEnv?.fingerprint, fingerprint);
    assert.equal(
      (await run.$`env`).stdout.includes(SIGNING_KEY_ENV),
      false,
      "child processes must not inherit the key",
    );

    await assert.rejects(
      readSigningKey(keyFile, { [SIGNING_KEY_ENV]: text }, startTestRun()),
      (error: Error) =>
        error instanceof UsageError && /give the signing key one way/.test(error.message),
    );
    await assert.rejects(
      readSigningKey(undefined, { [SIGNING_KEY_ENV]: "garbage" }, startTestRun()),
      (error: Error) =>
        error instanceof UsageError &&
        error.message.startsWith(`${SIGNING_KEY_ENV}: the signing key is not an OpenSSH`),
    );
    await assert.rejects(
      readSigningKey(path.join(dir, "missing"), {}, startTestRun()),
      (error: Error) =>
        error instanceof UsageError && error.message.includes("missing: cannot open it (ENOENT)"),
    );
    const large = path.join(dir, "large");
    await fs.writeFile(large, "x".repeat(65 * 1024));
    await assert.rejects(
      readSigningKey(large, {}, startTestRun()),
      (error: Error) => error instanceof UsageError && /over 64 KiB/.test(error.message),
    );
    await assert.rejects(
      readSigningKey(dir, {}, startTestRun()),
      (error: Error) => error instanceof UsageError && /not a regular file/.test(error.message),
    );
  });
});

Deno.test("a key file other users can read is used, with a warning to chmod 600 it", async () => {
  await inTempDir(async (dir) => {
    const keyFile = await makeKey(dir, "key");
    await fs.chmod(keyFile, 0o644);
    const warnings: string[] = [];
    const run = {
      log: (message: string) => warnings.push(message),
      maskKeyText: () => {},
      resolve: (file: string) => file,
    };
    assert.equal(
      (await readSigningKey(keyFile, {}, run))?.fingerprint,
      await fingerprintOf(keyFile),
    );
    assert.equal(warnings.length, 1);
    assert.match(warnings[0], /can be read by other users \(mode 644\): chmod 600 /);
  });
});

Deno.test("a damaged or foreign SHA256SUMS.sig is refused in one line", async () => {
  await inTempDir(async (dir) => {
    const keyFile = await makeKey(dir, "key");
    const armored = await sshSign(dir, keyFile, ["-n", "file"]);
    const trusted = parseTrust(`ops ${await publicLine(keyFile)}\n`);
    const lines = armored.trim().split("\n");
    const cases: [string, RegExp][] = [
      ["", /is not an SSH signature/],
      ["<html>Not found</html>", /is not an SSH signature/],
      [[lines[0], lines[1], lines.at(-1)].join("\n"), /is damaged/],
      [[lines[0], "!!!!", lines.at(-1)].join("\n"), /is damaged \(its body is not base64\)/],
      [`${lines[0]}\n${"QUFB\n".repeat(20000)}${lines.at(-1)}`, /over 64 KiB/],
    ];
    for (const [text, message] of cases) {
      await assert.rejects(
        verifySums(trusted, SUMS, text),
        (error: Error) =>
          error instanceof ReleaseError && message.test(error.message) &&
          !error.message.includes("\n"),
        text.slice(0, 40),
      );
    }
  });
});

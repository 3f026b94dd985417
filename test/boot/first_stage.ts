/**
 * The trusted iPXE's build inputs as nix/boot-server.nix gives them to nixpkgs' iPXE, for the
 * boot test's build from source: nix/first-stage.ipxe with its placeholders filled in, and
 * the local configuration files. It reads the repository's files and writes nothing.
 */
import * as fs from "node:fs/promises";
import * as path from "node:path";
import { repoRoot } from "../run_helpers.ts";

const NIX = path.join(repoRoot, "nix");

/** What site.nix sets in `bootServer` and the first stage is filled with. */
export interface FirstStageSettings {
  scriptUrl: string;
  kernelArguments: string;
}

/** bootServer.kernelArguments' default in nix/boot-server.nix. */
export const DEFAULT_KERNEL_ARGUMENTS = "hostname=runner-${mac:hexhyp}";

/**
 * nix/first-stage.ipxe as boot-server.nix fills it: builtins.replaceStrings replaces every
 * placeholder in one pass from left to right, never inside text it has put in.
 */
export async function renderFirstStage(settings: FirstStageSettings): Promise<string> {
  const template = await fs.readFile(path.join(NIX, "first-stage.ipxe"), "utf8");
  return template.replace(
    /@(scriptUrl|kernelArguments)@/g,
    (_, name: keyof FirstStageSettings) => settings[name],
  );
}

/** The files boot-server.nix's postPatch copies into iPXE's src/config/local/, by name. */
export async function ipxeLocalConfig(): Promise<Record<string, string>> {
  const dir = path.join(NIX, "ipxe-local");
  const config: Record<string, string> = {};
  for (const name of (await fs.readdir(dir)).sort()) {
    config[name] = await fs.readFile(path.join(dir, name), "utf8");
  }
  return config;
}

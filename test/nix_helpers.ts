/** Real-nix tests: loud when skipped, and failing instead when REQUIRE_NIX=1 (as in CI). */
/** Deno.Command.output() throws synchronously when the program is missing, so try/catch. */
async function nixRuns(): Promise<boolean> {
  try {
    const command = new Deno.Command("nix", {
      args: ["--version"],
      stdout: "null",
      stderr: "null",
    });
    return (await command.output()).success;
  } catch {
    return false;
  }
}

export const nixAvailable: boolean = await nixRuns();
const required = Deno.env.get("REQUIRE_NIX") === "1";

/**
 * The tests' own nix calls leave the evaluation cache alone: test files running side by side
 * evaluate the same flakes, and nix 2.8 answers wrongly when another process holds the cache
 * ("attribute ... unexpectedly missing"). release-boot itself repeats such a call.
 */
export const NIX_FLAGS = [
  "--extra-experimental-features",
  "nix-command flakes",
  "--option",
  "substituters",
  "",
  "--option",
  "eval-cache",
  "false",
];

export function nixTest(name: string, fn: () => Promise<void>): void {
  if (!nixAvailable && !required) {
    console.error(
      `\n!!! SKIPPED (nix is not installed): ${name}\n!!! Install nix-bin, or run .ci/run.\n`,
    );
  }
  Deno.test({
    name,
    ignore: !nixAvailable && !required,
    fn: async () => {
      if (!nixAvailable) throw new Error("REQUIRE_NIX=1 but nix is not on PATH: install nix-bin");
      await fn();
    },
  });
}

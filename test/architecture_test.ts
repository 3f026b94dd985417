/** How the modules under scripts/ depend on each other: one way only, read from their imports. */
import assert from "node:assert/strict";
import * as fs from "node:fs/promises";
import * as path from "node:path";
import { repoRoot } from "./run_helpers.ts";

const EXECUTABLE = path.join(repoRoot, "scripts", "release-boot.ts");

/** Every .ts file under `dir`, as absolute paths. */
async function sources(dir: string): Promise<string[]> {
  const found: string[] = [];
  for (const entry of await fs.readdir(dir, { withFileTypes: true })) {
    const full = path.join(dir, entry.name);
    if (entry.isDirectory()) found.push(...await sources(full));
    else if (entry.name.endsWith(".ts")) found.push(full);
  }
  return found.sort();
}

/** The local files a module imports (static, re-exported or dynamic), as absolute paths. */
function localImports(file: string, text: string): string[] {
  const specifiers = [
    ...text.matchAll(/^\s*(?:import|export)\b[^;]*?\bfrom\s*["']([^"']+)["']/gms),
    ...text.matchAll(/^\s*import\s*["']([^"']+)["']/gm),
    ...text.matchAll(/\bimport\(\s*["']([^"']+)["']\s*\)/g),
  ].map((match) => match[1]);
  return specifiers
    .filter((specifier) => specifier.startsWith("."))
    .map((specifier) => path.resolve(path.dirname(file), specifier));
}

/** A cycle in the graph, as the files around it (the first one repeated last), if any. */
function findCycle(graph: Map<string, string[]>): string[] | undefined {
  const done = new Set<string>();
  const stack: string[] = [];
  const visit = (file: string): string[] | undefined => {
    const at = stack.indexOf(file);
    if (at >= 0) return [...stack.slice(at), file];
    if (done.has(file)) return undefined;
    stack.push(file);
    for (const next of graph.get(file) ?? []) {
      const cycle = visit(next);
      if (cycle) return cycle;
    }
    stack.pop();
    done.add(file);
    return undefined;
  };
  for (const file of graph.keys()) {
    const cycle = visit(file);
    if (cycle) return cycle;
  }
  return undefined;
}

async function importGraph(): Promise<Map<string, string[]>> {
  const graph = new Map<string, string[]>();
  for (const dir of ["scripts", "types"]) {
    for (const file of await sources(path.join(repoRoot, dir))) {
      graph.set(file, localImports(file, await fs.readFile(file, "utf8")));
    }
  }
  return graph;
}

const relative = (file: string) => path.relative(repoRoot, file);

Deno.test("no module under scripts/lib or types imports the executable release-boot.ts", async () => {
  const graph = await importGraph();
  assert.ok(graph.size > 10, `only ${graph.size} modules found: is the layout where it was?`);
  const importers = [...graph]
    .filter(([, imports]) => imports.includes(EXECUTABLE))
    .map(([file]) => relative(file));
  assert.deepEqual(importers, []);
  assert.ok(
    (graph.get(EXECUTABLE) ?? []).some((file) => file.includes(`${path.sep}lib${path.sep}`)),
    "release-boot.ts imports its steps from scripts/lib",
  );
});

Deno.test("the modules' imports form no cycle", async () => {
  const cycle = findCycle(await importGraph());
  assert.equal(cycle?.map(relative).join(" -> "), undefined);
});

Deno.test("a cycle of imports, direct or through other modules, is found", () => {
  const graph = new Map([
    ["a", ["b"]],
    ["b", ["c"]],
    ["c", ["a"]],
    ["d", ["a"]],
  ]);
  assert.deepEqual(findCycle(graph), ["a", "b", "c", "a"]);
  assert.deepEqual(findCycle(new Map([["a", ["a"]]])), ["a", "a"]);
  assert.equal(findCycle(new Map([["a", ["b"]], ["b", []], ["c", ["a", "b"]]])), undefined);
  assert.deepEqual(
    localImports(
      "/r/scripts/lib/x.ts",
      'import {\n  a,\n} from "./y.ts";\nexport * from "../z.ts";',
    ),
    ["/r/scripts/lib/y.ts", "/r/scripts/z.ts"],
  );
});

Deno.test("every module under scripts/lib opens with what it owns and what it must not do", async () => {
  for (const file of await sources(path.join(repoRoot, "scripts", "lib"))) {
    const text = await fs.readFile(file, "utf8");
    assert.match(text, /^\/\*\*\n \* \S/, `${relative(file)} opens without its comment`);
  }
});

/** The functions a module declares at its top level, by name. */
function topLevelFunctions(text: string): string[] {
  return [...text.matchAll(/^(?:export )?(?:async )?function\*? ?([A-Za-z0-9_$]+)/gm)]
    .map((match) => match[1]);
}

Deno.test("each function has one home: no two modules declare a function of the same name", async () => {
  const homes = new Map<string, string[]>();
  for (const dir of ["scripts", "types"]) {
    for (const file of await sources(path.join(repoRoot, dir))) {
      for (const name of topLevelFunctions(await fs.readFile(file, "utf8"))) {
        homes.set(name, [...homes.get(name) ?? [], relative(file)]);
      }
    }
  }
  assert.ok(homes.size > 100, `only ${homes.size} functions found: is the layout where it was?`);
  const copies = [...homes].filter(([, files]) => files.length > 1)
    .map(([name, files]) => `${name} in ${files.join(", ")}`);
  assert.deepEqual(copies, []);
  assert.deepEqual(
    topLevelFunctions("export async function a() {}\nfunction* b() {}\n  function inner() {}"),
    ["a", "b"],
  );
});

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

/** The line in docs/ARCHITECTURE.md that opens the layer list, top layer first. */
const LAYERS_LEAD = "Imports go one way, each layer only from the layers below it:";

/**
 * The numbered layer list that follows LAYERS_LEAD, each layer as the names in its backticks:
 * a module's file name (`fetch.ts`) or a directory (`types/`). A wrapped item goes on.
 */
function readLayers(markdown: string): string[][] {
  const start = markdown.indexOf(LAYERS_LEAD);
  if (start < 0) return [];
  const layers: string[] = [];
  for (const line of markdown.slice(start + LAYERS_LEAD.length).split("\n").slice(1)) {
    const item = line.match(/^\d+\.\s+(.*)$/);
    if (item) layers.push(item[1]);
    else if (layers.length > 0 && /^\s+\S/.test(line)) layers[layers.length - 1] += line;
    else if (layers.length > 0 || line.trim() !== "") break;
  }
  return layers.map((layer) => [...layer.matchAll(/`([^`]+)`/g)].map((match) => match[1]));
}

/** Where the layer list puts a module: its layer (1 is the top) and the entry naming it. */
interface Place {
  layer: number;
  entry: string;
}

/**
 * Each module (a repo-relative path) placed by the layer list: a directory entry holds every
 * file under it, a file name entry the one module of that name under scripts/. What the list
 * names twice, names but cannot find, or leaves out is a problem.
 */
function placeModules(
  layers: string[][],
  modules: string[],
): { places: Map<string, Place>; problems: string[] } {
  const places = new Map<string, Place>();
  const problems: string[] = [];
  layers.forEach((entries, index) => {
    for (const entry of entries) {
      const directory = entry.endsWith("/");
      const named = directory
        ? modules.filter((file) => file.startsWith(entry))
        : modules.filter((file) => file.startsWith("scripts/") && path.basename(file) === entry);
      if (named.length === 0) problems.push(`the layer list names ${entry}, which is no module`);
      if (!directory && named.length > 1) {
        problems.push(`${entry} names ${named.length} modules: ${named.join(", ")}`);
      }
      for (const file of directory || named.length === 1 ? named : []) {
        const earlier = places.get(file);
        if (earlier) problems.push(`${file} is in layer ${earlier.layer} and ${index + 1}`);
        else places.set(file, { layer: index + 1, entry });
      }
    }
  });
  for (const file of modules.filter((file) => !places.has(file))) {
    problems.push(`${file} is in no layer`);
  }
  return { places, problems };
}

/**
 * Every import of a module of its own layer or a higher one. Files of one directory entry
 * (`types/`) are one module to the list and may import each other.
 */
function layerViolations(graph: Map<string, string[]>, places: Map<string, Place>): string[] {
  const violations: string[] = [];
  for (const [file, imports] of graph) {
    const from = places.get(file);
    for (const imported of imports) {
      const to = places.get(imported);
      if (!from || !to || (to.entry === from.entry && from.entry.endsWith("/"))) continue;
      if (to.layer <= from.layer) {
        violations.push(`${file} (layer ${from.layer}) imports ${imported} (layer ${to.layer})`);
      }
    }
  }
  return violations;
}

/** The import graph with repo-relative paths, as the layer list names modules. */
async function relativeGraph(): Promise<Map<string, string[]>> {
  return new Map(
    [...await importGraph()].map(([file, imports]) => [relative(file), imports.map(relative)]),
  );
}

async function documentedLayers(): Promise<string[][]> {
  const layers = readLayers(
    await fs.readFile(path.join(repoRoot, "docs", "ARCHITECTURE.md"), "utf8"),
  );
  assert.ok(
    layers.length > 3,
    `docs/ARCHITECTURE.md lists ${layers.length} layers after "${LAYERS_LEAD}"`,
  );
  return layers;
}

Deno.test("every module under scripts/ and types/ is in one layer of docs/ARCHITECTURE.md", async () => {
  const graph = await relativeGraph();
  const { problems } = placeModules(await documentedLayers(), [...graph.keys()]);
  assert.deepEqual(problems, []);
});

Deno.test("each module imports only modules of the layers below its own in docs/ARCHITECTURE.md", async () => {
  const graph = await relativeGraph();
  const { places } = placeModules(await documentedLayers(), [...graph.keys()]);
  assert.deepEqual(layerViolations(graph, places), []);
});

Deno.test("the layer rule refuses an import of the same or a higher layer, and a module left out", () => {
  const layers = readLayers(
    [
      "Some text.",
      LAYERS_LEAD,
      "",
      "1. `top.ts`",
      "2. `a.ts`, `b.ts`,",
      "   `d.ts`",
      "3. `types/`, `gone.ts`",
      "",
      "Imports are read by a test.",
    ].join("\n"),
  );
  assert.deepEqual(layers, [["top.ts"], ["a.ts", "b.ts", "d.ts"], ["types/", "gone.ts"]]);
  const graph = new Map([
    ["scripts/top.ts", ["scripts/lib/a.ts"]],
    ["scripts/lib/a.ts", ["scripts/lib/b.ts", "types/x.ts"]],
    ["scripts/lib/b.ts", ["scripts/top.ts"]],
    ["scripts/lib/c.ts", []],
    ["scripts/lib/d.ts", ["scripts/lib/d.ts"]],
    ["types/x.ts", ["types/y.ts"]],
    ["types/y.ts", ["scripts/lib/a.ts"]],
  ]);
  const { places, problems } = placeModules(layers, [...graph.keys()]);
  assert.deepEqual(problems, [
    "the layer list names gone.ts, which is no module",
    "scripts/lib/c.ts is in no layer",
  ]);
  assert.deepEqual(layerViolations(graph, places), [
    "scripts/lib/a.ts (layer 2) imports scripts/lib/b.ts (layer 2)",
    "scripts/lib/b.ts (layer 2) imports scripts/top.ts (layer 1)",
    "scripts/lib/d.ts (layer 2) imports scripts/lib/d.ts (layer 2)",
    "types/y.ts (layer 3) imports scripts/lib/a.ts (layer 2)",
  ]);
  assert.deepEqual(placeModules([["a.ts"], ["a.ts"]], ["scripts/lib/a.ts"]).problems, [
    "scripts/lib/a.ts is in layer 1 and 2",
  ]);
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

/**
 * The top-level `let` and `var` bindings of `files` (`file: name`), as deno doc's parser reads
 * them, with the number of files it read: a text search would also match code in a string.
 */
async function topLevelVariables(files: string[]): Promise<{ mutable: string[]; read: number }> {
  const output = await new Deno.Command(Deno.execPath(), {
    args: ["doc", "--private", "--json", ...files],
    stdout: "piped",
    stderr: "piped",
  }).output();
  assert.equal(output.code, 0, new TextDecoder().decode(output.stderr));
  const doc = JSON.parse(new TextDecoder().decode(output.stdout)) as {
    nodes: Record<string, { symbols?: DocSymbol[] }>;
  };
  const mutable = Object.entries(doc.nodes).flatMap(([url, node]) =>
    (node.symbols ?? []).flatMap((symbol) =>
      symbol.declarations
        .filter((d) => d.kind === "variable" && d.def.kind !== "const")
        .map(() => `${relative(new URL(url).pathname)}: ${symbol.name}`)
    )
  );
  return { mutable, read: Object.keys(doc.nodes).length };
}

interface DocSymbol {
  name: string;
  declarations: { kind: string; def: { kind?: string } }[];
}

Deno.test("no module under scripts/ or types/ has a top-level let or var: a run's state lives in its context", async () => {
  const files = [
    ...await sources(path.join(repoRoot, "scripts")),
    ...await sources(path.join(repoRoot, "types")),
  ];
  const { mutable, read } = await topLevelVariables(files);
  assert.equal(read, files.length, "deno doc read every module");
  assert.deepEqual(mutable, []);

  const scratch = await Deno.makeTempDir();
  try {
    const planted = path.join(scratch, "counter.ts");
    await fs.writeFile(
      planted,
      "let calls = 0;\nexport var last = '';\nconst code = `\nlet inString = 1;\n`;\n" +
        "export function f() { let inner = 0; return [calls++, last, code, inner]; }\n",
    );
    const found = await topLevelVariables([planted]);
    assert.deepEqual(found.mutable.map((line) => line.replace(/^.*: /, "")).sort(), [
      "calls",
      "last",
    ]);
  } finally {
    await fs.rm(scratch, { recursive: true });
  }
});

Deno.test("release-boot.ts is the one executable: it runs by its shebang, as operators run it", async () => {
  const output = await new Deno.Command(EXECUTABLE, {
    args: ["--help"],
    cwd: repoRoot,
    stdout: "piped",
    stderr: "piped",
  }).output().catch((error) => assert.fail(`${EXECUTABLE} does not run: ${error.message}`));
  assert.equal(output.code, 0, new TextDecoder().decode(output.stderr));
  assert.match(new TextDecoder().decode(output.stdout), /^release-boot: .*\n\nUsage:/);
});

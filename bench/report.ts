/**
 * What the bench reports: each figure with its target and whether it was met, as a markdown
 * table (stdout) and as JSON with every sample; and --smoke's checks that both are complete
 * and sane. This module formats and checks what was measured; it must not measure.
 */
import * as fs from "node:fs/promises";
import * as path from "node:path";
import * as v from "valibot";
import { log } from "./children.ts";

const KiB = 1024;
const MiB = 1024 * KiB;
const GiB = 1024 * MiB;

export interface Figure {
  id: string;
  figure: string;
  unit: string;
  /** Undefined when release-boot could not be measured; `shown` then says why. */
  releaseBoot?: number;
  baseline?: number;
  baselineName?: string;
  /** release-boot ÷ baseline, in the figure's unit. */
  ratio?: number;
  target: string;
  /** Undefined when there is nothing to judge (the figure is not available). */
  met?: boolean;
  /** The table cell for release-boot when one number does not say it all. */
  shown?: string;
  /** What the table cannot say: why a figure is not available. */
  note?: string;
  /** Every measurement behind the figure, by side, in round order. */
  samples: Record<string, number[]>;
}

export function median(values: number[]): number {
  const sorted = [...values].sort((a, b) => a - b);
  const middle = Math.floor(sorted.length / 2);
  return sorted.length % 2 ? sorted[middle] : (sorted[middle - 1] + sorted[middle]) / 2;
}

export function formatSize(bytes: number): string {
  for (const [unit, size] of [["GiB", GiB], ["MiB", MiB], ["KiB", KiB]] as const) {
    if (bytes >= size) return `${+(bytes / size).toFixed(2)} ${unit}`;
  }
  return `${bytes} B`;
}

const NUMBER_FORMATS: Record<string, (value: number) => string> = {
  "MiB/s": (value) => `${value.toFixed(0)} MiB/s`,
  s: (value) => `${value.toFixed(2)} s`,
  bytes: (value) => formatSize(value),
};

function formatValue(value: number, unit: string): string {
  return NUMBER_FORMATS[unit]?.(value) ?? `${+value.toFixed(2)} ${unit}`;
}

const MET = { yes: "yes", no: "**no**", none: "—" };

/** A markdown table, so that bench/README.md can carry it as printed. */
export function renderTable(figures: Figure[]): string {
  const rows = figures.map((f) => [
    f.figure,
    f.shown ?? (f.releaseBoot === undefined ? "—" : formatValue(f.releaseBoot, f.unit)),
    f.baseline === undefined ? "—" : `${f.baselineName} ${formatValue(f.baseline, f.unit)}`,
    f.ratio === undefined ? "—" : `${f.ratio.toFixed(2)}x`,
    f.target,
    f.met === undefined ? MET.none : f.met ? MET.yes : MET.no,
  ]);
  const header = ["figure", "release-boot", "baseline", "ratio", "target", "met?"];
  const widths = header.map((title, column) =>
    Math.max(title.length, ...rows.map((row) => row[column].length))
  );
  const line = (cells: string[]) => `| ${cells.map((c, i) => c.padEnd(widths[i])).join(" | ")} |`;
  return [line(header), line(widths.map((w) => "-".repeat(w))), ...rows.map(line)].join("\n");
}

export async function writeJson(file: string, results: unknown): Promise<void> {
  await fs.mkdir(path.dirname(file), { recursive: true });
  await fs.writeFile(file, `${JSON.stringify(results, null, 2)}\n`);
  log(`Wrote ${file}`);
}

// ---------------------------------------------------------------------------------------------
// --smoke: the output is complete and sane (never the timing targets)
// ---------------------------------------------------------------------------------------------

/** Every figure a run reports, in table order. */
export const FIGURE_IDS = [
  "hash-1-file-vs-sha256sum",
  "hash-1-file-vs-openssl",
  "hash-n-files-vs-sha256sum",
  "hash-n-files-vs-openssl",
  "publish",
  "publish-vs-streaming-curl",
  "publish-vs-upload-floor",
  "upload-concurrency",
  "rerun",
  "rerun-vs-streaming-curl",
  "rerun-uploaded-bytes",
  "rerun-image-reads",
  "fetch",
  "fetch-vs-parallel-curl",
  "peak-rss",
  "nix-builds",
];

/** Figures timed side by side: each side has one sample per round. */
const TIMED_IDS = [
  "publish",
  "publish-vs-streaming-curl",
  "publish-vs-upload-floor",
  "rerun",
  "rerun-vs-streaming-curl",
  "fetch",
  "fetch-vs-parallel-curl",
];

const positive = v.pipe(v.number(), v.finite(), v.minValue(0));

/** Only what --smoke checks is modelled. */
const WrittenResultsSchema = v.object({
  date: v.string(),
  machine: v.object({ cpu: v.string(), cores: v.number(), nix: v.string(), deno: v.string() }),
  settings: v.object({
    rounds: v.number(),
    files: v.number(),
    fileSizeBytes: v.number(),
    forgejo: v.object({ server: v.string(), pid: v.number(), benchPid: v.number() }),
  }),
  figures: v.array(
    v.object({
      id: v.string(),
      figure: v.string(),
      baselineName: v.optional(v.string()),
      releaseBoot: v.optional(positive),
      baseline: v.optional(positive),
      shown: v.optional(v.string()),
      met: v.optional(v.boolean()),
      samples: v.record(v.string(), v.array(positive)),
    }),
  ),
  runs: v.array(v.object({
    side: v.string(),
    kind: v.string(),
    uploadedBytes: positive,
    io: v.object({ rchar: positive, readBytes: positive }),
    imageBytesRead: v.optional(positive),
    nix: v.optional(v.object({ builds: v.number() })),
  })),
});

/**
 * The output's correctness, not its timing: every figure in the JSON and the table, one
 * sample per round for every side of a timed figure, sane counters, reruns that upload
 * nothing, one nix build per publish, an upload floor that uploaded the images exactly.
 */
export async function checkSmoke(table: string, jsonFile: string): Promise<string[]> {
  const parsed = v.safeParse(
    WrittenResultsSchema,
    JSON.parse(await fs.readFile(jsonFile, "utf8")),
  );
  if (!parsed.success) return [`the JSON does not parse: ${v.summarize(parsed.issues)}`];
  const { figures, runs, settings } = parsed.output;
  const problems: string[] = [];
  const rows = table.split("\n");
  for (const id of FIGURE_IDS) {
    const figure = figures.find((f) => f.id === id);
    if (!figure) problems.push(`the JSON has no figure ${id}`);
    else if (
      !rows.some((row) =>
        row.startsWith(`| ${figure.figure} `) && row.includes(figure.baselineName ?? "")
      )
    ) {
      problems.push(`the table has no row ${id}`);
    }
  }
  for (const figure of figures.filter((f) => TIMED_IDS.includes(f.id))) {
    if (!(figure.releaseBoot! > 0 && figure.baseline! > 0)) {
      problems.push(`${figure.id} has no positive time on both sides`);
    }
    for (const [side, samples] of Object.entries(figure.samples)) {
      if (samples.length !== settings.rounds) {
        problems.push(`${figure.id} has ${samples.length} samples of ${side}, not one per round`);
      }
    }
  }
  problems.push(...checkUploadConcurrency(figures.find((f) => f.id === "upload-concurrency")));

  if (settings.forgejo.pid === settings.forgejo.benchPid) {
    problems.push("the Forgejo emulator ran in the bench's own process");
  }
  for (const run of runs.filter((run) => run.io.rchar === 0)) {
    problems.push(`a ${run.side} ${run.kind} run read nothing at all, by its io counters`);
  }
  const reruns = runs.filter((run) => run.kind === "rerun" || run.kind === "cold-rerun");
  if (reruns.length === 0) problems.push("no rerun was recorded");
  for (const run of reruns.filter((run) => run.uploadedBytes !== 0)) {
    problems.push(`a ${run.kind} uploaded ${run.uploadedBytes} bytes`);
  }
  const coldReruns = runs.filter((run) => run.kind === "cold-rerun");
  if (coldReruns.length !== settings.rounds) {
    problems.push(`${coldReruns.length} reruns with the images evicted, not one per round`);
  }
  for (const run of coldReruns.filter((run) => run.imageBytesRead === undefined)) {
    problems.push(`a ${run.kind} has no count of the image bytes it read`);
  }
  // The images, and the JSON of the draft and of the publish: a few hundred bytes.
  const images = settings.files * settings.fileSizeBytes;
  for (const run of runs.filter((run) => run.side === "curl -T, nothing hashed")) {
    if (run.uploadedBytes < images || run.uploadedBytes > images + 4 * KiB) {
      problems.push(
        `the upload floor uploaded ${run.uploadedBytes} bytes, not the ${images} of the images and two small JSON bodies`,
      );
    }
  }
  for (const run of runs.filter((run) => run.nix && run.nix.builds !== 1)) {
    problems.push(`a release-boot ${run.kind} ran nix build ${run.nix!.builds} times`);
  }
  return problems;
}

/** Measured on both settings, or marked "not available"; never half of each. */
function checkUploadConcurrency(figure?: { shown?: string; samples: Record<string, number[]> }) {
  if (!figure) return [];
  const measured = Object.keys(figure.samples).length;
  if (figure.shown?.startsWith("not available")) {
    return measured === 0 ? [] : ["upload-concurrency is not available, yet has samples"];
  }
  return measured === 2 ? [] : ["upload-concurrency was measured on fewer than both settings"];
}

export function reportSmokeChecks(problems: string[]): void {
  if (problems.length === 0) {
    log(
      "Smoke checks passed: every figure in the table and the JSON, one sample per round on every side, sane io counters, reruns uploaded 0 bytes, one nix build per publish",
    );
    return;
  }
  for (const problem of problems) log(`smoke check failed: ${problem}`);
  Deno.exitCode = 1;
}

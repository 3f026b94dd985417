/**
 * Uploads a few at a time (RELEASE_BOOT_UPLOAD_CONCURRENCY): a stalled upload does not hold
 * up the others, every upload is still recorded, and a terminal shows one progress bar per
 * upload under way.
 */
import assert from "node:assert/strict";
import { readUploadRecord } from "../scripts/lib/release_index.ts";
import { INDEX_NAMES } from "../types/manifest.ts";
import { startRun } from "../scripts/lib/run.ts";
import { nixTest } from "./nix_helpers.ts";
import { memoryIo, runMain } from "./run_helpers.ts";
import { names, verifyAgainstSums, withWorld, type World } from "./forgejo_world.ts";

const ISO = "iso-x86_64-linux.iso";

/** Where each upload of `name` arrived among the requests, in order. */
function uploadsOf(w: World, name: string): number[] {
  return w.forgejo.requests.flatMap((request, at) =>
    request.method === "POST" && request.query.name === name ? [at] : []
  );
}

/** Publishes netboot and iso with the ISO's first upload stalled until --timeout. */
async function publishWithStalledIso(w: World, concurrency: string) {
  w.forgejo.addFault({
    method: "POST",
    path: "/assets",
    query: { name: ISO },
    fault: { kind: "hang" },
  });
  const run = await w.publish(["--targets", "iso,netboot", "--timeout", "1"], {
    RELEASE_BOOT_UPLOAD_CONCURRENCY: concurrency,
  });
  assert.equal(run.code, 0, run.stderr);
  const [, retried] = uploadsOf(w, ISO);
  assert.ok(retried !== undefined, "the ISO was sent twice");
  const others = names(w.release())
    .filter((name) => name.startsWith("netboot-"))
    .map((name) => uploadsOf(w, name)[0]);
  return { retried, others };
}

nixTest("two uploads at a time: a stalled one does not hold up the rest", async () => {
  await withWorld(async (w) => {
    const { retried, others } = await publishWithStalledIso(w, "2");
    assert.equal(others.length, 4);
    assert.ok(
      others.every((at) => at < retried),
      "every netboot file was sent while the ISO stalled",
    );
    const release = w.release();
    await verifyAgainstSums(w.forgejo, release);
  });
});

nixTest("uploads finishing together are each recorded in the release body", async () => {
  await withWorld(async (w) => {
    const run = await w.publish(["--targets", "iso,netboot"], {
      RELEASE_BOOT_UPLOAD_CONCURRENCY: "2",
    });
    assert.equal(run.code, 0, run.stderr);
    const release = w.release();
    const record = readUploadRecord(release.body);
    // The index files are written after the uploads, by another step.
    const files = release.assets.filter((asset) => !INDEX_NAMES.has(asset.name));
    assert.deepEqual(Object.keys(record).sort(), files.map((asset) => asset.name).sort());
    for (const copy of files) assert.equal(record[copy.name].id, copy.id, copy.name);
  });
});

nixTest("RELEASE_BOOT_UPLOAD_CONCURRENCY=1 uploads one file at a time", async () => {
  await withWorld(async (w) => {
    const { retried, others } = await publishWithStalledIso(w, "1");
    assert.ok(others.every((at) => at > retried), "nothing was sent beside the stalled ISO");
    await verifyAgainstSums(w.forgejo, w.release());
  });
});

Deno.test("a bad RELEASE_BOOT_UPLOAD_CONCURRENCY is refused in one line before any work", async () => {
  for (const value of ["0", "9", "two", "1.5"]) {
    const run = await runMain(["--dry-run"], {
      env: {
        PATH: Deno.env.get("PATH") ?? "/usr/bin:/bin",
        RELEASE_BOOT_UPLOAD_CONCURRENCY: value,
      },
    });
    assert.equal(run.code, 2, run.stderr);
    assert.equal(run.stderr.trim().split("\n").length, 1, run.stderr);
    assert.match(run.stderr, new RegExp(`bad RELEASE_BOOT_UPLOAD_CONCURRENCY "${value}"`));
  }
});

/** The lines a terminal shows after `text`: \r, \n, cursor up, and clearing to the end. */
function screen(text: string): string[] {
  const lines = [""];
  let row = 0;
  let column = 0;
  for (let at = 0; at < text.length; at++) {
    // deno-lint-ignore no-control-regex
    const escape = text.slice(at).match(/^\x1b\[(\d*)([AJK])/);
    if (escape) {
      if (escape[2] === "A") row = Math.max(0, row - Number(escape[1] || 1));
      else lines[row] = lines[row].slice(0, column);
      if (escape[2] === "J") lines.length = row + 1;
      at += escape[0].length - 1;
    } else if (text[at] === "\r") {
      column = 0;
    } else if (text[at] === "\n") {
      row++;
      column = 0;
      lines[row] ??= "";
    } else {
      lines[row] = lines[row].slice(0, column).padEnd(column) + text[at] +
        lines[row].slice(column + 1);
      column++;
    }
  }
  return lines.at(-1) === "" ? lines.slice(0, -1) : lines;
}

Deno.test("a terminal shows one bar per upload under way, below the log, and keeps finished ones", () => {
  const io = memoryIo();
  const run = startRun({}, io);
  const bar = (name: string, percent: number) =>
    `${name} [${"#".repeat(percent / 4).padEnd(25, ".")}] ${percent}%`;
  run.log("==> Upload");
  run.drawProgress("a.iso", 8);
  run.drawProgress("b.iso", 20);
  assert.deepEqual(screen(io.err), ["==> Upload", bar("a.iso", 8), bar("b.iso", 20)]);
  run.log("b.iso: retrying in 0.5s");
  run.drawProgress("a.iso", 52);
  assert.deepEqual(screen(io.err), [
    "==> Upload",
    "b.iso: retrying in 0.5s",
    bar("a.iso", 52),
    bar("b.iso", 20),
  ]);
  run.drawProgress("a.iso", 100);
  run.drawProgress("b.iso", 60);
  run.drawProgress("c.iso", 4);
  run.drawProgress("b.iso");
  assert.deepEqual(screen(io.err), [
    "==> Upload",
    "b.iso: retrying in 0.5s",
    bar("a.iso", 100),
    bar("c.iso", 4),
  ]);
  run.drawProgress("c.iso", 100);
  run.log("==> Write checksums");
  assert.deepEqual(screen(io.err), [
    "==> Upload",
    "b.iso: retrying in 0.5s",
    bar("a.iso", 100),
    bar("c.iso", 100),
    "==> Write checksums",
  ]);
});

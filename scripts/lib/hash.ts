/**
 * SHA-256 of files (large ones on worker threads, as many at once as there are cores) and of
 * bytes in memory. It reads files and never writes them.
 */

import { createHash } from "node:crypto";
import * as fs from "node:fs/promises";
import { Worker } from "node:worker_threads";
import { inLanes } from "./lanes.ts";

export const READ_SIZE = 1 << 20;

const MAX_HASH_WORKERS = 4;

// Hashing runs in worker threads: node:crypto's update() is synchronous, so files hash in
// parallel only on separate threads. 1 MiB reads hash ~1.5x faster than the 64 KiB default.
const HASH_WORKER = `
const { parentPort, workerData } = require("node:worker_threads");
const { createHash } = require("node:crypto");
const { openSync, readSync, closeSync } = require("node:fs");
const hash = createHash("sha256");
const buffer = Buffer.allocUnsafe(workerData.readSize);
const fd = openSync(workerData.path, "r");
let size = 0;
for (let n; (n = readSync(fd, buffer, 0, buffer.length, null)) > 0; size += n) {
  hash.update(buffer.subarray(0, n));
}
closeSync(fd);
parentPort.postMessage({ sha256: hash.digest("hex"), size });
`;

/**
 * Files up to this size hash on this thread: starting a worker (a new isolate, tens of ms of
 * CPU) costs more than hashing a MiB, and boot scripts, manifests and small images are that.
 */
const INLINE_HASH_MAX = READ_SIZE;

export async function hashFile(file: string): Promise<{ sha256: string; size: number }> {
  if ((await fs.stat(file)).size <= INLINE_HASH_MAX) {
    const bytes = await fs.readFile(file);
    return { sha256: sha256Hex(bytes), size: bytes.length };
  }
  return await new Promise((resolve, reject) => {
    const worker = new Worker(HASH_WORKER, {
      eval: true,
      workerData: { path: file, readSize: READ_SIZE },
    });
    worker.once("message", resolve);
    worker.once("error", reject);
  });
}

/** Hashes every file, as many at once as there are cores. */
export async function hashFiles(files: string[]): Promise<{ sha256: string; size: number }[]> {
  const results = new Array<{ sha256: string; size: number }>(files.length);
  // Each worker costs ~15 MiB of RSS: four keep a large runner under 200 MiB, and hashing
  // four files at once already outruns the disk and the upload.
  const lanes = Math.min(navigator.hardwareConcurrency || 2, MAX_HASH_WORKERS);
  await inLanes([...files.keys()], lanes, async (index) => {
    results[index] = await hashFile(files[index]);
  });
  return results;
}

export function sha256Hex(bytes: Uint8Array): string {
  return createHash("sha256").update(bytes).digest("hex");
}

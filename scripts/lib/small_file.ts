/**
 * Reading a small file whose path someone else chose (a key, a trust file, a stage's
 * SHA256SUMS, a lock, fetch's tag marks): only a regular file, never past a cap, and never a
 * read that blocks (a FIFO) or never ends (a device). It does not interpret what it reads.
 */
import * as fs from "node:fs/promises";
import { constants as fsConstants } from "node:fs";

export type SmallFile =
  /** `nlink`: the names it has; more than one means it can be changed under another name. */
  | { bytes: Uint8Array; mode: number; mtimeMs: number; nlink: number }
  /** `code`: why it could not be opened (ENOENT, EACCES, ...). */
  | { problem: "unreadable"; code: string }
  | { problem: "not a regular file" | "too large" };

const { O_RDONLY, O_NOFOLLOW, O_NONBLOCK } = fsConstants;

/**
 * The bytes of `file`, when it is a regular file of at most `maxBytes`; else why not. Its type
 * and size are checked before it is opened; it is opened without waiting for a writer (a FIFO
 * put there since is then refused, not waited on) and, unless `followLinks`, never through a
 * symbolic link; and no more than `maxBytes` are read, however large it has grown.
 */
export async function readSmallFile(
  file: string,
  maxBytes: number,
  { followLinks }: { followLinks: boolean },
): Promise<SmallFile> {
  const unreadable = (error: NodeJS.ErrnoException): SmallFile =>
    error.code === "ELOOP"
      ? { problem: "not a regular file" }
      : { problem: "unreadable", code: error.code ?? error.message };
  let stat;
  try {
    stat = followLinks ? await fs.stat(file) : await fs.lstat(file);
  } catch (error) {
    return unreadable(error as NodeJS.ErrnoException);
  }
  if (!stat.isFile()) return { problem: "not a regular file" };
  if (stat.size > maxBytes) return { problem: "too large" };
  let handle: fs.FileHandle;
  try {
    handle = await fs.open(file, O_RDONLY | O_NONBLOCK | (followLinks ? 0 : O_NOFOLLOW));
  } catch (error) {
    return unreadable(error as NodeJS.ErrnoException);
  }
  try {
    const opened = await handle.stat();
    if (!opened.isFile()) return { problem: "not a regular file" };
    const buffer = new Uint8Array(maxBytes + 1);
    let length = 0;
    for (;;) {
      const { bytesRead } = await handle.read(buffer, length, buffer.length - length, length);
      length += bytesRead;
      if (bytesRead === 0 || length === buffer.length) break;
    }
    if (length > maxBytes) {
      buffer.fill(0);
      return { problem: "too large" };
    }
    const { mode, mtimeMs, nlink } = opened;
    return { bytes: buffer.subarray(0, length), mode, mtimeMs, nlink };
  } finally {
    await handle.close();
  }
}

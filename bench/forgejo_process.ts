/**
 * The bench's Forgejo: the emulator (test/forgejo/emulator.ts) started as a process of its
 * own by bench/forgejo_server.ts, and the bench's handle on it. Both sides of every figure
 * talk to it over loopback HTTP, as to a real server; the bench asks it, over its stdin and
 * stdout, what it received and stored. This module owns that protocol; it must not serve.
 */
import { Buffer } from "node:buffer";
import * as path from "node:path";
import * as v from "valibot";
import { BenchError, readLines } from "./children.ts";

const REPO_ROOT = path.resolve(import.meta.dirname!, "..");
const SERVER = path.join(REPO_ROOT, "bench", "forgejo_server.ts");
const DENO_CONFIG = path.join(REPO_ROOT, "deno.json");
/** How long close() waits for the server to stop on its own before it kills it. */
const STOP_GRACE_MS = 5_000;

/** What the bench asks the server, one JSON line each; it answers one JSON line each, in order. */
export const CommandSchema = v.variant("command", [
  /** How many requests the emulator has recorded so far. */
  v.object({ command: v.literal("count") }),
  /** The recorded requests from that index on, without their headers. */
  v.object({ command: v.literal("requests"), from: v.pipe(v.number(), v.integer()) }),
  /** Every release, as a writer sees it. */
  v.object({ command: v.literal("releases") }),
  /** The stored bytes of each asset of that name in the release, base64. */
  v.object({
    command: v.literal("asset"),
    releaseId: v.pipe(v.number(), v.integer()),
    name: v.string(),
  }),
]);
export type Command = v.InferOutput<typeof CommandSchema>;

/** The server's first line. */
export const ReadySchema = v.object({ url: v.string() });

export const RequestRecordSchema = v.object({
  method: v.string(),
  path: v.string(),
  query: v.record(v.string(), v.string()),
  bodyBytes: v.number(),
  status: v.number(),
  receivedAt: v.number(),
  closedAt: v.optional(v.number()),
});
export type RequestRecord = v.InferOutput<typeof RequestRecordSchema>;

const ErrorReplySchema = v.object({ error: v.string() });
const CountReplySchema = v.object({ count: v.number() });
const RequestsReplySchema = v.object({ requests: v.array(RequestRecordSchema) });
const ReleasesReplySchema = v.object({ releases: v.array(v.unknown()) });
const AssetReplySchema = v.object({ bytes: v.array(v.string()) });

export interface ForgejoOptions {
  /** Where the emulator stores asset bytes. */
  storageDir: string;
  /** The one token, with write access. */
  token: string;
  /** A commit that target_commitish may name. */
  commit: string;
}

/** The emulator in its own process, until close(). */
export class ForgejoProcess {
  private queue: Promise<unknown> = Promise.resolve();

  private constructor(
    private readonly child: Deno.ChildProcess,
    private readonly stdin: WritableStreamDefaultWriter<Uint8Array>,
    private readonly lines: AsyncIterator<string>,
    /** "http://127.0.0.1:PORT" */
    readonly url: string,
  ) {}

  /** The server's process id: not the bench's, and not either side's. */
  get pid(): number {
    return this.child.pid;
  }

  static async start(options: ForgejoOptions): Promise<ForgejoProcess> {
    const child = new Deno.Command(Deno.execPath(), {
      args: [
        ...["run", "--config", DENO_CONFIG, "--allow-net=127.0.0.1"],
        `--allow-read=${options.storageDir}`,
        `--allow-write=${options.storageDir}`,
        SERVER,
        ...["--storage", options.storageDir, "--token", options.token],
        ...["--commit", options.commit],
      ],
      env: { NO_COLOR: "1" },
      stdin: "piped",
      stdout: "piped",
      stderr: "inherit",
    }).spawn();
    const lines = readLines(child.stdout);
    const first = await lines.next();
    const ready = v.safeParse(ReadySchema, first.done ? undefined : parseJson(first.value));
    if (!ready.success) {
      child.kill();
      await child.status;
      throw new BenchError(
        `the Forgejo emulator did not start (its first line was ${
          JSON.stringify(first.value ?? "")
        }); run bench/forgejo_server.ts by hand to see why`,
      );
    }
    return new ForgejoProcess(child, child.stdin.getWriter(), lines, ready.output.url);
  }

  async requestCount(): Promise<number> {
    return (await this.ask({ command: "count" }, CountReplySchema)).count;
  }

  async requestsFrom(from: number): Promise<RequestRecord[]> {
    return (await this.ask({ command: "requests", from }, RequestsReplySchema)).requests;
  }

  async releases(): Promise<unknown[]> {
    return (await this.ask({ command: "releases" }, ReleasesReplySchema)).releases;
  }

  async assetBytes(releaseId: number, name: string): Promise<Uint8Array[]> {
    const reply = await this.ask({ command: "asset", releaseId, name }, AssetReplySchema);
    return reply.bytes.map((base64) => new Uint8Array(Buffer.from(base64, "base64")));
  }

  /** Closing its stdin stops the server; one that does not stop in time is killed. */
  async close(): Promise<void> {
    await this.queue.catch(() => {});
    await this.stdin.close().catch(() => {});
    const timer = setTimeout(() => this.child.kill("SIGKILL"), STOP_GRACE_MS);
    try {
      await this.child.status;
    } finally {
      clearTimeout(timer);
    }
  }

  /** One command and its answer; commands go one at a time, so answers cannot cross. */
  private ask<T>(command: Command, schema: v.GenericSchema<unknown, T>): Promise<T> {
    const answer = this.queue.then(async () => {
      await this.stdin.write(new TextEncoder().encode(`${JSON.stringify(command)}\n`));
      const line = await this.lines.next();
      if (line.done) {
        throw new BenchError(`the Forgejo emulator exited during "${command.command}"`);
      }
      const reply = parseJson(line.value);
      const failed = v.safeParse(ErrorReplySchema, reply);
      if (failed.success) {
        throw new BenchError(
          `the Forgejo emulator failed "${command.command}": ${failed.output.error}`,
        );
      }
      return v.parse(schema, reply);
    });
    this.queue = answer.catch(() => {});
    return answer;
  }
}

/** A line that is not JSON parses as undefined, which no schema accepts. */
export function parseJson(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch {
    return undefined;
  }
}

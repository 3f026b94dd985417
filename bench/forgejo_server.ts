#!/usr/bin/env -S deno run --allow-net=127.0.0.1 --allow-read --allow-write
/**
 * The bench's Forgejo as a process of its own: starts the emulator (test/forgejo/emulator.ts)
 * on loopback, prints {"url"} as its first line, then answers the bench's commands (see
 * CommandSchema in bench/forgejo_process.ts), one JSON line in and one out, until its stdin
 * closes. It serves and reports; it must not measure anything itself.
 *
 *   deno run --allow-net=127.0.0.1 --allow-read=DIR --allow-write=DIR bench/forgejo_server.ts \
 *     --storage DIR --token T --commit SHA
 */
import { Buffer } from "node:buffer";
import { parseArgs } from "node:util";
import * as v from "valibot";
import { type Emulator, startForgejo } from "../test/forgejo/emulator.ts";
import { readLines } from "./children.ts";
import { type Command, CommandSchema, parseJson, type RequestRecord } from "./forgejo_process.ts";

async function main(args: string[]): Promise<void> {
  const { values } = parseArgs({
    args,
    options: {
      storage: { type: "string" },
      token: { type: "string" },
      commit: { type: "string" },
    },
    strict: true,
    allowPositionals: false,
  });
  if (!values.storage || !values.token || !values.commit) {
    throw new Error("--storage DIR, --token T and --commit SHA are all needed");
  }
  const emulator = await startForgejo({
    storageDir: values.storage,
    tokens: { [values.token]: "write" },
  });
  emulator.addCommit(values.commit);
  const out = Deno.stdout.writable.getWriter();
  const say = (value: unknown) => out.write(new TextEncoder().encode(`${JSON.stringify(value)}\n`));
  await say({ url: emulator.url });
  for await (const line of readLines(Deno.stdin.readable)) {
    const command = v.safeParse(CommandSchema, parseJson(line));
    if (!command.success) {
      await say({ error: `not a command: ${v.summarize(command.issues)}` });
      continue;
    }
    await say(
      await answer(emulator, command.output).catch((error) => ({
        error: error instanceof Error ? error.message : String(error),
      })),
    );
  }
  await emulator.close();
}

async function answer(emulator: Emulator, command: Command): Promise<unknown> {
  switch (command.command) {
    case "count":
      return { count: emulator.requests.length };
    case "requests":
      return { requests: emulator.requests.slice(command.from).map(withoutHeaders) };
    case "releases":
      return { releases: emulator.releases() };
    case "asset": {
      const stored = await emulator.assetBytes(command.releaseId, command.name);
      return { bytes: stored.map((bytes) => Buffer.from(bytes).toString("base64")) };
    }
  }
}

/** The bench reads what was sent and when; the headers (the token among them) stay here. */
function withoutHeaders(record: Emulator["requests"][number]): RequestRecord {
  const { method, path, query, bodyBytes, status, receivedAt, closedAt } = record;
  return { method, path, query, bodyBytes, status, receivedAt, closedAt };
}

try {
  await main(Deno.args);
} catch (error) {
  console.error(`forgejo server: ${error instanceof Error ? error.message : error}`);
  Deno.exit(2);
}

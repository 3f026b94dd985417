/**
 * A static HTTP server on 127.0.0.1 for one directory, as a boot server's nginx would serve
 * it: GET and HEAD of regular files, links followed only while they stay inside the directory.
 */
import { createReadStream } from "node:fs";
import * as fs from "node:fs/promises";
import * as http from "node:http";
import type { AddressInfo } from "node:net";
import * as path from "node:path";

export interface StaticServer {
  port: number;
  /** Every request as `GET /path 200`, in arrival order. */
  requests: string[];
  close(): Promise<void>;
}

export async function serveDirectory(root: string): Promise<StaticServer> {
  const top = await fs.realpath(root);
  const requests: string[] = [];
  const server = http.createServer(async (request, response) => {
    const pathname = new URL(request.url ?? "/", "http://boot.invalid").pathname;
    const status = await answer(top, request.method ?? "", pathname, response);
    requests.push(`${request.method} ${pathname} ${status}`);
  });
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  return {
    port: (server.address() as AddressInfo).port,
    requests,
    close: () =>
      new Promise((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}

async function answer(
  top: string,
  method: string,
  pathname: string,
  response: http.ServerResponse,
): Promise<number> {
  const refuse = (status: number) => {
    response.writeHead(status).end();
    return status;
  };
  if (method !== "GET" && method !== "HEAD") return refuse(405);
  let file: string;
  try {
    file = await fs.realpath(path.join(top, decodeURIComponent(pathname)));
  } catch {
    return refuse(404);
  }
  if (!file.startsWith(`${top}${path.sep}`)) return refuse(403);
  const stat = await fs.stat(file);
  if (!stat.isFile()) return refuse(404);
  response.writeHead(200, {
    "content-length": stat.size,
    "content-type": "application/octet-stream",
  });
  if (method === "HEAD") {
    response.end();
    return 200;
  }
  createReadStream(file).pipe(response);
  return 200;
}

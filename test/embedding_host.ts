/**
 * A program that runs release-boot's main inside itself, as another program embedding it
 * would, with this program's flags and environment. Once main returns it prints
 * `main returned N` on stdout and ends when nothing is left in its event loop, so a test sees
 * how long what main left running keeps it alive. With EMBEDDING_HOST_THEN=SIGTERM it then
 * sends itself that signal, which ends it as it ends any program unless main left a listener.
 */
import { main } from "../scripts/release-boot.ts";
import { processIo } from "../scripts/lib/run.ts";

const code = await main(Deno.args, Deno.env.toObject(), processIo(), Deno.cwd());
console.log(`main returned ${code}`);
const then = Deno.env.get("EMBEDDING_HOST_THEN");
if (then === "SIGTERM") {
  Deno.kill(Deno.pid, then);
  // A listener main left takes the signal instead, and this program lives on to say so.
  await new Promise((resolve) => setTimeout(resolve, 2000));
  console.log(`survived ${then}`);
}

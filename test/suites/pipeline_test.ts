/**
 * The release pipeline: publishing, uploads, main in a process of its own, the pure steps.
 * One worker runs all these files: a worker per file would cost each a V8 isolate and the module
 * graph again (README, "Tests").
 */
import "../publish_test.ts";
import "../upload_lanes_test.ts";
import "../in_process_test.ts";
import "../pure_steps_test.ts";

/**
 * fetch into a boot directory: its layout, hostile contents, the PXE docs, the boot server.
 * One worker runs all these files: a worker per file would cost each a V8 isolate and the module
 * graph again (README, "Tests").
 */
import "../fetch_test.ts";
import "../hostile_bootdir_test.ts";
import "../boot_dir_test.ts";
import "../pxe_docs_test.ts";
import "../fetch_lanes_test.ts";
import "../boot_requirements_test.ts";
import "../boot_server_test.ts";

/**
 * Builds again: reruns, local stages, verify and prune, the real flake.nix.
 * One worker runs all these files: a worker per file would cost each a V8 isolate and the module
 * graph again (README, "Tests").
 */
import "../rerun_reuse_test.ts";
import "../stage_test.ts";
import "../verify_prune_cli_test.ts";
import "../verify_prune_test.ts";
import "../flake_test.ts";

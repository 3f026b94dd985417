/**
 * Publishing that fails or is refused, the workflows around it, and the repository's own rules.
 * One worker runs all these files: a worker per file would cost each a V8 isolate and the module
 * graph again (README, "Tests").
 */
import "../publish_failures_test.ts";
import "../ops_workflows_test.ts";
import "../workflow_test.ts";
import "../ci_run_test.ts";
import "../architecture_test.ts";
import "../test_layout_test.ts";

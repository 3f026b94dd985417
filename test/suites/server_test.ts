/**
 * A Forgejo that lies or misbehaves, and the emulator the other tests trust.
 * One worker runs all these files: a worker per file would cost each a V8 isolate and the module
 * graph again (README, "Tests").
 */
import "../hostile_server_test.ts";
import "../hostile_release_test.ts";
import "../forgejo_emulator_test.ts";
import "../forgejo_contract_test.ts";

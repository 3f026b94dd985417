/**
 * Signatures and provenance: SSHSIG, the in-toto statement, iPXE image signing.
 * One worker runs all these files: a worker per file would cost each a V8 isolate and the module
 * graph again (README, "Tests").
 */
import "../ipxe_release_test.ts";
import "../provenance_release_test.ts";
import "../signed_release_test.ts";
import "../ipxe_bootdir_test.ts";
import "../signing_test.ts";
import "../ipxe_sign_test.ts";
import "../ipxe_scripts_test.ts";
import "../provenance_test.ts";

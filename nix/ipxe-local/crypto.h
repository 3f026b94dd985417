/*
 * The trusted iPXE's local crypto settings, copied into iPXE's src/config/local/ both by
 * nix/boot-server.nix and by the boot test's build from source, so both build the same iPXE.
 *
 * No cross-signed certificates: iPXE's default CROSSCERT makes it download certificates from
 * http://ca.ipxe.org/auto to complete a chain it cannot complete itself. A release's signatures
 * carry their whole chain up to the root TRUST= names, so there is nothing to look up: a
 * signature under another CA is refused at once, and a booting machine never talks to a host
 * outside the boot network.
 */
#undef CROSSCERT
#define CROSSCERT ""

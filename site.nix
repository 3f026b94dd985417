# Your fleet's settings, applied to every image this flake builds. Until both are set, evaluating
# an image fails with an assertion that names what is missing: an image with a placeholder server
# or without a way in is never published. docs/RUNNER_IMAGES.md lists every runnerHost option.
#
# bootServer is for the trusted iPXE (docs/PXE.md, "Verified boot"): with the CA that signs your
# releases for iPXE here, the flake offers packages.x86_64-linux.ipxe-efi and ipxe-undionly,
# which boot only what that CA signed, from scriptUrl. null: releases are not signed for iPXE.
{
  runnerHost.forgejoUrl = "https://forgejo.example.org";
  runnerHost.authorizedKeys = [ ];

  bootServer.trustedCa = null;
  bootServer.scriptUrl = "http://boot.example.org/netboot/current/netboot.ipxe";
}

# Stand-in for nixpkgs' nixos/modules/testing/test-instrumentation.nix, which gives the NixOS
# test driver its backdoor into a VM. The stand-in has no driver, so it adds nothing; it exists
# so that a configuration importing it by path evaluates.
{ }

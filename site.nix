# Your fleet's settings, applied to every image this flake builds. Until both are set, evaluating
# an image fails with an assertion that names what is missing: an image with a placeholder server
# or without a way in is never published. docs/RUNNER_IMAGES.md lists every runnerHost option.
{
  runnerHost.forgejoUrl = "https://forgejo.example.org";
  runnerHost.authorizedKeys = [ ];
}

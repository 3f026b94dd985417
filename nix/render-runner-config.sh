# Renders forgejo-runner's configuration from the host's root-only credential file, at every
# start of forgejo-runner.service (ExecStartPre). The image holds no secret and no identity:
# the credential names both, so one image serves every host.
#
# Usage: forgejo-runner-config CREDENTIAL CONFIG STATE_DIRECTORY
#
# CREDENTIAL has `key=value` lines:
#   url=, uuid=, token=      a runner created in Forgejo's runner settings ("Create new runner");
#                            rendered into the configuration's server.connections
#   url=, registration_token= the legacy way, for servers that only hand out registration
#                            tokens: `forgejo-runner register` once, into STATE_DIRECTORY/.runner
#
# Set before this text by nix/runner.nix: expected_url, labels (comma-separated) and settings
# (the static part of the configuration, YAML).

if [ "$#" -ne 3 ]; then
  echo "usage: forgejo-runner-config CREDENTIAL CONFIG STATE_DIRECTORY" >&2
  exit 2
fi
credential=$1
config=$2
state=$3

fail() {
  echo "forgejo-runner-config: $credential: $1" >&2
  exit 1
}

without_trailing_slashes() {
  trimmed=$1
  while [ "${trimmed%/}" != "$trimmed" ]; do trimmed=${trimmed%/}; done
  printf '%s' "$trimmed"
}

[ -r "$credential" ] || fail "cannot be read"

url=""
uuid=""
token=""
registration_token=""
while IFS= read -r line || [ -n "$line" ]; do
  case $line in
    "" | "#"*) ;;
    url=*) url=${line#url=} ;;
    uuid=*) uuid=${line#uuid=} ;;
    token=*) token=${line#token=} ;;
    registration_token=*) registration_token=${line#registration_token=} ;;
    *) fail "unexpected line \"${line%%=*}=...\": the file holds url=, uuid= and token= lines (or url= and registration_token=)" ;;
  esac
done <"$credential"

[ -n "$url" ] || fail "no url= line"
if [ "$(without_trailing_slashes "$url")" != "$(without_trailing_slashes "$expected_url")" ]; then
  fail "url=$url is not this image's Forgejo, $expected_url: the credential belongs to another server"
fi

if [ -n "$registration_token" ]; then
  [ -z "$uuid$token" ] || fail "has registration_token= and uuid=/token=: keep one way of connecting"
  case $registration_token in
    *[!0-9A-Za-z]*) fail "registration_token= is not a registration token (letters and digits)" ;;
  esac
  mode=register
else
  [ -n "$uuid" ] || fail "no uuid= line: copy the uuid Forgejo showed when the runner was created"
  [ -n "$token" ] || fail "no token= line: copy the token Forgejo showed when the runner was created"
  case $uuid in
    *[!0-9a-f-]*) fail "uuid= is not a UUID (lower-case hex and dashes)" ;;
    ????????-????-????-????-????????????) ;;
    *) fail "uuid= is not a UUID (lower-case hex and dashes)" ;;
  esac
  case $token in
    *[!0-9a-f]*) fail "token= is not 40 hex digits" ;;
  esac
  [ "${#token}" -eq 40 ] || fail "token= is not 40 hex digits"
  mode=connect
fi

# The configuration holds the token: only the runner's own user may read it.
umask 077
{
  echo "# Rendered from $credential by forgejo-runner-config at service start; edits are lost."
  cat "$settings"
  if [ "$mode" = connect ]; then
    echo "server:"
    echo "  connections:"
    echo "    forgejo:"
    printf '      url: "%s"\n' "$expected_url"
    printf '      uuid: "%s"\n' "$uuid"
    printf '      token: "%s"\n' "$token"
  fi
} >"$config.new"
mv "$config.new" "$config"

if [ "$mode" = register ] && [ ! -s "$state/.runner" ]; then
  cd "$state"
  forgejo-runner register --no-interactive --instance "$expected_url" \
    --token "$registration_token" --name "$(uname -n)" --labels "$labels" --config "$config"
fi

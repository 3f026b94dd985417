#!/usr/bin/env bash
# The shell way to fetch a release for booting, as the fetch figures' baseline: download
# SHA256SUMS and each file with curl -O, one after another, then check them with sha256sum -c.
#
#   bench/fetch_baseline.sh [--parallel] SERVER OWNER/NAME TAG DIR NAME...
#
# DIR must exist and be empty; the NAMEs are asset names of the release. --parallel is the
# floor a fetch cannot beat: the same files with one curl --parallel, nothing checked.
set -euo pipefail
parallel=no
if [[ $1 == --parallel ]]; then
  parallel=yes
  shift
fi
server=$1 repo=$2 tag=$3 dir=$4
shift 4
base="$server/$repo/releases/download/$tag"

cd "$dir"
if [[ $parallel == yes ]]; then
  urls=("$base/SHA256SUMS")
  for name in "$@"; do
    urls+=("$base/$name")
  done
  # --parallel-immediate: a new connection per file at once, rather than waiting to multiplex.
  exec curl -sSfL --parallel --parallel-immediate --remote-name-all "${urls[@]}"
fi
curl -sSfLO "$base/SHA256SUMS"
for name in "$@"; do
  curl -sSfLO "$base/$name"
done
sha256sum --quiet -c --ignore-missing SHA256SUMS

#!/usr/bin/env bash
# The shell way to fetch a release for booting, as the fetch figure's baseline: download
# SHA256SUMS and each file with curl -O, one after another, then check them with sha256sum -c.
#
#   bench/fetch_baseline.sh SERVER OWNER/NAME TAG DIR NAME...
#
# DIR must exist and be empty; the NAMEs are asset names of the release.
set -euo pipefail
server=$1 repo=$2 tag=$3 dir=$4
shift 4
base="$server/$repo/releases/download/$tag"

cd "$dir"
curl -sSfLO "$base/SHA256SUMS"
for name in "$@"; do
  curl -sSfLO "$base/$name"
done
sha256sum --quiet -c --ignore-missing SHA256SUMS

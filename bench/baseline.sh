#!/usr/bin/env bash
# The shell way release-boot replaces, as the benchmark's baseline: sha256sum every file,
# create a draft release, upload each file with curl one after another, upload SHA256SUMS,
# then publish the draft.
#
#   FORGEJO_TOKEN=... bench/baseline.sh [--stream|--upload-only] SERVER OWNER/NAME TAG COMMIT DIR
#
# DIR holds the files to publish under their asset names (links to the store files are fine).
# Uploads use curl --data-binary @file, which reads the whole file into memory first (and
# refuses files of 1 GiB or more); --stream uses curl -T file instead, which streams it.
# --upload-only is the floor a publish cannot beat: the draft, curl -T of each file and the
# publish, with nothing hashed and no SHA256SUMS.
set -euo pipefail
export LC_ALL=C # the same name order as release-boot's SHA256SUMS

body=(--data-binary)
hash=yes
case $1 in
--stream) body=(-X POST -T) && shift ;;
--upload-only) body=(-X POST -T) hash=no && shift ;;
esac
server=$1 repo=$2 tag=$3 commit=$4 dir=$5
api="$server/api/v1/repos/$repo"
auth="Authorization: token $FORGEJO_TOKEN"
sums=$(mktemp)
trap 'rm -f "$sums"' EXIT

upload() { # FILE NAME
  local file=$1
  [[ ${body[0]} == --data-binary ]] && file="@$file"
  curl -sSf -o /dev/null -H "$auth" -H 'Content-Type: application/octet-stream' \
    "${body[@]}" "$file" "$api/releases/$id/assets?name=$2"
}

cd "$dir"
files=(*)
if [[ $hash == yes ]]; then
  sha256sum -- "${files[@]}" >"$sums"
fi

release=$(curl -sSf -X POST -H "$auth" -H 'Content-Type: application/json' \
  --data "{\"tag_name\":\"$tag\",\"target_commitish\":\"$commit\",\"name\":\"$tag\",\"draft\":true}" \
  "$api/releases")
# Forgejo's release JSON starts with its id; no jq needed.
id=$(sed -n 's/^{"id":\([0-9][0-9]*\),.*/\1/p' <<<"$release")

for file in "${files[@]}"; do
  upload "$file" "$file"
done
if [[ $hash == yes ]]; then
  upload "$sums" SHA256SUMS
fi

curl -sSf -o /dev/null -X PATCH -H "$auth" -H 'Content-Type: application/json' \
  --data '{"draft":false}' "$api/releases/$id"

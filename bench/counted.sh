#!/usr/bin/env bash
# Runs a program as this shell's child and reports what it read and wrote:
#
#   bench/counted.sh REPORT PROGRAM ARG...
#
# REPORT gets the program's pid as its first line as soon as it starts (the bench watches the
# memory of that pid), then, once it has exited, this shell's /proc/<pid>/io. A reaped child's
# counters are added to its parent's, so those are the program's final counters, with those of
# every child it ran (nix, curl, sha256sum), plus this shell's own few kilobytes.
# The exit status is the program's.
report=$1
shift
(echo "$BASHPID" >"$report" && exec "$@")
code=$?
echo "$(<"/proc/$$/io")" >>"$report"
exit "$code"

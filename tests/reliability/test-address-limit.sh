#!/bin/bash
# lora-svd under an address-space limit (`ulimit -v`): OpenBLAS retried its
# 128 MiB work-buffer allocation for ever when the limit left too little, and
# the run hung, ignoring SIGINT and SIGTERM. Every limit from far too small
# to enough must now end in bounded time: either the run succeeds and writes
# a readable file, or it exits 1 with a message that names the limit and
# what to change, and writes nothing. Never a hang, a signal or an abort.
#
# Also run by .ci/reliability against its valgrind build (no sanitizer:
# ASan reserves terabytes of address space and cannot run under ulimit -v).
#
# SPDX-License-Identifier: LGPL-2.1-or-later
set -eu

: "${LPIPE:?the test environment sets LPIPE}"
case "${LPIPE_SANITIZED:-}" in ?*) echo "skipped: sanitizer build"; exit 77;; esac
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

"$LPIPE" -q launch lora-synth preset=sd15-unet rank=16 format=kohya \
  ! safetensors-sink location="$TMP/in.safetensors"

# run LIMIT_KB THREADS: one reduction under the limit, checked
run () {
  limit=$1 threads=$2
  rm -f "$TMP/out.safetensors"
  set +e
  timeout -s KILL 60 bash -c 'ulimit -v "$1"; shift; exec "$@"' _ "$limit" \
    "$LPIPE" -q --threads "$threads" launch safetensors-source location="$TMP/in.safetensors" \
    ! lora-svd rank=4 ! safetensors-sink location="$TMP/out.safetensors" 2>"$TMP/err"
  got=$?
  set -e
  case $got in
    0)
      "$LPIPE" info "$TMP/out.safetensors" >"$TMP/info" \
        || { echo "FAIL: ulimit -v $limit, $threads threads: exit 0 but the output does not read"; exit 1; }
      echo "ulimit -v $limit, $threads threads: written" ;;
    1)
      if ! grep -q "ulimit -v" "$TMP/err" || ! grep -q "fewer --threads" "$TMP/err"; then
        cat "$TMP/err"; echo "FAIL: ulimit -v $limit: the message does not say what to change"; exit 1
      fi
      test ! -e "$TMP/out.safetensors" \
        || { echo "FAIL: ulimit -v $limit: a failed run left an output"; exit 1; }
      echo "ulimit -v $limit, $threads threads: $(cut -c1-160 "$TMP/err")" ;;
    137)
      echo "FAIL: ulimit -v $limit, $threads threads: still running after 60 s (hang), killed"; exit 1 ;;
    *)
      cat "$TMP/err"; echo "FAIL: ulimit -v $limit, $threads threads: exit $got (signal or abort)"; exit 1 ;;
  esac
}

for limit in $(seq 300000 50000 1000000); do
  run "$limit" 2
done
for limit in 300000 400000 500000; do
  run "$limit" 1
done
# Enough address space: the limit alone does not fail a run.
run 2000000 2
test -e "$TMP/out.safetensors" || { echo "FAIL: 2 GB of address space did not suffice"; exit 1; }

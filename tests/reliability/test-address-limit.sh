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

# A buffer sized by the input that the limit cannot hold: a 256 MiB f16
# tensor (a sparse file, no disk used) cast to f64 needs 1 GiB for its
# output. g_malloc() aborted the run (SIGTRAP, "failed to allocate"); now it
# exits 1 naming the tensor, the size and the limit, and the old output is
# kept as it was.
n=$((128 << 20))
header="{\"model.embed_tokens.weight\":{\"dtype\":\"F16\",\"shape\":[$n],\"data_offsets\":[0,$((2 * n))]}}"
while [ $(( ${#header} % 8 )) -ne 0 ]; do header="$header "; done
len=${#header}
printf "$(printf '\\x%02x\\x%02x\\x%02x\\x%02x\\x00\\x00\\x00\\x00' \
  $((len & 255)) $((len >> 8 & 255)) $((len >> 16 & 255)) $((len >> 24 & 255)))" >"$TMP/big.safetensors"
printf '%s' "$header" >>"$TMP/big.safetensors"
truncate -s $((8 + len + 2 * n)) "$TMP/big.safetensors"
for threads in 1 2; do
  echo "the old output" >"$TMP/out.safetensors"
  set +e
  (cd "$TMP" && timeout -s KILL 60 bash -c 'ulimit -c 0; ulimit -v 700000; exec "$@"' _ \
    "$LPIPE" -q --threads "$threads" launch safetensors-source location="$TMP/big.safetensors" \
    ! cast dtype=f64 ! safetensors-sink location="$TMP/out.safetensors" 2>"$TMP/err")
  got=$?
  set -e
  cat "$TMP/err"
  test "$got" -eq 1 || { echo "FAIL: cast to f64 under ulimit -v 700000, $threads threads: exit $got, not 1"; exit 1; }
  for want in "tensor 'model.embed_tokens.weight'" "could not allocate 1.0" "GiB for the converted data" "ulimit -v" "stage 2 'cast'"; do
    grep -qF "$want" "$TMP/err" || { echo "FAIL: the message does not say $want"; exit 1; }
  done
  if grep -q "GLib\|internal" "$TMP/err"; then echo "FAIL: GLib's abort, not a stage error"; exit 1; fi
  test "$(cat "$TMP/out.safetensors")" = "the old output" \
    || { echo "FAIL: the failed cast changed the old output"; exit 1; }
  test -z "$(ls "$TMP" | grep -v -e '^in.safetensors$' -e '^out.safetensors$' -e '^big.safetensors$' -e '^err$' -e '^info$')" \
    || { ls "$TMP"; echo "FAIL: the failed cast left files (a core, a temporary)"; exit 1; }
done

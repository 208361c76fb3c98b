#!/bin/sh
# What a user sees, through the CLI, where a run used to succeed silently:
# the error text, the exit code, no output written; warnings as
# `lpipe: warning:` lines that -q silences.
#
# SPDX-License-Identifier: LGPL-2.1-or-later
set -eu

: "${LPIPE:?the test environment sets LPIPE}"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# expect CODE NEEDLE COMMAND...: the exit code is CODE and stderr holds NEEDLE
expect () {
  code=$1 needle=$2
  shift 2
  echo "+ lpipe $*"
  set +e
  "$LPIPE" "$@" >"$TMP/out" 2>"$TMP/err"
  got=$?
  set -e
  cat "$TMP/err"
  if [ "$got" != "$code" ]; then echo "FAIL: exit $got, expected $code"; exit 1; fi
  if ! grep -qF -- "$needle" "$TMP/err"; then echo "FAIL: stderr lacks: $needle"; exit 1; fi
}

# no sink: refused before anything runs
expect 1 "launch: the pipeline has no sink, so nothing would be written" \
  launch lora-synth preset=sd15-unet rank=4 ! lora-svd rank=2
expect 1 "the pipeline has no sink" validate /dev/stdin <<'JSON'
{"lpipe": 1, "stages": [{"stage": "lora-synth"}, {"stage": "cast", "dtype": "half"}]}
JSON

# cast to f16 of values past 65504: an error naming the tensor and the count, nothing written
expect 1 "stage 3 'cast': tensor 'unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight': 1243 of 1280 values are too large for F16 and would become inf; cast to bf16" \
  launch lora-synth preset=sd15-unet rank=4 dtype=float32 ! lora-scale factor=1e15 ! cast dtype=half \
  ! safetensors-sink location="$TMP/f16.safetensors"
test ! -e "$TMP/f16.safetensors"

# allowed: written, one warning per tensor, and -q silences them
expect 0 "lpipe: warning: stage 3 'cast': tensor 'unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight': 1243 of 1280 values overflowed to inf in F16" \
  launch lora-synth preset=sd15-unet rank=4 dtype=float32 ! lora-scale factor=1e15 ! cast dtype=fp16 allow-overflow=true \
  ! safetensors-sink location="$TMP/f16.safetensors"
test -s "$TMP/f16.safetensors"
"$LPIPE" -q launch lora-synth preset=sd15-unet rank=4 dtype=float32 ! lora-scale factor=1e15 \
  ! cast dtype=float16 allow-overflow=true ! safetensors-sink location="$TMP/f16q.safetensors" 2>"$TMP/err"
if [ -s "$TMP/err" ]; then echo "FAIL: -q printed:"; cat "$TMP/err"; exit 1; fi

# lora-scale never writes infinity
expect 1 "stage 2 'lora-scale': module unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q, factor 1e+90: tensor" \
  launch lora-synth preset=sd15-unet rank=4 ! lora-scale factor=1e90 ! safetensors-sink location="$TMP/s.safetensors"
test ! -e "$TMP/s.safetensors"

# lora-merge neither
"$LPIPE" -q launch lora-synth preset=sd15-unet rank=2 ! safetensors-sink location="$TMP/a.safetensors"
cat >"$TMP/merge.pipeline" <<JSON
{"lpipe": 1, "stages": [
  {"stage": "safetensors-source", "id": "a", "location": "$TMP/a.safetensors"},
  {"stage": "safetensors-source", "id": "b", "location": "$TMP/a.safetensors"},
  {"stage": "lora-merge", "inputs": ["a", "b"], "weights": ["1", "1e80"]},
  {"stage": "safetensors-sink", "location": "$TMP/m.safetensors"}]}
JSON
expect 1 "stage 3 'lora-merge': module unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q, weight 1e+80 of input 2: tensor" \
  run "$TMP/merge.pipeline"
test ! -e "$TMP/m.safetensors"

echo "nothing silent"

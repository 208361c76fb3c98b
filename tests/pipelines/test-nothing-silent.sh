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
cat >"$TMP/no-sink.pipeline" <<'JSON'
{"lpipe": 1, "stages": [{"stage": "lora-synth"}, {"stage": "cast", "dtype": "half"}]}
JSON
expect 1 "the pipeline has no sink" validate "$TMP/no-sink.pipeline"

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

# a fixed rank at or above the modules' own: told once per stage, how many
# and at which rank they stay; -q silences it; pad=true pads instead
expect 0 "lpipe: warning: stage 2 'lora-svd': 128 of 128 modules have rank 8, at or below rank=16: kept at rank 8 (pad=true pads them to rank 16)" \
  launch lora-synth preset=sd15-unet rank=8 ! lora-svd rank=16 ! safetensors-sink location="$TMP/r16.safetensors"
test "$(grep -c "warning" "$TMP/err")" = 1
"$LPIPE" info "$TMP/r16.safetensors" | grep -q "rank        8 (128)"
"$LPIPE" -q launch lora-synth preset=sd15-unet rank=8 ! lora-svd rank=16 ! safetensors-sink location="$TMP/r16q.safetensors" 2>"$TMP/err"
if [ -s "$TMP/err" ]; then echo "FAIL: -q printed:"; cat "$TMP/err"; exit 1; fi
expect 0 "" launch lora-synth preset=sd15-unet rank=8 ! lora-svd rank=16 pad=true ! safetensors-sink location="$TMP/p16.safetensors"
if grep -q warning "$TMP/err"; then echo "FAIL: pad=true warned"; exit 1; fi
"$LPIPE" info "$TMP/p16.safetensors" | grep -q "rank        16 (128)"
expect 0 "lpipe: warning: stage 2 'lora-project': 128 of 128 modules have rank 8, at or below rank=8: kept at rank 8" \
  launch lora-synth preset=sd15-unet rank=8 ! lora-project rank=8 ! safetensors-sink location="$TMP/p8.safetensors"
expect 0 "(lora-project does not pad; lora-svd rank=12 pad=true does)" \
  launch lora-synth preset=sd15-unet rank=8 ! lora-project rank=12 ! safetensors-sink location="$TMP/p12.safetensors"
# a LyCORIS module whose update has a lower rank (LoHa 3 x 3 = 9) is written
# exactly at it, and said so; pad=true pads it
expect 0 "lpipe: warning: stage 2 'lora-svd': 304 of 304 modules have rank 9, at or below rank=32: kept at rank 9 (pad=true pads them to rank 32)" \
  launch lora-synth preset=flux-dev format=loha rank=3 ! lora-svd rank=32 ! safetensors-sink location="$TMP/l32.safetensors"
"$LPIPE" info "$TMP/l32.safetensors" | grep -q "rank        9 (304)"
"$LPIPE" -q launch lora-synth preset=flux-dev format=loha rank=3 ! lora-svd rank=32 pad=true ! safetensors-sink location="$TMP/l32p.safetensors"
"$LPIPE" info "$TMP/l32p.safetensors" | grep -q "rank        32 (304)"

# options that would have no effect together: refused before anything runs
noeffect () {
  needle=$1
  shift
  expect 1 "$needle" launch lora-synth preset=sd15-unet rank=8 ! "$@" ! safetensors-sink location="$TMP/no.safetensors"
  test ! -e "$TMP/no.safetensors"
}
noeffect "stage 2 'lora-svd': rank=4 fixes every module's rank, so min-rank would have no effect" lora-svd rank=4 min-rank=2
noeffect "stage 2 'lora-svd': rank=4 fixes every module's rank, so max-rank would have no effect" lora-svd rank=4 max-rank=6
noeffect "so min-rank and max-rank would have no effect" lora-svd rank=4 min-rank=1 max-rank=6
noeffect "stage 2 'lora-svd': niter would have no effect: niter, oversample and seed steer method=randomized" lora-svd rank=4 niter=4
noeffect "stage 2 'lora-svd': oversample would have no effect" lora-svd energy=0.9 oversample=4
noeffect "stage 2 'lora-svd': seed would have no effect" lora-svd rank=4 method=exact seed=1
noeffect "stage 2 'rank-check': require-uniform would have no effect: expect-rank=8 already requires" \
  rank-check expect-rank=8 require-uniform=true
expect 1 "factor splits LoKr modules; it has no effect without format=lokr" \
  launch lora-synth format=loha factor=4 ! safetensors-sink location="$TMP/no.safetensors"
# the same, said by lpipe reduce in its own options
"$LPIPE" -q launch lora-synth preset=sd15-unet rank=8 ! safetensors-sink location="$TMP/in.safetensors"
expect 2 "--seed is for --method randomized and the projections" reduce "$TMP/in.safetensors" --rank 4 --seed 3 -o "$TMP/no.safetensors"
test ! -e "$TMP/no.safetensors"
# and still fine where they mean something
expect 0 "" launch lora-synth preset=sd15-unet rank=8 ! lora-svd rank=4 method=randomized seed=1 niter=1 \
  ! rank-check expect-rank=4 ! safetensors-sink location="$TMP/ok.safetensors"
expect 0 "" launch lora-synth preset=sd15-unet rank=8 ! lora-svd energy=0.9 min-rank=2 max-rank=6 pad=true \
  ! rank-check require-uniform=true ! safetensors-sink location="$TMP/ok2.safetensors"

echo "nothing silent"

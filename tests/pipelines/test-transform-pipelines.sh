#!/bin/sh
# Runs every transform pipeline of pipelines/ on LoRAs made by lora-synth and
# checks the results with the numpy oracle (tests/plugins/lora_oracle.py).
#
# SPDX-License-Identifier: LGPL-2.1-or-later
set -eu

: "${LPIPE:?the test environment sets LPIPE}"
: "${LPIPE_SOURCE_ROOT:?the test environment sets LPIPE_SOURCE_ROOT}"
PIPELINES="$LPIPE_SOURCE_ROOT/pipelines"
ORACLE="/usr/bin/python3 $LPIPE_SOURCE_ROOT/tests/plugins/lora_oracle.py"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

run () {
  echo "+ lpipe $*"
  "$LPIPE" -q "$@"
}

# Flux, diffusers -> kohya (fused qkv, linear1) -> diffusers, on two blocks
run launch lora-synth preset=flux-dev format=diffusers rank=2 dtype=f32 \
  ! select include='transformer.*blocks.0.*' ! safetensors-sink location="$TMP/flux.safetensors"
run run "$PIPELINES/convert-diffusers-to-kohya.pipeline" \
  input="$TMP/flux.safetensors" output="$TMP/flux-kohya.safetensors"
run run "$PIPELINES/convert-kohya-to-diffusers.pipeline" \
  input="$TMP/flux-kohya.safetensors" output="$TMP/flux-back.safetensors"
$ORACLE same "$TMP/flux.safetensors" "$TMP/flux-kohya.safetensors"
$ORACLE same "$TMP/flux.safetensors" "$TMP/flux-back.safetensors"
"$LPIPE" info --tensors "$TMP/flux-kohya.safetensors" | grep -q 'lora_unet_single_blocks_0_linear1.lora_down.weight *F32 *\[8, 3072\]'

# SD 1.5, kohya with alpha != rank -> diffusers (alpha folded) -> kohya
run launch lora-synth preset=sd15-unet format=kohya rank=4 alpha=3 dtype=f32 \
  ! safetensors-sink location="$TMP/sd-kohya.safetensors"
run run "$PIPELINES/convert-kohya-to-diffusers.pipeline" preset=sd-kohya-to-diffusers \
  input="$TMP/sd-kohya.safetensors" output="$TMP/sd.safetensors"
run run "$PIPELINES/convert-diffusers-to-kohya.pipeline" preset=sd-diffusers-to-kohya \
  input="$TMP/sd.safetensors" output="$TMP/sd-back.safetensors"
$ORACLE same "$TMP/sd-kohya.safetensors" "$TMP/sd.safetensors"
$ORACLE same "$TMP/sd-kohya.safetensors" "$TMP/sd-back.safetensors"

# Two LoRAs, weighted, the second without cross-attention: exact SVD merge to rank 3
run launch lora-synth preset=sd15-unet format=kohya rank=2 alpha=1 seed=7 dtype=f32 \
  ! select exclude='*attn2*' ! safetensors-sink location="$TMP/sd-kohya-2.safetensors"
run run "$PIPELINES/merge-then-reduce.pipeline" a="$TMP/sd-kohya.safetensors" \
  b="$TMP/sd-kohya-2.safetensors" weight-a=0.7 weight-b=-0.3 rank=3 output="$TMP/merged.safetensors"
$ORACLE svd "$TMP/merged.safetensors" 3 0.7 "$TMP/sd-kohya.safetensors" -0.3 "$TMP/sd-kohya-2.safetensors"

# convert -> select -> reduce -> cast -> check
run run "$PIPELINES/convert-select-reduce.pipeline" input="$TMP/sd-kohya.safetensors" \
  rank=2 output="$TMP/attn.safetensors"
"$LPIPE" info "$TMP/attn.safetensors" | grep -q '^  LoRA  *128 modules'
"$LPIPE" info "$TMP/attn.safetensors" | grep -q '^  rank  *2 (128)$'
"$LPIPE" info "$TMP/attn.safetensors" | grep -q '^  dtypes  *BF16 x256$'
$ORACLE svd "$TMP/attn.safetensors" 2 1 "$TMP/sd-kohya.safetensors"

echo "all transform pipelines pass"

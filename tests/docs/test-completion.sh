#!/bin/bash
# test-completion.sh: docs/completion/lpipe.bash completes from the registry
#
# Sources the completion and calls it the way bash does, with the build
# tree's lpipe as the command being completed.
set -uo pipefail
: "${LPIPE_SOURCE_ROOT:?}" "${LPIPE:?}"

# shellcheck source=../../docs/completion/lpipe.bash
. "$LPIPE_SOURCE_ROOT/docs/completion/lpipe.bash"
complete -p lpipe | grep -- '-F _lpipe' >/dev/null || { echo "FAIL: not registered" >&2; exit 1; }

failures=0
COMP_WORDBREAKS=${COMP_WORDBREAKS:-$' \t\n"'"'"'><=;|&(:'}

# complete LINE: fills COMPREPLY as bash would for the cursor at the end of LINE
complete_line () {
  COMP_LINE=$1
  COMP_POINT=${#COMP_LINE}
  read -r -a COMP_WORDS <<<"$COMP_LINE"
  [[ $COMP_LINE == *' ' ]] && COMP_WORDS+=("")
  COMP_CWORD=$((${#COMP_WORDS[@]} - 1))
  COMPREPLY=()
  _lpipe "$LPIPE" "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]:-}"
}

expect () {  # expect LINE WORD...: each WORD is among the replies
  local line=$1 w
  shift
  complete_line "$line"
  for w in "$@"; do
    if ! printf '%s\n' "${COMPREPLY[@]}" | grep -xF -- "$w" >/dev/null; then
      echo "FAIL: '$line' does not offer '$w' (got: ${COMPREPLY[*]})" >&2
      failures=$((failures + 1))
    fi
  done
}

refuse () {  # refuse LINE WORD...: no WORD is among the replies
  local line=$1 w
  shift
  complete_line "$line"
  for w in "$@"; do
    if printf '%s\n' "${COMPREPLY[@]}" | grep -xF -- "$w" >/dev/null; then
      echo "FAIL: '$line' offers '$w'" >&2
      failures=$((failures + 1))
    fi
  done
}

# every stage the registry lists, after `inspect`
mapfile -t stages < <("$LPIPE" inspect | awk '$2 ~ /^(source|transform|sink|aggregator)$/ { print $1 }')
[ "${#stages[@]}" -gt 3 ] || { echo "FAIL: lpipe inspect lists ${#stages[@]} stages" >&2; exit 1; }
expect "lpipe inspect " "${stages[@]}"
expect "lpipe inspect lora-s" lora-svd lora-synth
refuse "lpipe inspect lora-s" cast

expect "lpipe " reduce run validate launch inspect info
expect "lpipe --" --help --version --quiet --verbose --threads
expect "lpipe reduce --" --rank --sv-fro --max-rank --output-dir --dry-run --force
refuse "lpipe info --" --rank
expect "lpipe info --" --tensors
expect "lpipe reduce a.safetensors --method " exact randomized projection
expect "lpipe run de" demo
expect "lpipe run reduce-" reduce-svd reduce-dynamic
expect "lpipe -j 4 in" inspect info

# property names after a stage in launch, and stage names after '!'
expect "lpipe launch cast " "dtype=" "include=" "exclude=" "!"
expect "lpipe launch safetensors-source location=a.safetensors ! lora-svd r" "rank="
refuse "lpipe launch safetensors-source location=a.safetensors ! lora-svd r" "location="
expect "lpipe launch safetensors-source location=a.safetensors ! " "${stages[@]}"
expect "lpipe launch " lora-synth safetensors-source

# enumerated values after 'key=', without the 'key=' bash keeps
expect "lpipe launch lora-synth ! lora-svd method=" exact randomized
expect "lpipe launch lora-synth ! lora-svd method=r" randomized
expect "lpipe launch lora-synth ! lora-svd pad=" true false

if [ "$failures" -gt 0 ]; then
  echo "$failures failures" >&2
  exit 1
fi
echo "ok: ${#stages[@]} stages complete"

#!/bin/bash
# test-stage-reference.sh: the committed docs/stages.md is what the registry says
#
# Regenerate it with the command in the file's header when this fails.
set -euo pipefail
: "${LPIPE_SOURCE_ROOT:?}" "${LPIPE:?}"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
/usr/bin/python3 "$LPIPE_SOURCE_ROOT/docs/gen-stage-reference.py" "$LPIPE" "$tmp/stages.md"
if ! diff -u "$LPIPE_SOURCE_ROOT/docs/stages.md" "$tmp/stages.md"; then
  echo "FAIL: docs/stages.md is stale. Regenerate it from the source root with:" >&2
  echo "  ninja -C build && LPIPE_PLUGIN_PATH=build/plugins LPIPE_PLUGIN_SYSTEM_PATH= /usr/bin/python3 docs/gen-stage-reference.py build/core/lpipe docs/stages.md" >&2
  exit 1
fi
# and it names every stage the registry lists
for stage in $("$LPIPE" inspect | awk '$2 ~ /^(source|transform|sink|aggregator)$/ { print $1 }'); do
  grep -q "^## $stage\$" "$LPIPE_SOURCE_ROOT/docs/stages.md" || { echo "FAIL: $stage missing" >&2; exit 1; }
done
echo "ok: docs/stages.md is current"

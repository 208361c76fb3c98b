#!/bin/bash
# test-man-page.sh: lpipe.1 renders without warnings and documents every
# command and option `lpipe --help` lists.
#
# Usage: test-man-page.sh MAN-PAGE (the configured docs/lpipe.1)
set -euo pipefail
: "${LPIPE:?}"
man=$1
failures=0

if command -v groff >/dev/null; then
  warnings=$(groff -man -Tutf8 -ww -z "$man" 2>&1)
  [ -z "$warnings" ] || { echo "FAIL: groff warns: $warnings" >&2; failures=$((failures + 1)); }
fi
grep -q '@[A-Z]*@' "$man" && { echo "FAIL: unsubstituted @VAR@ in $man" >&2; failures=$((failures + 1)); }

help=$("$LPIPE" --help)
commands=$(sed -n 's/^  lpipe \([a-z]*\) .*/\1/p' <<<"$help")
options=$(grep -o -- '--[a-z][a-z-]*' <<<"$help" | sort -u)
[ -n "$commands" ] && [ -n "$options" ] || { echo "FAIL: cannot read lpipe --help" >&2; exit 1; }
for c in $commands; do
  grep -q "^\.B[IR]* $c\b" "$man" || { echo "FAIL: command '$c' is not in $man" >&2; failures=$((failures + 1)); }
done
for o in $options; do
  grep -q -- "\\\\-\\\\${o#-}\b" "$man" || { echo "FAIL: option '$o' is not in $man" >&2; failures=$((failures + 1)); }
done
[ "$failures" = 0 ] || exit 1
echo "ok: $(wc -w <<<"$commands") commands, $(wc -w <<<"$options") options documented"

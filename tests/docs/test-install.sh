#!/bin/bash
# test-install.sh: what `meson install` gives a user and a plugin author.
#
# Installs the build tree into a staged folder (--destdir), then, using only
# that stage:
#  - checks the installed files: lpipe, library, headers, lpipe-1.0.pc,
#    GIR and typelib (when built), man page, bash completion;
#  - builds tests/docs/example-plugin against the staged headers with
#    pkg-config alone, once with cc and once with meson;
#  - runs the staged lpipe with both: it must load the installed plugins
#    and the example from LPIPE_PLUGIN_PATH, and the example stage must work.
#
# The staged lpipe has the real prefix compiled in as its plugin directory, so
# LPIPE_PLUGIN_SYSTEM_PATH points it at the staged one instead.
#
# Usage: test-install.sh [MESON]; env from tests/meson.build: LPIPE_BUILD_ROOT,
# LPIPE_SOURCE_ROOT.

set -euo pipefail

fail () { echo "FAIL: $*" >&2; exit 1; }

: "${LPIPE_BUILD_ROOT:?}" "${LPIPE_SOURCE_ROOT:?}"
MESON=${1:-meson}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
stage=$tmp/stage

"$MESON" install -C "$LPIPE_BUILD_ROOT" --destdir "$stage" --no-rebuild --quiet >/dev/null

# lpipe-1.0.pc names its prefix relative to itself (pkgconfig.relocatable),
# which is what lets pkg-config alone resolve the staged paths.
pc=$(find "$stage" -name lpipe-1.0.pc -path '*/pkgconfig/*' | head -n 1)
[ -n "$pc" ] || fail "no lpipe-1.0.pc installed"
grep -q '^prefix=${pcfiledir}' "$pc" ||
  fail "$pc has an absolute prefix; configure with -Dpkgconfig.relocatable=true (the project default)"

# Nothing the test runs may come from the build tree or its environment.
unset LPIPE_PLUGIN_PATH LPIPE_PLUGIN_SYSTEM_PATH GI_TYPELIB_PATH LD_LIBRARY_PATH
export PKG_CONFIG_PATH=$(dirname "$pc")
unset PKG_CONFIG_LIBDIR PKG_CONFIG_SYSROOT_DIR

pcvar () { pkg-config --variable="$1" lpipe-1.0; }
prefix=$(realpath "$(pcvar prefix)")
libdir=$(realpath "$(pcvar libdir)")
includedir=$(realpath "$(pcvar includedir)")
pluginsdir=$(realpath -m "$(pcvar pluginsdir)")
case $prefix in "$stage"/*) ;; *) fail "pkg-config prefix $prefix is not in the stage" ;; esac

# ---- the installed files -------------------------------------------------
for f in "$prefix/bin/lpipe" \
         "$libdir/liblpipe-1.0.so" \
         "$includedir/lpipe-1.0/lpipe/lpipe.h" \
         "$includedir/lpipe-1.0/lpipe/lpipe-plugin.h" \
         "$includedir/lpipe-1.0/lpipe/lp-version.h" \
         "$includedir/lpipe-1.0/lpipe/lp-enum-types.h" \
         "$prefix/share/man/man1/lpipe.1" \
         "$prefix/share/lpipe-1.0/pipelines/demo.pipeline" \
         "$prefix/share/lpipe-1.0/pipelines/reduce-svd.pipeline"; do
  [ -e "$f" ] || fail "not installed: ${f#$stage}"
done
ls "$pluginsdir"/*.so >/dev/null 2>&1 || fail "no plugins in ${pluginsdir#$stage}"
completion=$(find "$stage" -path '*bash-completion/completions/lpipe' | head -n 1)
[ -n "$completion" ] || fail "bash completion not installed"
if [ -e "$LPIPE_BUILD_ROOT/core/Lpipe-1.0.typelib" ]; then
  [ -e "$libdir/girepository-1.0/Lpipe-1.0.typelib" ] || fail "typelib not installed"
  [ -e "$prefix/share/gir-1.0/Lpipe-1.0.gir" ] || fail "GIR not installed"
fi

# Every public header compiles on its own through lpipe.h, with no -I into the tree.
flags=$(pkg-config --cflags --libs lpipe-1.0)
case $flags in *"$LPIPE_SOURCE_ROOT"*|*"$LPIPE_BUILD_ROOT"*) fail "pkg-config points into the tree: $flags" ;; esac

# ---- an out-of-tree plugin, with cc ---------------------------------------
example=$LPIPE_SOURCE_ROOT/tests/docs/example-plugin
mkdir -p "$tmp/cc-plugins"
# shellcheck disable=SC2086  # the flags are words
cc -shared -fPIC -Wall -Wextra -Werror -Wno-unused-parameter \
   -o "$tmp/cc-plugins/libexample.so" "$example/lp-example-plugin.c" $flags

lpipe () {
  LD_LIBRARY_PATH=$libdir LPIPE_PLUGIN_SYSTEM_PATH=$pluginsdir "$prefix/bin/lpipe" "$@"
}

check_plugin () {  # check_plugin DIR
  local list out names
  list=$(LPIPE_PLUGIN_PATH=$1 lpipe inspect)
  for s in example-prefix cast safetensors-source safetensors-sink lora-svd lora-synth; do
    grep -q "^$s " <<<"$list" || fail "stage $s not listed with LPIPE_PLUGIN_PATH=$1:
$list"
  done
  out=$(LPIPE_PLUGIN_PATH=$1 lpipe inspect example-prefix)
  grep -q "plugin *example ($1/" <<<"$out" || fail "example-prefix does not come from $1: $out"

  out=$tmp/out.safetensors
  rm -f "$out"
  LPIPE_PLUGIN_PATH=$1 lpipe --quiet launch lora-synth preset=sd15-unet rank=2 \
    ! example-prefix prefix=ex. ! safetensors-sink location="$out"
  names=$(lpipe info "$out" --json | /usr/bin/python3 -c '
import json, sys
info = json.load(sys.stdin)
tensors = info["tensors"]
print(len(tensors), sum(1 for t in tensors if t["name"].startswith("ex.")))')
  read -r n n_prefixed <<<"$names"
  [ "$n" -gt 0 ] && [ "$n" = "$n_prefixed" ] ||
    fail "example-prefix renamed $n_prefixed of $n tensors"

  # a required property left out is the loader's error, naming the stage
  if LPIPE_PLUGIN_PATH=$1 lpipe launch lora-synth ! example-prefix ! safetensors-sink \
       location="$out" 2>"$tmp/err"; then
    fail "example-prefix without prefix= ran"
  fi
  grep -q "'example-prefix'.*required property 'prefix'" "$tmp/err" ||
    fail "unexpected error: $(cat "$tmp/err")"
}

check_plugin "$tmp/cc-plugins"

# ---- the same plugin, with meson ------------------------------------------
"$MESON" setup --prefix "$tmp/example-prefix" "$tmp/example-build" "$example" >/dev/null
"$MESON" install -C "$tmp/example-build" --quiet >/dev/null
built=$(dirname "$(find "$tmp/example-prefix" -name 'libexample.so' | head -n 1)")
[ -d "$built" ] || fail "meson did not install the example plugin"
check_plugin "$built"

# ---- the installed typelib -------------------------------------------------
if [ -e "$libdir/girepository-1.0/Lpipe-1.0.typelib" ]; then
  GI_TYPELIB_PATH=$libdir/girepository-1.0 LD_LIBRARY_PATH=$libdir \
    /usr/bin/python3 -c '
import gi
gi.require_version("Lpipe", "1.0")
from gi.repository import Lpipe
assert Lpipe.Pipeline.__gtype__.name == "LpPipeline"
' || fail "the staged typelib does not load"
fi

echo "ok: staged install in ${prefix#$stage}, example plugin built with cc and meson"

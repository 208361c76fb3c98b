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

# ---- Python and gjs in a fresh shell, as after the README's install -------
# The README installs with --prefix=/usr, as Debian packages do: Debian's
# libgirepository searches /usr/lib/<triplet>/girepository-1.0 and
# /usr/lib/girepository-1.0 (not /usr/local), and python3-gi finds
# gi/overrides under /usr/lib/python3/dist-packages. The staged files, at the
# same paths below the prefix whatever it is, are laid over /usr in a private
# mount namespace (nothing of the real /usr is written), and python3 and gjs
# run with an empty environment: no GI_TYPELIB_PATH, no PYTHONPATH. (A build
# configured for another prefix has that one compiled in as its plugin
# directory, so the stage is laid over it too.)
readme_install=$(sed -n '/^```sh$/{n;p;q}' "$LPIPE_SOURCE_ROOT/README.md")
grep -q 'meson setup build --prefix=/usr ' <<<"$readme_install" ||
  fail "the README's install does not configure --prefix=/usr: $readme_install"
if [ -e "$LPIPE_BUILD_ROOT/core/Lpipe-1.0.typelib" ]; then
  typelib_rel=${libdir#"$prefix"}/girepository-1.0
  [ -e "$prefix$typelib_rel/Lpipe-1.0.typelib" ] || fail "typelib not installed in $typelib_rel"
  [ -e "$prefix/lib/python3/dist-packages/gi/overrides/Lpipe.py" ] ||
    fail "the Python overrides are not in lib/python3/dist-packages/gi/overrides"
  search=$(env -i /usr/bin/python3 -c '
import gi
gi.require_version("GIRepository", "2.0")
from gi.repository import GIRepository
print("\n".join(GIRepository.Repository.get_search_path()))' 2>/dev/null ||
    printf '%s\n' /usr/lib/x86_64-linux-gnu/girepository-1.0 /usr/lib/girepository-1.0)
  grep -qx "/usr$typelib_rel" <<<"$search" ||
    fail "/usr$typelib_rel is not in libgirepository's search path: $search"
  if ! unshare --mount true 2>/dev/null; then
    echo "no mount namespace here (not root?): the fresh-shell check needs one" >&2
    exit 77
  fi
  cat >"$tmp/fresh.py" <<'PY'
import gi
gi.require_version('Lpipe', '1.0')
from gi.repository import Lpipe
assert Lpipe.Pipeline.__module__ == 'gi.overrides.Lpipe', Lpipe.Pipeline.__module__
assert 'GI_TYPELIB_PATH' not in __import__('os').environ
pipeline = Lpipe.Pipeline.parse_launch('lora-synth preset=sd15-unet rank=2 ! rank-check')
print('python ok', pipeline.get_n_stages())
PY
  cat >"$tmp/fresh.js" <<'JS'
imports.gi.versions.Lpipe = '1.0';
const {Lpipe} = imports.gi;
const pipeline = Lpipe.Pipeline.new(null);
pipeline.parse_launch_string('lora-synth preset=sd15-unet rank=2 ! rank-check');
print('gjs ok', pipeline.get_n_stages());
JS
  # Under -Db_sanitize the interpreters need the ASan runtime first
  # (tests/meson.build); a fresh shell keeps only that, never GI_TYPELIB_PATH.
  sanitizer_env="${LD_PRELOAD:+LD_PRELOAD=$LD_PRELOAD} ${ASAN_OPTIONS:+ASAN_OPTIONS=$ASAN_OPTIONS}"
  # shellcheck disable=SC2016  # expanded by the inner shell
  out=$(unshare --mount sh -c '
    mount --make-rprivate / &&
    mount -t overlay overlay -o "lowerdir=$1:/usr" /usr &&
    { [ "$4" = /usr ] || mount -t overlay overlay -o "lowerdir=$1:$4" "$4"; } &&
    env -i $5 PATH=/usr/bin:/bin /usr/bin/python3 "$2" &&
    env -i $5 PATH=/usr/bin:/bin HOME=/nonexistent gjs "$3"' sh "$prefix" "$tmp/fresh.py" "$tmp/fresh.js" "${prefix#"$stage"}" "$sanitizer_env" 2>&1) ||
    fail "the installed typelib does not load in a fresh shell: $out"
  grep -q '^python ok 2$' <<<"$out" || fail "python: $out"
  if command -v gjs >/dev/null; then grep -q '^gjs ok 2$' <<<"$out" || fail "gjs: $out"; fi
fi

echo "ok: staged install in ${prefix#$stage}, example plugin built with cc and meson"

#!/usr/bin/env bash
# Builds the Zig examples (threshold, convert, average) into OUTDIR.
# Needs Zig 0.14 or 0.15: `zig` on PATH, or the PyPI package (pip install ziglang==0.14.1).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
zig_version=0.14.1

if [ $# -ne 1 ]; then
  echo "usage: $0 OUTDIR" >&2
  exit 2
fi
out=$1

if command -v zig >/dev/null 2>&1; then
  zig=(zig)
elif python3 -c 'import ziglang' >/dev/null 2>&1; then
  zig=(python3 -m ziglang)
else
  echo "error: no Zig compiler found (neither \`zig\` on PATH nor the Python package ziglang)." >&2
  echo "Install one with:  pip install ziglang==$zig_version" >&2
  exit 1
fi

have=$("${zig[@]}" version)
case $have in
  0.14.* | 0.15.*) ;;
  *) echo "warning: this SDK is tested with Zig 0.14 and 0.15; found $have" >&2 ;;
esac

mkdir -p "$out"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for name in threshold convert average; do
  # -rdynamic exports the `export fn`s (the rule's and sluice.zig's); a 64 KiB
  # stack is plenty for these rules and keeps the initial memory small.
  "${zig[@]}" build-exe \
    -target wasm32-freestanding -O ReleaseSmall -fno-entry -rdynamic -fstrip --stack 65536 \
    --dep sluice "-Mroot=$here/examples/$name.zig" "-Msluice=$here/sluice.zig" \
    --name "$name" -femit-bin="$tmp/$name.wasm"
  # zig leaves its object file beside the output; only the module is wanted.
  cp "$tmp/$name.wasm" "$out/$name.wasm"
  echo "built $out/$name.wasm"
done

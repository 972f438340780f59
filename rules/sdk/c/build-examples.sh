#!/usr/bin/env bash
# Builds the C SDK's examples (threshold, convert, average) as OUTDIR/NAME.wasm.
# Needs clang with the wasm32 target and wasm-ld: apt-get install -y clang lld
set -euo pipefail
if [ $# -ne 1 ]; then
  echo "usage: $0 OUTDIR" >&2
  exit 2
fi
here=$(cd "$(dirname "$0")" && pwd)
out=$1

for tool in clang wasm-ld; do
  if ! command -v "$tool" >/dev/null; then
    echo "$0: $tool not found; install clang and lld (apt-get install -y clang lld)" >&2
    exit 1
  fi
done
# Some clang builds (Apple's, for one) lack the WebAssembly backend.
if ! clang --target=wasm32 -c -x c -o /dev/null - </dev/null 2>/dev/null; then
  echo "$0: this clang cannot target wasm32; install LLVM's clang and lld (apt-get install -y clang lld)" >&2
  exit 1
fi

mkdir -p "$out"
for name in threshold convert average; do
  clang --target=wasm32 -nostdlib -O2 -Wall -Wextra -Werror \
    -I "$here" \
    -Wl,--no-entry -Wl,--strip-all \
    -o "$out/$name.wasm" "$here/examples/$name/$name.c"
  echo "built $out/$name.wasm"
done

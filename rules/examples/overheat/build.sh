#!/usr/bin/env bash
# Builds overheat.wasm next to this script. Needs clang and lld (apt-get install -y clang lld).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
sdk="$here/../../sdk/c"
out="${1:-$here/overheat.wasm}"
clang --target=wasm32 -nostdlib -O2 -Wall -Wextra -Werror \
  -I "$sdk" \
  -Wl,--no-entry -Wl,--strip-all \
  -o "$out" "$here/overheat.c"
echo "built $out"

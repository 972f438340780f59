#!/bin/sh
# Builds {{name}}.wasm in this directory from {{name}}.c and sluice.h.
# Needs clang with the wasm32 target and lld's wasm-ld (no libc, no WASI SDK):
# Debian/Ubuntu: apt-get install -y clang lld. Set CC to use another clang.
set -eu
cd "$(dirname "$0")"
cc=${CC:-clang}

missing() {
    echo "build.sh: $1." >&2
    echo "Install LLVM's clang and lld (Debian/Ubuntu: apt-get install -y clang lld), then run ./build.sh again." >&2
    exit 1
}
command -v "$cc" >/dev/null 2>&1 || missing "'$cc' not found"
command -v wasm-ld >/dev/null 2>&1 || missing "'wasm-ld' (from lld) not found"
# Some clang builds (Apple's, for one) lack the WebAssembly backend.
"$cc" --target=wasm32 -c -x c -o /dev/null - </dev/null 2>/dev/null ||
    missing "'$cc' cannot target wasm32"

"$cc" --target=wasm32 -nostdlib -O2 -Wall -Wextra \
    -Wl,--no-entry -Wl,--strip-all \
    -o {{name}}.wasm {{name}}.c
echo "built {{name}}.wasm ($(wc -c <{{name}}.wasm | tr -d ' ') bytes)"

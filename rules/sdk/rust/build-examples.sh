#!/bin/sh
# Builds the example rules threshold.wasm, convert.wasm and average.wasm into
# OUTDIR with plain rustc (no cargo, no crates.io): the SDK as an rlib for
# wasm32-unknown-unknown, then each example as a cdylib linked against it.
#
# Usage: rules/sdk/rust/build-examples.sh OUTDIR
# The compiler: $RUSTC if set, else /usr/bin/rustc (Debian's, which has the
# wasm32 standard library as a package), else `rustc` from PATH; it must have
# the wasm32-unknown-unknown target.
set -eu

if [ $# -ne 1 ]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
out=$1
sdk=$(cd "$(dirname "$0")" && pwd)
target=wasm32-unknown-unknown

# A rustc whose sysroot has the target's core library.
has_wasm32() {
    command -v "$1" >/dev/null 2>&1 || return 1
    libdir=$("$1" --print target-libdir --target "$target" 2>/dev/null) || return 1
    ls "$libdir"/libcore-*.rlib >/dev/null 2>&1
}

rustc=
for candidate in ${RUSTC:-} /usr/bin/rustc rustc; do
    if has_wasm32 "$candidate"; then
        rustc=$candidate
        break
    fi
done
if [ -z "$rustc" ]; then
    cat >&2 <<EOF
error: no rustc with the $target target was found.
Install Debian's Rust compiler and its wasm32 standard library:
    apt-get install -y rustc libstd-rust-dev-wasm32
(or, with rustup: rustup target add $target), then run this script again.
EOF
    exit 1
fi

mkdir -p "$out"
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT

flags="--edition 2021 --target $target -C opt-level=s -C panic=abort -C codegen-units=1"

"$rustc" $flags --crate-type rlib --crate-name sluice_rule \
    -o "$build/libsluice_rule.rlib" "$sdk/src/lib.rs"

for example in threshold convert average; do
    "$rustc" $flags -C lto -C strip=symbols --crate-type cdylib --crate-name "$example" \
        --extern sluice_rule="$build/libsluice_rule.rlib" -L "$build" \
        -o "$out/$example.wasm" "$sdk/examples/$example.rs"
    echo "built $out/$example.wasm ($(wc -c <"$out/$example.wasm") bytes, $("$rustc" --version))"
done

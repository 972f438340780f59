#!/bin/sh
# Builds {{name}}.wasm in this directory from src/lib.rs and the vendored
# SDK in sluice-rule/, with plain rustc (no cargo, no crates.io).
#
# The compiler: $RUSTC if set, else /usr/bin/rustc (Debian's, whose wasm32
# standard library is a package), else `rustc` from PATH; it must have the
# wasm32-unknown-unknown target. With rustup and cargo you can instead run
#   cargo build --release --target wasm32-unknown-unknown
set -eu
cd "$(dirname "$0")"
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
    cat >&2 <<MSG
build.sh: no rustc with the $target target was found.
Install Debian's Rust compiler and its wasm32 standard library:
    apt-get install -y rustc libstd-rust-dev-wasm32
or, with rustup: rustup target add $target
then run ./build.sh again.
MSG
    exit 1
fi

build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
flags="--edition 2021 --target $target -C opt-level=s -C panic=abort -C codegen-units=1"

"$rustc" $flags --crate-type rlib --crate-name sluice_rule \
    -o "$build/libsluice_rule.rlib" sluice-rule/src/lib.rs
"$rustc" $flags -C lto -C strip=symbols --crate-type cdylib --crate-name {{crate}} \
    --extern sluice_rule="$build/libsluice_rule.rlib" -L "$build" \
    -o {{name}}.wasm src/lib.rs
echo "built {{name}}.wasm ($(wc -c <{{name}}.wasm | tr -d ' ') bytes, $("$rustc" --version))"

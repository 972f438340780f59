#!/usr/bin/env bash
# Builds the fuzz targets and runs each for a bounded time, starting from
# the seeds in fuzz/seeds/<target>/. Exits non-zero if any target crashed,
# after running all of them, and prints where each crashing input is.
#
# Usage: fuzz/run.sh [seconds-per-target] [target...]   (default: 60, all)
#
# Environment:
#   FUZZ_TARGET_DIR  the Cargo target dir (default: $CARGO_TARGET_DIR, else
#                    fuzz/target); a dir outside the checkout survives
#                    fresh clones.
#   FUZZ_SANITIZER   address (default) or none.
#
# Stable Rust is enough: cargo-fuzz passes nightly-only flags (-Z…) to
# rustc, which RUSTC_BOOTSTRAP=1 lets a stable toolchain accept.
set -euo pipefail

seconds=${1:-60}
shift || true
here=$(cd "$(dirname "$0")" && pwd)
cd "$here"

cargo_fuzz_version=0.13.2
if ! cargo fuzz --version 2>/dev/null | grep -qx "cargo-fuzz $cargo_fuzz_version"; then
    cargo install cargo-fuzz --version "$cargo_fuzz_version" --locked
fi

export RUSTC_BOOTSTRAP=1
# Beside the main build's when CARGO_TARGET_DIR is set: cargo-fuzz builds
# for an explicit target triple, so its output has a directory of its own.
target_dir=${FUZZ_TARGET_DIR:-${CARGO_TARGET_DIR:-$here/target}}
sanitizer=${FUZZ_SANITIZER:-address}
build=(--sanitizer "$sanitizer" --target-dir "$target_dir")

if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi

started=$(date +%s)
cargo fuzz build "${build[@]}"
echo "fuzz: built ${#targets[@]} targets in $(($(date +%s) - started)) s"

failed=()
for t in "${targets[@]}"; do
    # The corpus a run grows is scratch (git ignores it); new inputs go to
    # the first directory, the seeds are only read.
    mkdir -p "corpus/$t" "artifacts/$t"
    marker=$(mktemp)
    echo "fuzz: $t for $seconds s"
    # -timeout: an input running 10 s counts as a hang (a crash), so a run
    # cannot outlast its budget by much; -rss_limit_mb likewise for memory.
    if ! cargo fuzz run "${build[@]}" "$t" "corpus/$t" "seeds/$t" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1; then
        failed+=("$t")
        # Only this run's artifacts (older ones may be lying there).
        find "artifacts/$t" -type f -newer "$marker" \
            -printf "fuzz: $t crashed on $here/%p\n"
    fi
    rm -f "$marker"
done

# The closing line in the form CI reads as a test count.
passed=$((${#targets[@]} - ${#failed[@]}))
if [ "${#failed[@]}" -gt 0 ]; then
    echo "fuzz: crashed: ${failed[*]} (reproduce: RUSTC_BOOTSTRAP=1 cargo fuzz run <target> <artifact>)"
    echo "fuzz: $passed passed, ${#failed[@]} failed"
    exit 1
fi
echo "fuzz: $seconds s per target, no crash"
echo "fuzz: $passed passed, 0 failed"

#!/usr/bin/env bash
# Builds the AssemblyScript examples: OUTDIR/threshold.wasm, convert.wasm, average.wasm.
# Needs Node.js 20+ with npm 10+ (https://nodejs.org, or your distribution's nodejs and npm packages).
set -euo pipefail

if [ $# -ne 1 ]; then
  echo "usage: $0 OUTDIR" >&2
  exit 2
fi
for tool in node npm; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "$0: '$tool' not found: install Node.js 20 or newer with npm (https://nodejs.org, or apt-get install -y nodejs npm)" >&2
    exit 1
  fi
done
if [ "$(node -p 'process.versions.node.split(".")[0]')" -lt 20 ]; then
  echo "$0: Node.js $(node --version) is too old: the pinned AssemblyScript compiler needs Node.js 20 or newer" >&2
  exit 1
fi

sdk=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$1"
out=$(cd "$1" && pwd)

if [ ! -x "$sdk/node_modules/.bin/asc" ]; then
  echo "installing the pinned AssemblyScript compiler (npm ci)"
  (cd "$sdk" && npm ci --no-audit --no-fund)
fi

for name in threshold convert average; do
  # asconfig.json: minimal runtime, abort/trace routed to the sluice log.
  (cd "$sdk" && node_modules/.bin/asc "examples/$name/index.ts" --config asconfig.json -O3 -o "$out/$name.wasm")
  # The engine refuses any import outside `sluice`; catch that here already.
  node -e '
    const fs = require("fs");
    const file = process.argv[1];
    const bad = WebAssembly.Module.imports(new WebAssembly.Module(fs.readFileSync(file)))
      .filter((i) => i.module !== "sluice").map((i) => i.module + "." + i.name);
    if (bad.length) { console.error(file + ": imports outside sluice: " + bad.join(", ")); process.exit(1); }
  ' "$out/$name.wasm"
  echo "built $out/$name.wasm ($(wc -c <"$out/$name.wasm") bytes)"
done

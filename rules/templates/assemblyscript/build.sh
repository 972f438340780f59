#!/bin/sh
# Builds {{name}}.wasm in this directory from assembly/index.ts.
# Needs Node.js 20 or newer with npm. The first run installs the pinned
# AssemblyScript compiler from package-lock.json (npm ci).
set -eu
cd "$(dirname "$0")"

for tool in node npm; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "build.sh: '$tool' not found." >&2
        echo "Install Node.js 20 or newer with npm (https://nodejs.org, or Debian/Ubuntu: apt-get install -y nodejs npm), then run ./build.sh again." >&2
        exit 1
    fi
done
if [ "$(node -p 'process.versions.node.split(".")[0]')" -lt 20 ]; then
    echo "build.sh: Node.js $(node --version) is too old: the AssemblyScript compiler needs Node.js 20 or newer." >&2
    exit 1
fi

if [ ! -x node_modules/.bin/asc ]; then
    echo "installing the pinned AssemblyScript compiler (npm ci)"
    npm ci --no-audit --no-fund
fi

# asconfig.json: the SDK's options (minimal runtime, abort and trace routed
# to Sluice's log) and the output file.
node_modules/.bin/asc --config asconfig.json --target release

# Sluice refuses a module that imports anything outside `sluice`: say so now.
node -e '
  const fs = require("fs");
  const file = process.argv[1];
  const bad = WebAssembly.Module.imports(new WebAssembly.Module(fs.readFileSync(file)))
    .filter((i) => i.module !== "sluice").map((i) => i.module + "." + i.name);
  if (bad.length) {
    console.error("build.sh: " + file + " imports outside sluice, which Sluice refuses: " + bad.join(", "));
    process.exit(1);
  }
' {{name}}.wasm
echo "built {{name}}.wasm ($(wc -c <{{name}}.wasm | tr -d ' ') bytes)"

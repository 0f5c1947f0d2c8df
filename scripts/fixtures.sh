#!/usr/bin/env bash
# Makes the fixtures (target/fixtures) with the venv's PyTorch, unless the ones there
# were made by the current scripts/make_fixtures.py. Expects scripts/setup.sh done.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
out="${TRANSPLANT_FIXTURES:-$root/target/fixtures}"
stamp="$(sha256sum scripts/make_fixtures.py | cut -d' ' -f1)"
if [ -f "$out/.stamp" ] && [ "$(cat "$out/.stamp")" = "$stamp" ]; then
  echo "fixtures: $out is current" >&2
  exit 0
fi
rm -rf "$out"
mkdir -p "$out"
.venv/bin/python scripts/make_fixtures.py "$out"
echo "$stamp" > "$out/.stamp"

#!/usr/bin/env bash
# GPU checks in one go, for a machine with a CUDA GPU: builds, runs the GPU tests
# (a missing GPU is a failure here) and the GPU copy benchmark, prints a table.
#   targets: GPU->GPU within 1.25x one flat device copy of the same bytes;
#            CPU->GPU within 1.25x one flat pinned host-to-device copy.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/setup.sh
scripts/fixtures.sh
TRANSPLANT_REQUIRE_CUDA=1 cargo test --release --test tests -- --test-threads 1 gpu:: cuda_backend::
py=.venv/bin/python
echo
echo "== GPU copy benchmark (seconds; ratio to the flat copy of the same bytes)"
cargo bench --quiet --bench copy -- both gpu | while read -r json; do
  "$py" - "$json" <<'PY'
import json, sys
d = json.loads(sys.argv[1])
flat = d["flat_copy"]
print(f"  {d['model']:<5} {d['from']:>8} -> {d['into']:<8} copy {d['copy']:.4f}  ({d['copy'] / flat:.2f}x flat)   "
      f"plan+copy+verify {d['plan_copy_verify']:.4f}   verify {d['verify']:.4f}   flat {flat:.4f}")
PY
done

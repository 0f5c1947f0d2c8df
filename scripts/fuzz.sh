#!/usr/bin/env bash
# Fuzzes each parser for a bounded time (not part of CI) and prints executions and
# crashes per target. Usage: scripts/fuzz.sh [SECONDS_PER_TARGET] (default 60).
# Needs cargo-fuzz (cargo install cargo-fuzz); runs without a sanitizer (-s none),
# which works on a stable toolchain. Crashes land in fuzz/artifacts/TARGET/.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
seconds="${1:-60}"
scripts/setup.sh >/dev/null
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
# The fuzz binaries are not linked with the crate's rpath.
export LD_LIBRARY_PATH="$root/.libtorch/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
cd fuzz
targets=(pickle_machine torch_pickle rules sniff safetensors plan_file npy_header dcp retype)
cargo fuzz build -s none -O >/dev/null
printf '%-16s %12s %8s %s\n' target executions crashes seconds
for target in "${targets[@]}"; do
  mkdir -p "corpus/$target" "artifacts/$target"
  log="$(mktemp)"
  cargo fuzz run -s none -O "$target" -- -max_total_time="$seconds" -rss_limit_mb=4096 >"$log" 2>&1 || true
  execs="$(grep -Eo '^#[0-9]+' "$log" | tail -1 | tr -d '#')"
  crashes="$(find "artifacts/$target" -type f | wc -l)"
  printf '%-16s %12s %8s %s\n' "$target" "${execs:-0}" "$crashes" "$seconds"
  rm -f "$log"
done

# PyTorch as the oracle over a larger corpus than the test's: every fixture and
# written file, mutated 20 times with a seed of the day (scripts/oracle.py).
cd "$root"
cargo build --quiet --bin transplant
seed="${ORACLE_SEED:-$(date +%j)}"
out="$(mktemp -d)"
echo "oracle: seed $seed, 20 mutations of each archive" >&2
.venv/bin/python -W ignore scripts/oracle.py --transplant target/debug/transplant --out "$out" \
  --fixtures target/fixtures --mutants 20 --seed "$seed" || status=$?
rm -rf "$out"
exit "${status:-0}"

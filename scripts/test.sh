#!/usr/bin/env bash
# Everything CI checks, from a fresh machine: setup, fixtures, build, examples, tests.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

scripts/setup.sh
scripts/fixtures.sh

cargo build --all-targets

# The examples are documentation that runs: each one checks what it shows.
for example in identical different_arch nested varstore_to_script hot_swap; do
  echo "== example $example" >&2
  cargo run --quiet --example "$example"
done

cargo test

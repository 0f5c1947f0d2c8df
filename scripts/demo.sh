#!/usr/bin/env bash
# The main job on a bundled demo: the complete state of one BatchNorm network
# (parameters and buffers) moved into another of the same architecture.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

scripts/setup.sh
scripts/fixtures.sh
cargo run --quiet --release --example identical

#!/usr/bin/env bash
# Everything CI checks, from a fresh machine: setup, fixtures, format, lints,
# docs, build, examples, tests.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

scripts/setup.sh

# What a reviewer checks, checked first: formatting, lints, and docs whose
# links resolve (a broken intra-doc link is an error).
echo "== cargo fmt --check" >&2
cargo fmt --check
echo "== cargo clippy --all-targets -- -D warnings" >&2
cargo clippy --quiet --all-targets -- -D warnings
echo "== cargo doc --no-deps (warnings denied)" >&2
RUSTDOCFLAGS="-D warnings" cargo doc --quiet --no-deps

scripts/fixtures.sh

cargo build --all-targets

# The examples are documentation that runs: each one checks what it shows.
for example in identical different_arch fused_qkv nested varstore_to_script hot_swap; do
  echo "== example $example" >&2
  cargo run --quiet --example "$example"
done

cargo test

# Live sync end to end: a PyTorch trainer into a Rust service, a trainer killed mid-sync.
echo "== scripts/sync_demo.sh 5" >&2
scripts/sync_demo.sh 5

# A service that depends on the library: built as its own crate (sharing this
# target folder), with none of the CLI's dependencies, and run without
# LD_LIBRARY_PATH: it must find libtorch through its rpath and answer exactly as
# the reference model does.
echo "== embed/: a crate that depends on tch-transplant" >&2
CARGO_TARGET_DIR="$root/target" cargo build --quiet --manifest-path embed/Cargo.toml
if cargo tree --manifest-path embed/Cargo.toml -e normal --prefix none | grep -qE '^(clap|anyhow|indicatif) '; then
  echo "embed/ compiles the CLI's dependencies (clap, anyhow or indicatif)" >&2
  exit 1
fi
demo="$root/target/fixtures/demo"
env -u LD_LIBRARY_PATH "$root/target/debug/transplant-embed" \
  "$demo/state_dict.pth" "$demo/renamed_module.pt" "$demo/reference.pt"

# The wheel as pip installs it: on the environment's torch, refusing any other.
echo "== scripts/wheel_check.sh" >&2
scripts/wheel_check.sh

#!/usr/bin/env bash
# Builds the Python wheel: the `transplant` command line and the `transplant_sync`
# module, no libtorch inside; it runs on the libtorch of the torch==X.Y.* that pip
# installs beside it (python/transplant_cli/ finds it at run time).
#
#   scripts/wheel.sh [--profile release|dev] [--out DIR]     (default: release, target/wheels)
#
# The wheel users get is a release build. `--profile dev` packs a debug build
# (scripts/wheel_check.sh uses it: CI has the debug dependencies built already).
# Prints the wheel's path on stdout; what it did on stderr.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

profile=release
out="$root/target/wheels"
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) profile="${2:?--profile needs release or dev}"; shift 2 ;;
    --out) out="${2:?--out needs a folder}"; shift 2 ;;
    *) echo "wheel: usage: scripts/wheel.sh [--profile release|dev] [--out DIR]" >&2; exit 2 ;;
  esac
done
case "$profile" in
  release) folder=release ;;
  dev) folder=debug ;;
  *) echo "wheel: --profile is release or dev, not $profile" >&2; exit 2 ;;
esac

scripts/setup.sh
start=$(date +%s)
cargo build --quiet --profile "$profile" --bin transplant
echo "wheel: cargo build --profile $profile: $(( $(date +%s) - start )) s" >&2
binary="$root/target/$folder/transplant"
glibc="$(objdump -T "$binary" | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -1)"
glibcxx="$(objdump -T "$binary" | grep -o 'GLIBCXX_[0-9.]*' | sort -uV | tail -1)"
echo "wheel: the binary needs $glibc and libstdc++ $glibcxx or newer" >&2
env -u LD_LIBRARY_PATH .venv/bin/python scripts/wheel.py --binary "$binary" --out "$out"

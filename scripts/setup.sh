#!/usr/bin/env bash
# Sets up libtorch for building transplant, from the PyTorch wheel on PyPI.
#
# - creates .venv/ in the repository (ignored by git) with torch==2.13.0 and what
#   scripts/make_fixtures.py and the tests need (torchvision, timm, numpy,
#   safetensors; transformers and peft for the language-model conversions and
#   LoRA merges, built from configs with random weights);
# - makes .libtorch a stable link to the wheel's torch/ folder;
# - .cargo/config.toml (committed) points LIBTORCH at .libtorch, so plain
#   `cargo build` / `cargo test` / `cargo run` find it; a LIBTORCH set by the user wins.
#
# Idempotent: a second run only checks.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

TORCH_VERSION="2.13.0"
TORCHVISION_VERSION="0.28.0"
# timm: the other library of the rule library's tests (rules/, make_fixtures.py).
TIMM_VERSION="1.0.31"
# transformers and peft: tiny language models and LoRA adapters built from
# configs (never a hub download).
TRANSFORMERS_VERSION="5.24.0"
PEFT_VERSION="0.21.2"
venv="$root/.venv"
py="$venv/bin/python"

say() { printf 'setup: %s\n' "$*" >&2; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

python_bin="${PYTHON:-}"
if [ -z "$python_bin" ]; then
  for candidate in python3 python; do
    if command -v "$candidate" >/dev/null 2>&1; then python_bin="$candidate"; break; fi
  done
fi
[ -n "$python_bin" ] || die "no python3 found: install Python 3.10+ (Debian: apt-get install python3 python3-venv python3-pip)"

if [ ! -x "$py" ]; then
  say "creating $venv"
  "$python_bin" -m venv "$venv" \
    || die "could not create a venv: install the venv module (Debian: apt-get install python3-venv)"
fi
"$py" -m pip --version >/dev/null 2>&1 \
  || die "pip is missing in $venv: install it (Debian: apt-get install python3-pip), then remove .venv and rerun"

installed_version() {
  "$py" - "$1" <<'PY' 2>/dev/null || true
import importlib.metadata, sys
try:
    print(importlib.metadata.version(sys.argv[1]))
except importlib.metadata.PackageNotFoundError:
    pass
PY
}

need_install=0
[ "$(installed_version torch)" = "$TORCH_VERSION" ] || need_install=1
[ "$(installed_version torchvision)" = "$TORCHVISION_VERSION" ] || need_install=1
[ "$(installed_version timm)" = "$TIMM_VERSION" ] || need_install=1
[ "$(installed_version transformers)" = "$TRANSFORMERS_VERSION" ] || need_install=1
[ "$(installed_version peft)" = "$PEFT_VERSION" ] || need_install=1
for pkg in numpy safetensors; do
  [ -n "$(installed_version "$pkg")" ] || need_install=1
done

if [ "$need_install" = 1 ]; then
  say "installing torch==$TORCH_VERSION torchvision==$TORCHVISION_VERSION timm==$TIMM_VERSION transformers==$TRANSFORMERS_VERSION peft==$PEFT_VERSION numpy safetensors (about 5 GB)"
  "$py" -m pip install --quiet \
    "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION" "timm==$TIMM_VERSION" \
    "transformers==$TRANSFORMERS_VERSION" "peft==$PEFT_VERSION" numpy safetensors \
    || die "pip install failed (is PyPI reachable?)"
else
  say "torch $TORCH_VERSION, torchvision $TORCHVISION_VERSION, timm $TIMM_VERSION, transformers $TRANSFORMERS_VERSION, peft $PEFT_VERSION, numpy and safetensors already installed"
fi

torch_dir="$("$py" -c 'import os, torch; print(os.path.dirname(torch.__file__))')"
[ -f "$torch_dir/lib/libtorch_cpu.so" ] || die "$torch_dir/lib/libtorch_cpu.so not found: the torch wheel looks incomplete"

if [ "$(readlink .libtorch 2>/dev/null || true)" != "$torch_dir" ]; then
  ln -sfn "$torch_dir" .libtorch
  say "linked .libtorch -> $torch_dir"
else
  say ".libtorch -> $torch_dir (ok)"
fi

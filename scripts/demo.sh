#!/usr/bin/env bash
# The main job on a bundled demo, through the CLI: a state dict saved from
# PyTorch (torch.save of a BatchNorm network) goes into a TorchScript module of
# the same network whose attributes all have other names; plan, copy, then
# verify that the module now computes exactly what the original network does.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

scripts/setup.sh
scripts/fixtures.sh
cargo build --quiet --bin transplant

demo=target/fixtures/demo
out=target/demo
mkdir -p "$out"
transplant() { target/debug/transplant "$@"; }
show() { printf '\n$ transplant %s\n' "$*"; }

show inspect "$demo/state_dict.pth"
transplant inspect "$demo/state_dict.pth" | tail -n 4

# The order matcher aligns modules by structure; it never pairs two different
# leaf names, so the root buffer (`temperature` here, `scale` there) needs a rule.
show plan "$demo/state_dict.pth" "$demo/renamed_module.pt" --match order
status=0
transplant plan "$demo/state_dict.pth" "$demo/renamed_module.pt" --match order || status=$?
[ "$status" = 3 ] || { echo "expected exit 3 (incomplete), got $status" >&2; exit 1; }

show plan "$demo/state_dict.pth" "$demo/renamed_module.pt" --match order --map "'temperature=>scale'"
transplant plan "$demo/state_dict.pth" "$demo/renamed_module.pt" --match order --map 'temperature=>scale'

show copy "$demo/state_dict.pth" "$demo/renamed_module.pt" --match order --map "'temperature=>scale'" -o "$out/restored.pt"
transplant copy "$demo/state_dict.pth" "$demo/renamed_module.pt" --match order --map 'temperature=>scale' \
  -o "$out/restored.pt" | tail -n 3

show verify "$demo/reference.pt" "$out/restored.pt" --input 4,3,8,8
transplant verify "$demo/reference.pt" "$out/restored.pt" --input 4,3,8,8 --atol 0

show verify "$demo/reference.pt" "$demo/renamed_module.pt" --input 4,3,8,8 "(before the copy)"
if transplant verify "$demo/reference.pt" "$demo/renamed_module.pt" --input 4,3,8,8 --atol 0; then
  echo "unexpected: the untouched module already matched" >&2
  exit 1
fi

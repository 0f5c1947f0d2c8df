#!/usr/bin/env bash
# Checks the wheel as a user gets it (scripts/test.sh runs this): built by
# scripts/wheel.sh, installed by pip into fresh environments, run from another
# folder.
#
# - a venv that reaches setup's torch through a .pth file (no second 4.7 GB
#   download; pip sees the torch==X.Y.* the wheel requires as installed):
#   `transplant --version` names that torch's libtorch, `inspect` and `convert`
#   answer as the binary built here does, `import transplant_sync` works, the
#   installed binary has no search path of this machine and needs no library
#   beyond torch/lib and the system's C and C++ runtimes;
# - user site (pip install --user) with torch reached the same way;
# - a venv without torch, one with a torch of another release, and one whose
#   torch has no libraries: the command fails with one line naming the torch
#   needed (and the error document with --json), exit status 1.
#
# Packs a debug build (TRANSPLANT_WHEEL_PROFILE=release checks a release wheel):
# the package is the same, and CI, which builds in debug already, compiles only
# this crate's library and binary once more (`cargo build --bin transplant`
# leaves out the dev-dependencies' features that `--all-targets` unifies in), not
# a release build of libtorch's bindings and every dependency (an hour here).
# Idempotent: every run starts from empty environments under target/wheel-check/.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

profile="${TRANSPLANT_WHEEL_PROFILE:-dev}"
case "$profile" in release) folder=release ;; *) folder=debug ;; esac
work="$root/target/wheel-check"
rm -rf "$work"
mkdir -p "$work/elsewhere"
fail() { printf 'wheel_check: FAILED: %s\n' "$*" >&2; exit 1; }
say() { printf 'wheel_check: %s\n' "$*" >&2; }

wheel="$(scripts/wheel.sh --profile "$profile" --out "$work/dist" | tail -1)"
reference="$root/target/$folder/transplant"  # the same build, run through its rpath
fixtures="$root/target/fixtures"
[ -f "$fixtures/COMPLETE" ] || fail "no fixtures in $fixtures: run scripts/fixtures.sh"
py="$root/.venv/bin/python"
site() { "$1" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }
setup_site="$(site "$py")"

# The release the binary runs on here, and so the one the wheel must require.
torch="$("$reference" --version | sed -n 's/^transplant [^ ]* (libtorch \([0-9]*\.[0-9]*\)\..*/\1/p')"
[ -n "$torch" ] || fail "\`$reference --version\` names no libtorch release"
case "$(basename "$wheel")" in
  *-py3-none-linux_$(uname -m).whl) ;;
  *) fail "tags of $(basename "$wheel"): expected py3-none-linux_$(uname -m)" ;;
esac
if "$py" -m zipfile -l "$wheel" | grep -E '\.so(\.[0-9]+)*[[:space:]]' >/dev/null; then
  fail "the wheel holds a shared library: $("$py" -m zipfile -l "$wheel" | grep -E '\.so')"
fi
"$py" -c 'import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); print(*(z.read(n).decode() for n in z.namelist() if n.endswith(".dist-info/METADATA")))' "$wheel" \
  | grep -x "Requires-Dist: torch==$torch.\*" >/dev/null \
  || fail "the wheel does not require torch==$torch.*"

# pip into an environment that may not hold pip itself (pip 22.3+: --python).
install() { # ENV_PYTHON PIP_ARGS...
  local target="$1"; shift
  PIP_ROOT_USER_ACTION=ignore "$py" -m pip --python "$target" install --quiet --no-index \
    --disable-pip-version-check --no-warn-script-location "$@" "$wheel"
}

# 1. A venv whose torch is setup's, through a .pth file.
env="$work/with-torch"
"$py" -m venv --without-pip "$env"
echo "$setup_site" > "$(site "$env/bin/python")/setup_torch.pth"
origin="$("$env/bin/python" -c 'import importlib.util; print(importlib.util.find_spec("torch").origin)')"
[ "$origin" = "$setup_site/torch/__init__.py" ] || fail "the venv's torch is $origin, not setup's"
install "$env/bin/python"  # resolves torch==X.Y.* against setup's torch: nothing to download
installed="$(site "$env/bin/python")/transplant_cli/bin/transplant"
[ -x "$installed" ] || fail "no executable $installed"
if readelf -d "$installed" | grep -E 'RPATH|RUNPATH' >/dev/null; then
  fail "the installed binary keeps a search path: $(readelf -d "$installed" | grep -E 'RPATH|RUNPATH')"
fi
torch_lib="$(cd "$setup_site/torch/lib" && pwd -P)"
for needed in $(readelf -d "$installed" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
  case "$needed" in
    libc.so.6 | libm.so.6 | libdl.so.2 | librt.so.1 | libpthread.so.0 | ld-linux-*.so.* | libstdc++.so.6 | libgcc_s.so.1) ;;
    *) [ -f "$torch_lib/$needed" ] || fail "the binary needs $needed, which is neither in torch/lib nor a system runtime" ;;
  esac
done

cd "$work/elsewhere"
version="$(env -u LD_LIBRARY_PATH "$env/bin/transplant" --version)"
say "installed: $version"
case "$version" in
  "transplant "*" (libtorch $torch."*" at $torch_lib; CUDA backend "*) ;;
  *) fail "--version of the installed command: $version (expected libtorch $torch.* at $torch_lib)" ;;
esac
[ "$(env -u LD_LIBRARY_PATH "$env/bin/python" -m transplant_cli --version)" = "$version" ] \
  || fail "python -m transplant_cli --version differs from transplant --version"
model="$fixtures/demo/state_dict.pth"
env -u LD_LIBRARY_PATH "$env/bin/transplant" inspect "$model" --json > inspect.json
"$reference" inspect "$model" --json > reference.json
cmp -s inspect.json reference.json || fail "inspect --json of the installed command differs from $reference's"
env -u LD_LIBRARY_PATH "$env/bin/transplant" convert "$model" -o converted.safetensors > /dev/null 2>&1 \
  || fail "convert with the installed command failed"
"$reference" convert "$model" -o reference.safetensors > /dev/null 2>&1
cmp -s converted.safetensors reference.safetensors || fail "convert of the installed command wrote other bytes"
module="$(env -u LD_LIBRARY_PATH "$env/bin/python" -c 'import transplant_sync; print(transplant_sync.__file__)')"
[ "$module" = "$(site "$env/bin/python")/transplant_sync.py" ] || fail "transplant_sync imported from $module"
cd "$root"

# 2. User site: pip install --user with the base interpreter, torch through a .pth.
base="$("$py" -c 'import sys; print(sys._base_executable)')"
export PYTHONUSERBASE="$work/user"
install "$base" --user --no-deps
user_site="$("$base" -c 'import site; print(site.getusersitepackages())')"
echo "$setup_site" > "$user_site/setup_torch.pth"
[ "$(cd "$work/elsewhere" && env -u LD_LIBRARY_PATH "$work/user/bin/transplant" --version)" = "$version" ] \
  || fail "the command installed in user site does not run on setup's torch"
unset PYTHONUSERBASE

# 3. Environments where it must refuse, in one line, before the dynamic linker could.
refuses() { # ENV WHAT_IT_MUST_SAY
  local env="$1" said="$2" out err code=0
  out="$(cd "$work/elsewhere" && env -u LD_LIBRARY_PATH "$env/bin/transplant" --version 2>"$work/stderr")" || code=$?
  err="$(cat "$work/stderr")"
  [ "$code" = 1 ] || fail "$env: exit status $code (expected 1): $err"
  [ -z "$out" ] || fail "$env: printed on stdout: $out"
  [ "$(printf '%s\n' "$err" | wc -l)" = 1 ] || fail "$env: not one line on stderr: $err"
  case "$err" in
    "error: transplant needs torch $torch.* "*"$said"*) ;;
    *) fail "$env: $err (expected the torch needed and \"$said\")" ;;
  esac
  (cd "$work/elsewhere" && env -u LD_LIBRARY_PATH "$env/bin/transplant" inspect x --json 2>/dev/null || true) \
    | "$py" -c 'import json, sys; e = json.load(sys.stdin)["error"]; assert e["kind"] == "torch_required", e' \
    || fail "$env: --json gives no error document on stdout"
  say "refused as it should: $err"
}
bare="$work/without-torch"
"$py" -m venv --without-pip "$bare"
install "$bare/bin/python" --no-deps
refuses "$bare" "has no torch: pip install 'torch==$torch.*'"

# A torch of another release: a stand-in package and its metadata, no libraries.
other="$work/other-torch"
"$py" -m venv --without-pip "$other"
install "$other/bin/python" --no-deps
other_site="$(site "$other/bin/python")"
other_release="${torch%%.*}.$(( ${torch#*.} - 1 ))"
mkdir -p "$other_site/torch" "$other_site/torch-$other_release.0.dist-info"
printf '"""A stand-in for another torch release."""\n' > "$other_site/torch/__init__.py"
printf "__version__ = '%s.0+cpu'\n" "$other_release" > "$other_site/torch/version.py"
printf 'Metadata-Version: 2.1\nName: torch\nVersion: %s.0\n' "$other_release" > "$other_site/torch-$other_release.0.dist-info/METADATA"
refuses "$other" "has torch $other_release.0+cpu"

# The right release without its libraries (a damaged install).
printf "__version__ = '%s.0'\n" "$torch" > "$other_site/torch/version.py"
refuses "$other" "has no lib/libtorch_cpu.so"

say "ok: $(basename "$wheel"), $(stat -c %s "$wheel") bytes"

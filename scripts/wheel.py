"""Packs a built `transplant` binary into the Python wheel (scripts/wheel.sh runs it).

    wheel.py --binary target/release/transplant --out target/wheels

The wheel holds the binary (stripped, its RPATH/RUNPATH removed: no path of the
machine that built it), the launcher `python/transplant_cli/` that the console
script `transplant` runs, and `python/transplant_sync.py`; no libtorch. It
requires `torch==X.Y.*`, X.Y being the libtorch the binary reports running on
when it runs here through its build-time rpath, which is the one it was built
against. Tags are what the contents are: `py3` (pure Python besides the
binary, no Python ABI), `none`, and `linux_<machine>` from the binary's ELF
header (no manylinux claim: the binary needs the glibc and libstdc++ of the
machine that built it, or newer; `wheel.sh` prints which). The wheel is
reproducible: members in a fixed order, fixed timestamps.

Only the standard library: maturin's `bindings = "bin"` puts the binary itself
on PATH, where a missing torch would surface as a dynamic-linker error.
"""

import argparse
import base64
import hashlib
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DISTRIBUTION = "tch_transplant"  # the crate's name, normalized as wheel file names want it
# A zip cannot hold times before 1980; a fixed time makes the wheel reproducible.
EPOCH = (1980, 1, 1, 0, 0, 0)
ELF_MACHINES = {62: "x86_64", 183: "aarch64"}
DT_NULL, DT_RPATH, DT_RUNPATH = 0, 15, 29
PT_DYNAMIC = 2


def fail(message):
    print("wheel: error: %s" % message, file=sys.stderr)
    sys.exit(1)


def elf_header(path):
    """(machine name, program header offset, entry size, count) of an ELF64 little-endian file."""
    with open(path, "rb") as f:
        header = f.read(64)
    if len(header) < 64 or header[:4] != b"\x7fELF" or header[4] != 2 or header[5] != 1:
        fail("%s is not a 64-bit little-endian ELF file" % path)
    (machine,) = struct.unpack_from("<H", header, 0x12)
    (phoff,) = struct.unpack_from("<Q", header, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", header, 0x36)
    if machine not in ELF_MACHINES:
        fail("%s is built for ELF machine %d, which has no wheel tag here" % (path, machine))
    return ELF_MACHINES[machine], phoff, phentsize, phnum


def drop_search_paths(path):
    """Removes DT_RPATH and DT_RUNPATH from `path`'s dynamic section, in place.

    What `patchelf --remove-rpath` does: the other entries move up, DT_NULL
    fills the end. The loader then finds libraries through LD_LIBRARY_PATH (the
    launcher sets it) and the system's paths only. Returns how many it removed.
    """
    _, phoff, phentsize, phnum = elf_header(path)
    with open(path, "r+b") as f:
        f.seek(phoff)
        table = f.read(phentsize * phnum)
        dynamic = None
        for i in range(phnum):
            (kind,) = struct.unpack_from("<I", table, i * phentsize)
            if kind == PT_DYNAMIC:
                (offset,) = struct.unpack_from("<Q", table, i * phentsize + 8)
                (size,) = struct.unpack_from("<Q", table, i * phentsize + 32)
                dynamic = (offset, size)
        if dynamic is None:
            fail("%s has no dynamic section: not the dynamically linked binary expected" % path)
        offset, size = dynamic
        f.seek(offset)
        data = f.read(size)
        entries = []
        for at in range(0, size - size % 16, 16):
            tag, value = struct.unpack_from("<qQ", data, at)
            if tag == DT_NULL:
                break
            entries.append((tag, value))
        kept = [(tag, value) for tag, value in entries if tag not in (DT_RPATH, DT_RUNPATH)]
        if len(kept) == len(entries):
            return 0
        f.seek(offset)
        f.write(b"".join(struct.pack("<qQ", tag, value) for tag, value in kept))
        f.write(bytes(size - 16 * len(kept)))
    return len(entries) - len(kept)


def describe(binary):
    """(transplant's version, libtorch's version) from `binary --version`, run here."""
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    run = subprocess.run([binary, "--version"], capture_output=True, text=True, env=env)
    found = re.match(r"transplant (\S+) \(libtorch (\d+)\.(\d+)\.\S* at ", run.stdout)
    if run.returncode != 0 or found is None:
        fail("`%s --version` did not name its libtorch (exit %d): %s%s"
             % (binary, run.returncode, run.stdout.strip(), run.stderr.strip()))
    return found.group(1), "%s.%s" % (found.group(2), found.group(3))


def cargo_description():
    with open(os.path.join(ROOT, "Cargo.toml"), encoding="utf-8") as f:
        found = re.search(r'^description = "(.*)"$', f.read(), re.MULTILINE)
    return found.group(1) if found else "transplant"


def record_line(name, data):
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return "%s,sha256=%s,%d" % (name, digest, len(data))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--binary", required=True, help="the built transplant binary")
    parser.add_argument("--out", required=True, help="the folder to write the wheel into")
    args = parser.parse_args()

    version, torch = describe(args.binary)
    with tempfile.TemporaryDirectory() as scratch:
        binary = os.path.join(scratch, "transplant")
        strip = shutil.which("strip")
        if strip is None:
            fail("`strip` (binutils) is not installed")
        subprocess.run([strip, "--strip-all", "-o", binary, args.binary], check=True)
        machine = elf_header(binary)[0]
        removed = drop_search_paths(binary)
        with open(binary, "rb") as f:
            binary_bytes = f.read()

        dist_info = "%s-%s.dist-info" % (DISTRIBUTION, version)
        tag = "py3-none-linux_%s" % machine
        members = {}
        package = os.path.join(ROOT, "python", "transplant_cli")
        for name in sorted(os.listdir(package)):
            if name.endswith(".py"):
                with open(os.path.join(package, name), "rb") as f:
                    members["transplant_cli/" + name] = f.read()
        members["transplant_cli/_built.py"] = (
            '"""Written by scripts/wheel.py: the torch release the binary is built against."""\n\n'
            'TORCH = "%s"\n' % torch
        ).encode()
        members["transplant_cli/bin/transplant"] = binary_bytes
        with open(os.path.join(ROOT, "python", "transplant_sync.py"), "rb") as f:
            members["transplant_sync.py"] = f.read()
        members[dist_info + "/METADATA"] = (
            "Metadata-Version: 2.1\n"
            "Name: tch-transplant\n"
            "Version: %s\n"
            "Summary: %s\n"
            "License: MIT OR Apache-2.0\n"
            "Requires-Python: >=3.10\n"
            "Requires-Dist: torch==%s.*\n"
            "\n"
            "The `transplant` command line (on the libtorch of the environment's torch %s.*)\n"
            "and the `transplant_sync` module.\n" % (version, cargo_description(), torch, torch)
        ).encode()
        members[dist_info + "/WHEEL"] = (
            "Wheel-Version: 1.0\n"
            "Generator: transplant scripts/wheel.py\n"
            "Root-Is-Purelib: false\n"
            "Tag: %s\n" % tag
        ).encode()
        members[dist_info + "/entry_points.txt"] = b"[console_scripts]\ntransplant = transplant_cli:main\n"
        record = [record_line(name, data) for name, data in members.items()]
        record.append(dist_info + "/RECORD,,")
        members[dist_info + "/RECORD"] = ("\n".join(record) + "\n").encode()

        os.makedirs(args.out, exist_ok=True)
        wheel = os.path.join(args.out, "%s-%s-%s.whl" % (DISTRIBUTION, version, tag))
        partial = wheel + ".partial"
        with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as z:
            for name, data in members.items():
                info = zipfile.ZipInfo(name, date_time=EPOCH)
                info.compress_type = zipfile.ZIP_DEFLATED
                executable = name == "transplant_cli/bin/transplant"
                info.external_attr = (0o100755 if executable else 0o100644) << 16
                z.writestr(info, data)
        os.replace(partial, wheel)
    print("wheel: %s (%d bytes; binary %d bytes stripped, %d search path(s) removed; requires torch==%s.*)"
          % (wheel, os.path.getsize(wheel), len(binary_bytes), removed, torch), file=sys.stderr)
    print(wheel)


if __name__ == "__main__":
    main()

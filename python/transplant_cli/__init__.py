"""The ``transplant`` command of the wheel: runs the binary on this environment's torch.

The binary (``transplant_cli/bin/transplant``) links ``libtorch_cpu.so`` but
carries neither a copy of it nor a path to one. This launcher, the console
script pip makes for the wheel, runs on the interpreter of the environment the
wheel was installed into, so it sees exactly what ``import torch`` would: a
venv, a conda env, user site, ``.pth`` paths, system site packages. It finds
the ``torch`` package there without importing it (``find_spec`` and its
``version.py``: milliseconds, where ``import torch`` takes seconds), checks that
its version is the one the binary was built against, and execs the binary with
``torch/lib`` first on ``LD_LIBRARY_PATH``, so the process is the binary's, its
exit status and signals included.

When torch is missing, of another version, or without its libraries, the
command fails before the dynamic linker could: one line on stderr naming the
version needed (with ``--json``, also the error document on stdout, as the
binary's own errors are), exit status 1.
"""

import importlib.util
import os
import re
import sys

from ._built import TORCH

__all__ = ["main"]

_VERSION = re.compile(r"""^__version__\s*(?::\s*str\s*)?=\s*['"]([^'"]+)['"]""", re.MULTILINE)


class _Refused(Exception):
    """Why the binary cannot run here, the file concerned, and the kind for ``--json``."""

    def __init__(self, message, path=None, kind="torch_required"):
        super().__init__(message)
        self.path = path
        self.kind = kind


def _torch_libraries():
    """The ``lib`` folder of the torch package ``import torch`` would import here."""
    need = "transplant needs torch %s.* (it runs on that package's libtorch)" % TORCH
    install = "pip install 'torch==%s.*'" % TORCH
    try:
        spec = importlib.util.find_spec("torch")
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise _Refused("%s; this Python environment (%s) has no torch: %s" % (need, sys.executable, install))
    package = os.path.abspath(locations[0])
    version_file = os.path.join(package, "version.py")
    try:
        with open(version_file, encoding="utf-8") as f:
            found = _VERSION.search(f.read())
    except OSError:
        found = None
    if found is None:
        raise _Refused("%s; cannot tell the version of the torch at %s (no __version__ in its version.py)"
                       % (need, package), version_file)
    version = found.group(1)
    release = re.match(r"(\d+)\.(\d+)", version)
    if release is None or "%s.%s" % release.groups() != TORCH:
        raise _Refused("%s; this Python environment has torch %s (%s): %s" % (need, version, package, install),
                       package)
    libraries = os.path.join(package, "lib")
    if not os.path.isfile(os.path.join(libraries, "libtorch_cpu.so")):
        raise _Refused("%s; the torch %s at %s has no lib/libtorch_cpu.so" % (need, version, package), libraries)
    return libraries


def main():
    """Runs the ``transplant`` binary on this environment's torch; returns only on failure."""
    binary = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bin", "transplant")
    try:
        libraries = _torch_libraries()
        before = os.environ.get("LD_LIBRARY_PATH")
        os.environ["LD_LIBRARY_PATH"] = libraries + (os.pathsep + before if before else "")
        try:
            os.execv(binary, ["transplant"] + sys.argv[1:])
        except OSError as e:
            raise _Refused("cannot run %s: %s" % (binary, e.strerror or e), binary, "io")
    except _Refused as refused:
        if "--json" in sys.argv[1:]:
            import json  # only here: every run pays for what the launcher imports

            error = {"kind": refused.kind, "message": str(refused), "file": refused.path}
            print(json.dumps({"error": error}, indent=2))
        print("error: %s" % refused, file=sys.stderr)
        return 1

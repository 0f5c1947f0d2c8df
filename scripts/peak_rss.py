#!/usr/bin/env python3
"""Runs a command and prints its peak resident set size in bytes (its exit status
is passed on). Measured from this small process, so that the number is the
command's own, not that of a large parent it was forked from.

Usage: .venv/bin/python scripts/peak_rss.py COMMAND [ARG]...
"""
import resource
import subprocess
import sys

status = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
sys.exit(status)

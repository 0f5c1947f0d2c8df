"""A trainer that recovers from a lost receiver without restarting (tests/sync.rs).

It syncs once (then writes SIGNAL_DIR/first), waits for SIGNAL_DIR/dead (the test has let its receiver go),
syncs again -- which must fail with a SyncError -- and recovers inside the
``except`` block, where the traceback still holds the old sender: by syncing
again with the same sender (a new session), or with --new-sender by closing
it and making a new one (on the same port, where it serves the store). One
JSON line per step.

    python scripts/sync_recovery.py --port P --channel C --model M --signal-dir D \
        [--serve-store] [--new-sender] [--timeout SECONDS]
"""

import argparse
import json
import os
import sys
import time
from datetime import timedelta

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import transplant_sync  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--channel", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--signal-dir", required=True)
    parser.add_argument("--serve-store", action="store_true")
    parser.add_argument("--new-sender", action="store_true")
    parser.add_argument("--timeout", type=float, default=20)
    args = parser.parse_args()
    model = torch.jit.load(args.model)

    def sender():
        return transplant_sync.Sender(
            "127.0.0.1", args.port, 1, model, channel=args.channel, serve_store=args.serve_store,
            bucket_bytes=256, timeout=timedelta(seconds=args.timeout),
        )

    def say(**line):
        print(json.dumps(line), flush=True)

    s = sender()
    say(step="first", session=s.sync(model)["session"])
    open(os.path.join(args.signal_dir, "first"), "w").close()
    dead = os.path.join(args.signal_dir, "dead")
    while not os.path.exists(dead):
        time.sleep(0.05)
    start = time.monotonic()
    try:
        s.sync(model)
        say(step="dead", error=None)
    except transplant_sync.SyncError as e:
        say(step="dead", error=str(e), cause=type(e.__cause__).__name__, seconds=time.monotonic() - start)
        if args.new_sender:
            s.close()
            s.close()  # twice, on a dead peer: never raises
            s = sender()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        say(step="recovered", session=s.sync(model)["session"])
    with s:
        pass
    s.close()
    say(step="closed")


if __name__ == "__main__":
    main()

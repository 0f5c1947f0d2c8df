"""Live sync of the 1.07 GB wide model (scripts/bench_archive.py's) on loopback
Gloo, against a bare torch.distributed broadcast of the same bytes in the same
run, while the receiver serves requests on 4 threads.

    python scripts/bench_sync.py FOLDER RECEIVER_BINARY [SYNCS]

Prints one JSON object: per sync the sync's and the bare broadcast's seconds,
the median and worst throughput ratio (bare / sync: 1.0 is a sync as fast as
the bare broadcast) over every sync but the first, and the receiver's request
latency quiet and during syncs."""

import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_archive  # noqa: E402


def main():
    folder, binary = sys.argv[1], sys.argv[2]
    syncs = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    bench_archive.make(folder)
    model = os.path.join(folder, "wide.pt")
    port_file = os.path.join(folder, "sync.port")
    if os.path.exists(port_file):
        os.remove(port_file)
    receiver = subprocess.Popen(
        [binary, "--model", model, "--input-shape", "1,4096", "--port-file", port_file, "--syncs", str(syncs),
         "--workers", os.environ.get("SYNC_BENCH_WORKERS", "4"), "--seconds", "600", "--channel", "bench"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        for _ in range(6000):
            if os.path.exists(port_file) and open(port_file).read().strip():
                break
            time.sleep(0.05)
        time.sleep(3)  # the quiet run: requests without syncs
        here = os.path.dirname(os.path.abspath(__file__))
        trainer = subprocess.run(
            [sys.executable, os.path.join(here, "sync_trainer.py"), "--port", open(port_file).read().strip(),
             "--model", model, "--syncs", str(syncs), "--raw", "--cheap-steps", "--channel", "bench",
             "--threads", "1", "--timeout", "120"],
            stdout=subprocess.PIPE, text=True, check=True,
        )
        out, _ = receiver.communicate(timeout=600)
    finally:
        receiver.kill()
    if os.environ.get("SYNC_BENCH_VERBOSE"):
        print(out, trainer.stdout, file=sys.stderr)
    sent = [json.loads(line) for line in trainer.stdout.splitlines()]
    summary = next(json.loads(line) for line in out.splitlines() if '"summary"' in line)
    # The first sync also makes the receiver's standby copy of the model, and
    # the first bare broadcast the receiver's buffer: shown, not in the ratio.
    steady = sent[1:] or sent
    ratios = [s["raw_seconds"] / s["seconds"] for s in steady]
    print(json.dumps({
        "bytes": sent[0]["bytes"],
        "buckets": sent[0]["buckets"],
        "sync_seconds": [s["seconds"] for s in sent],
        "raw_seconds": [s["raw_seconds"] for s in sent],
        "sync_median": statistics.median(s["seconds"] for s in steady),
        "raw_median": statistics.median(s["raw_seconds"] for s in steady),
        "throughput_ratio_median": statistics.median(ratios),
        "throughput_ratio_worst": min(ratios),
        "quiet": summary["quiet"],
        "during_syncs": summary["during_syncs"],
        "p99_ratio": (summary["during_syncs"]["p99_ms"] or 0) / (summary["quiet"]["p99_ms"] or 1),
        "mixed": summary["mixed"],
    }))


if __name__ == "__main__":
    main()

"""Live sync of the 1.07 GB wide model (scripts/bench_archive.py's) on loopback
Gloo, against a bare torch.distributed broadcast of the same bytes in the same
run, while the receiver serves requests on 4 threads.

    python scripts/bench_sync.py FOLDER RECEIVER_BINARY [SYNCS]
    python scripts/bench_sync.py FOLDER RECEIVER_BINARY SYNCS deep

`deep`: the 28,000-tensor model instead (no requests), also against what a
hand-written sync loop does: one torch.distributed broadcast per tensor, between
two Python processes.

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


PER_TENSOR = """
import sys, time, torch, torch.distributed as dist
from datetime import timedelta
rank, port, model = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
store = dist.TCPStore("127.0.0.1", port, 2, rank == 0, timedelta(seconds=120))
options = dist.ProcessGroupGloo._Options()
options._timeout = timedelta(seconds=120)
options._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
group = dist.ProcessGroupGloo(store, rank, 2, options)
tensors = [t.contiguous() for t in torch.jit.load(model).state_dict().values()]
best = None
for _ in range(2):
    start = time.perf_counter()
    for work in [group.broadcast(t, 0) for t in tensors]:
        work.wait()
    best = min(best or 1e9, time.perf_counter() - start)
if rank == 0:
    print(best)
"""


def per_tensor(model):
    """Seconds of one torch.distributed broadcast per tensor (best of 2)."""
    port = free_port()
    peer = subprocess.Popen([sys.executable, "-c", PER_TENSOR, "1", str(port), model])
    try:
        out = subprocess.run([sys.executable, "-c", PER_TENSOR, "0", str(port), model],
                             stdout=subprocess.PIPE, text=True, check=True).stdout
    finally:
        peer.wait(timeout=300)
    return float(out.strip())


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    folder, binary = sys.argv[1], sys.argv[2]
    syncs = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    deep = len(sys.argv) > 4 and sys.argv[4] == "deep"
    bench_archive.make(folder)
    model = os.path.join(folder, "deep.pt" if deep else "wide.pt")
    port_file = os.path.join(folder, "sync.port")
    if os.path.exists(port_file):
        os.remove(port_file)
    receiver = subprocess.Popen(
        [binary, "--model", model, "--input-shape", "1,64" if deep else "1,4096", "--port-file", port_file,
         "--syncs", str(syncs), "--workers", "0" if deep else os.environ.get("SYNC_BENCH_WORKERS", "4"),
         "--seconds", "600", "--channel", "bench"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        for _ in range(6000):
            if os.path.exists(port_file) and open(port_file).read().strip():
                break
            time.sleep(0.05)
        if not deep:
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
    result = {
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
    }
    if deep:
        result["per_tensor_seconds"] = per_tensor(model)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

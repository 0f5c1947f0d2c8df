#!/usr/bin/env bash
# Live weight sync, end to end: a PyTorch "trainer" (scripts/sync_trainer.py,
# through python/transplant_sync.py) changes its weights and syncs them N times
# over torch.distributed (TCPStore + Gloo, loopback) into a Rust service that
# serves the same network on 4 threads meanwhile (examples/sync_serve.rs).
# Then a trainer is killed (SIGKILL) in the middle of a sync, and a new one
# syncs once more. Prints syncs done, responses that mixed two weight sets
# (must be 0), the largest difference between the service's outputs and the
# trainer's own after each sync (must be 0: same dtype), sync time against a
# bare torch.distributed broadcast of the same bytes, and what the killed sync
# did to the service (nothing).
#
#   scripts/sync_demo.sh [N]        (N syncs, 20 by default; scripts/test.sh runs 5)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
n="${1:-20}"

scripts/setup.sh >/dev/null
scripts/fixtures.sh >/dev/null
cargo build --quiet --example sync_serve

py=.venv/bin/python
fixtures=target/fixtures
out=target/sync_demo
rm -rf "$out"
mkdir -p "$out"
pids=()
cleanup() { for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

# exec: the background trainer's pid is python's own, for kill -9.
trainer() { exec "$py" scripts/sync_trainer.py --port "$(cat "$out/port")" --model "$fixtures/bn_net_a.pt" \
  --input "$fixtures/bn_net.expected.safetensors" --out "$out" --threads 1 "$@"; }

echo "service: examples/sync_serve serving bn_net_b.pt (BatchNorm network) on 4 threads"
target/debug/examples/sync_serve --model "$fixtures/bn_net_b.pt" --input "$fixtures/bn_net.expected.safetensors" \
  --expected "$out" --port-file "$out/port" --syncs "$((n + 1))" --seconds 300 --workers 4 >"$out/service.jsonl" &
service=$!
pids+=("$service")
for _ in $(seq 600); do [ -s "$out/port" ] && break; sleep 0.1; done
[ -s "$out/port" ] || { echo "the service did not start" >&2; exit 1; }
echo "trainer 1: bn_net_a.pt, $n syncs (each followed by a bare broadcast of the same bytes)"
(trainer --syncs "$n" --raw >"$out/trainer1.jsonl")

echo "trainer 2: killed (SIGKILL) after the first bucket of its first sync"
(trainer --syncs 1 --bucket-bytes 1024 --pause-after-bucket 0:120 >"$out/trainer2.jsonl" 2>"$out/trainer2.err") &
killed=$!
pids+=("$killed")
for _ in $(seq 600); do [ -e "$out/expected_2_1.safetensors" ] && break; sleep 0.1; done
sleep 1
kill -9 "$killed"
wait "$killed" 2>/dev/null || true

echo "trainer 3: one more sync"
(trainer --syncs 1 >"$out/trainer3.jsonl")
wait "$service"

"$py" - "$out" "$n" <<'PY'
import json, statistics, sys
out, n = sys.argv[1], int(sys.argv[2])
lines = [json.loads(l) for l in open(f"{out}/service.jsonl")]
summary = next(l for l in lines if l.get("summary"))
syncs = [l for l in lines if "generation" in l and "sync" in l]
refused = [l for l in lines if "refused" in l and not l.get("summary")]
trainer = [json.loads(l) for l in open(f"{out}/trainer1.jsonl")]
ratios = [t["seconds"] / t["raw_seconds"] for t in trainer]
print(f"\nsyncs done:              {summary['syncs']} ({n} + 1 after the killed trainer)")
print(f"requests served:         {summary['requests']} on 4 threads")
print(f"mixed responses:         {summary['mixed']}")
print(f"largest output diff:     {summary['max_diff']} (service vs trainer, after each sync)")
print(f"sync time:               median {statistics.median(t['seconds'] for t in trainer) * 1e3:.2f} ms for "
      f"{trainer[0]['bytes']} bytes in {trainer[0]['buckets']} bucket(s); bare broadcast of the same bytes "
      f"{statistics.median(t['raw_seconds'] for t in trainer) * 1e3:.2f} ms: {statistics.median(ratios):.2f}x")
for r in refused:
    print(f"killed trainer's sync:   refused, still serving generation {r['generation']}: {r['refused'][:160]}")
print(f"request latency:         quiet p99 {summary['quiet']['p99_ms']:.3f} ms, during syncs p99 "
      f"{summary['during_syncs']['p99_ms']:.3f} ms")
problems = []
if summary["mixed"]: problems.append(f"{summary['mixed']} responses mixed two weight sets")
if summary["max_diff"] != 0: problems.append(f"outputs differ from the trainer's by {summary['max_diff']}")
if summary["syncs"] != n + 1: problems.append(f"{summary['syncs']} syncs went live, not {n + 1}")
if len(refused) != 1 or refused[0]["generation"] != n: problems.append(f"the killed sync: {refused}")
if syncs[-1]["generation"] != n + 1: problems.append("the sync after the killed one did not go live")
if problems:
    sys.exit("sync demo failed: " + "; ".join(problems))
print("ok")
PY

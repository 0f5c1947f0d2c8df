"""A stand-in PyTorch trainer for transplant's live sync (demo, tests, bench).

It loads a model (TorchScript, as a trainer's own module would be), changes its
weights before every sync as a training step would, saves what the model then
computes on a fixed input (so that receivers can check theirs), and syncs
through python/transplant_sync.py. One JSON line per sync on stdout.

    python scripts/sync_trainer.py --port P --model m.pt --input in.safetensors \
        --out DIR [--syncs N] [--receivers R] [--bucket-bytes B] [--raw] \
        [--pause-after-bucket B:SECONDS] [--corrupt-bucket B] [--resize NAME]
"""

import argparse
import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import transplant_sync  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--channel", default="default")
    parser.add_argument("--serve-store", action="store_true", help="serve the TCPStore from this process")
    parser.add_argument("--receivers", type=int, default=1)
    parser.add_argument("--model", required=True)
    parser.add_argument("--input", help="a safetensors file whose `input` the model runs on")
    parser.add_argument("--out", help="folder for expected_<session>_<sync>.safetensors")
    parser.add_argument("--syncs", type=int, default=1)
    parser.add_argument("--bucket-bytes", type=int, default=64 << 20)
    parser.add_argument("--timeout", type=float, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--raw", action="store_true", help="also time a bare broadcast of the same bytes")
    parser.add_argument("--pause-after-bucket", help="B:SECONDS, in the first sync (to be killed there)")
    parser.add_argument("--corrupt-bucket", type=int)
    parser.add_argument("--fail-after-bucket", type=int, help="raise in the first sync after this bucket")
    parser.add_argument("--resize", help="announce this tensor with one more row")
    parser.add_argument("--cheap-steps", action="store_true", help="change weights by a constant (large models)")
    parser.add_argument("--save-state", action="store_true", help="also save state_<session>_<sync>.safetensors")
    parser.add_argument("--dtensor", action="store_true", help="sync DTensors (sharded on a 1-rank mesh), as FSDP2 holds them")
    parser.add_argument("--fsdp", action="store_true", help="train an eager copy sharded by FSDP2 (fully_shard, 1 rank) and sync transplant_sync.full_state_dict(model)")
    parser.add_argument("--break-at-sync", help="K:NAME: at the K-th sync, send NAME as float64 (the sync must fail before it starts)")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    model = torch.jit.load(args.model)
    model.eval()
    state = model
    if args.resize:
        state = dict(model.state_dict())
        t = state[args.resize]
        state[args.resize] = torch.cat([t, t[:1]])
    fresh = None  # what each sync sends, made anew (None: `state`)
    if args.fsdp:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        scripted = model
        # An eager module with the scripted one's submodules and values, sharded.
        model = torch.nn.Module()
        for name, child in scripted.named_children():
            weight = child.weight
            layer = torch.nn.Linear(weight.shape[1], weight.shape[0])
            layer.load_state_dict({"weight": weight, "bias": child.bias})
            setattr(model, name, layer)
        fully_shard(model, mesh=init_device_mesh("cpu", (1,)))

        def fresh():
            return transplant_sync.full_state_dict(model)

        state = fresh()
        kinds = sorted({type(t).__name__ for t in model.state_dict().values()})
        print(json.dumps({"fsdp": kinds}), flush=True)
    if args.dtensor:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        mesh = init_device_mesh("cpu", (1,))

        def dtensors():
            return {
                n: distribute_tensor(t.detach(), mesh, [Shard(0)]) if t.dim() > 0 else t
                for n, t in model.state_dict().items()
            }

        fresh = dtensors
        state = dtensors()
        kinds = sorted({type(t).__name__ for t in state.values()})
        print(json.dumps({"state": kinds}), flush=True)
    x = load_file(args.input)["input"] if args.input else None
    from datetime import timedelta

    try:
        sender = transplant_sync.Sender(
            args.host,
            args.port,
            args.receivers,
            state,
            channel=args.channel,
            serve_store=args.serve_store,
            bucket_bytes=args.bucket_bytes,
            timeout=timedelta(seconds=args.timeout),
        )
    except transplant_sync.SyncError as e:
        print(json.dumps({"error": str(e)}), flush=True)
        sys.exit(3)
    if args.pause_after_bucket:
        bucket, seconds = args.pause_after_bucket.split(":")
        sender._pause_after_bucket = (int(bucket), float(seconds))
    if args.corrupt_bucket is not None:
        sender._corrupt_bucket = args.corrupt_bucket
    if args.fail_after_bucket is not None:
        sender._fail_after_bucket = args.fail_after_bucket
    failed = 0
    if args.raw:
        sender.raw_broadcast(sender.bytes_per_sync)  # the first bare broadcast warms the way
    for k in range(args.syncs):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1e-3 if args.cheap_steps else torch.randn_like(p) * 0.01)
            for name, b in model.named_buffers():
                if b.is_floating_point():
                    b.mul_(0.99).add_(0.01)
        # The number this sync gets (a bare broadcast, with --raw, goes first).
        number = sender.next_sync + (1 if args.raw else 0)
        if x is not None and args.out and not args.fsdp:
            with torch.no_grad():
                y = model(x)
            save_file({"output": y.contiguous()}, os.path.join(args.out, f"expected_{sender.session}_{number}.safetensors"))
        if args.save_state and args.out:
            values = fresh() if fresh else model.state_dict()
            tensors = {n: transplant_sync._plain(t).detach().contiguous() for n, t in values.items()}
            save_file(tensors, os.path.join(args.out, f"state_{sender.session}_{number}.safetensors"))
        try:
            # The bare broadcast of the same bytes comes first: a receiver may
            # stop once its last sync went live.
            raw = sender.raw_broadcast(sender.bytes_per_sync) if args.raw else None
            sent = fresh() if fresh else state
            if args.break_at_sync and int(args.break_at_sync.split(":")[0]) == k + 1:
                name = args.break_at_sync.split(":", 1)[1]
                sent = dict(model.state_dict() if isinstance(sent, torch.nn.Module) else sent)
                sent[name] = sent[name].double()
            result = sender.sync(sent)
        except (transplant_sync.SyncError, RuntimeError) as e:
            failed += 1
            print(json.dumps({"sync": k + 1, "error": str(e)}), flush=True)
            continue
        if raw is not None:
            result["raw_seconds"] = raw
        result["store_keys"] = sender._tcp.num_keys()
        print(json.dumps(result), flush=True)
    sender.close()
    # A Gloo group whose sync failed may still be tearing down on its own
    # thread (close() waits 2 s for it); leaving through the interpreter's
    # shutdown then aborts in C++ ("terminate called without an active
    # exception"). The result is printed: leave at once.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(4 if failed else 0)


if __name__ == "__main__":
    main()

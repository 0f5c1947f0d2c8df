"""A hostile (or badly broken) peer of a transplant sync receiver, for tests/sync.rs.

It reaches the receiver's store as anyone on the network could and writes what
a buggy trainer or an attacker might: a session counter that is no number,
sessions that never announce, malformed announcements, syncs of absurd or
negative sizes, buckets longer than agreed, garbage keys, raw TCP bytes,
thousands of sessions. After each attack a legitimate sender
(python/transplant_sync.py) syncs the model once; one JSON line per attack:
{"attack", "detail", "legit": null or the legitimate sync's error}.

    python scripts/sync_hostile.py --port P --channel C --model split_attn.pt
"""

import argparse
import json
import os
import socket
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import transplant_sync  # noqa: E402

HOST = "127.0.0.1"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--channel", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--only", help="run only the attacks whose names contain this")
    args = parser.parse_args()
    model = torch.jit.load(args.model)
    port, channel = args.port, args.channel
    prefix = f"transplant/{channel}/"

    def client(timeout=10):
        tcp = dist.TCPStore(HOST, port, None, False, timedelta(seconds=timeout), wait_for_workers=False)
        return tcp, transplant_sync._Keys(tcp, prefix)

    def legit():
        for attempt in range(2):
            try:
                with transplant_sync.Sender(
                    HOST, port, 1, model, channel=channel, bucket_bytes=256, timeout=timedelta(seconds=20)
                ) as sender:
                    sender.sync(model)
                return None
            except Exception as e:  # noqa: BLE001 -- reported, the test decides
                error = f"{type(e).__name__}: {e}"
                time.sleep(1)
        return error

    def announcement(**changes):
        state = model.state_dict()
        entries = [
            {"name": n, "role": "parameter", "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
            for n, t in state.items()
        ]
        value = {"protocol": 2, "origin": "hostile", "receivers": 1, "bucket_bytes": 256, "entries": entries, "ties": []}
        value.update(changes)
        return value

    def announce(payload, wait=20):
        """A new session announcing `payload` (bytes); the layout the receiver answers with."""
        _, store = client()
        session = store.add("session", 1)
        store.set(f"{session}/entries", payload)
        store.wait(f"{session}/layout", timedelta(seconds=wait))
        return session, json.loads(store.get(f"{session}/layout"))

    def joined_session():
        """A session joined as the sender would (the model's own entries), its
        Gloo group, store and layout."""
        tcp, store = client()
        session, layout = announce(json.dumps(announcement()).encode())
        assert not layout.get("error"), layout
        options = dist.ProcessGroupGloo._Options()
        options._timeout = timedelta(seconds=5)
        options._devices = [dist.ProcessGroupGloo.create_device(hostname=HOST)]
        scoped = transplant_sync._Keys(tcp, f"{prefix}{session}/")
        group = dist.ProcessGroupGloo(dist.PrefixStore(f"{prefix}{session}/gloo", tcp), 0, 2, options)
        return tcp, scoped, group, layout

    def ack(store, sync=1, wait=20):
        try:
            store.wait(f"ack/{sync}/1", timedelta(seconds=wait))
        except Exception as e:  # noqa: BLE001
            return f"no answer: {type(e).__name__}"
        return json.loads(store.get(f"ack/{sync}/1")).get("error")

    attacks = []

    def attack(fn):
        attacks.append(fn)
        return fn

    @attack
    def session_counter_not_a_number():
        _, store = client()
        store.set("session", b"not a number")
        time.sleep(1.5)  # the receiver puts it back
        return store.get("session").decode()

    @attack
    def session_counter_behind():
        _, store = client()
        store.set("session", b"-5")
        time.sleep(1.5)
        return store.get("session").decode()

    @attack
    def sessions_that_never_announce():
        _, store = client()
        return [store.add("session", 1) for _ in range(3)]

    @attack
    def thousands_of_sessions():
        _, store = client()
        last = 0
        for i in range(2000):
            last = store.add("session", 1)
            if i % 100 == 0:
                store.set(f"{last}/entries", b"{")
        return last

    malformed = {
        "not_json": b"\xff{",
        "protocol_99": json.dumps(announcement(protocol=99)).encode(),
        "2^64_elements": json.dumps(announcement(entries=[{"name": "x", "dtype": "uint8", "shape": [2**32, 2**32]}])).encode(),
        "negative_size": json.dumps(announcement(entries=[{"name": "x", "dtype": "float32", "shape": [-4, 8]}])).encode(),
        "unknown_dtype": json.dumps(announcement(entries=[{"name": "x", "dtype": "float128", "shape": [4]}])).encode(),
        "ties_to_nowhere": json.dumps(announcement(ties=[[0, 99999]])).encode(),
        "a_million_receivers": json.dumps(announcement(receivers=10**6)).encode(),
        "a_huge_bucket_size": json.dumps(announcement(bucket_bytes=2**64 - 1)).encode(),
        "ten_megabytes_refused": json.dumps(announcement(protocol=99, origin="\x1b[31m" + "x" * (10 << 20))).encode(),
    }
    for name, payload in malformed.items():

        def malformed_announcement(payload=payload):
            return announce(payload)[1].get("error", "accepted")[:200]

        malformed_announcement.__name__ = f"announcement_{name}"
        attack(malformed_announcement)

    @attack
    def raw_sync_of_2_to_the_40_bytes():
        tcp, store, group, _ = joined_session()
        store.set("sync/1", json.dumps({"kind": "raw", "bytes": 2**40}).encode())
        return ack(store)

    @attack
    def raw_sync_of_minus_one_bytes():
        tcp, store, group, _ = joined_session()
        store.set("sync/1", json.dumps({"kind": "raw", "bytes": -1}).encode())
        time.sleep(1)
        return "sent"

    @attack
    def sync_announcement_not_json():
        tcp, store, group, _ = joined_session()
        store.set("sync/1", b"\xfe\xff")
        time.sleep(1)
        return "sent"

    @attack
    def first_bucket_4_kb_longer_than_the_layout():
        tcp, store, group, layout = joined_session()
        sizes = [b["bytes"] for b in layout["buckets"]]
        sizes[0] += 4096
        store.set("sync/1", json.dumps({"kind": "weights", "buckets": sizes}).encode())
        work = group.broadcast(torch.zeros(sizes[0], dtype=torch.uint8), 0)
        answer = ack(store)
        try:
            work.wait()
        except Exception as e:  # noqa: BLE001
            answer = f"{answer} / broadcast: {type(e).__name__}"
        return answer

    @attack
    def weights_without_sizes():
        tcp, store, group, _ = joined_session()
        store.set("sync/1", json.dumps({"kind": "weights"}).encode())
        time.sleep(1)
        return "sent"

    @attack
    def garbage_keys():
        _, store = client()
        for i in range(200):
            store.set(f"{i}/sync/{i}", os.urandom(64))
            store.set(f"garbage/{i}", os.urandom(1024))
        for i in range(200):
            store.delete_key(f"garbage/{i}")
        return "written"

    @attack
    def raw_tcp_client():
        with socket.create_connection((HOST, port), timeout=5) as s:
            s.sendall(os.urandom(1 << 16))
        sockets = [socket.create_connection((HOST, port), timeout=5) for _ in range(200)]
        for s in sockets:
            s.sendall(b"\x00\x01garbage")
        time.sleep(0.5)
        for s in sockets:
            s.close()
        return "sent"

    print(json.dumps({"attack": "first_legit_sync", "detail": None, "legit": legit()}), flush=True)
    for fn in attacks:
        if args.only and args.only not in fn.__name__:
            continue
        try:
            detail = fn()
        except Exception as e:  # noqa: BLE001 -- the attacker's own failure, reported
            detail = f"attacker: {type(e).__name__}: {e}"[:300]
        print(json.dumps({"attack": fn.__name__, "detail": detail, "legit": legit()}, default=str), flush=True)


if __name__ == "__main__":
    main()

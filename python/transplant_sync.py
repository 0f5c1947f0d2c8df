"""Send a PyTorch model's weights to transplant receivers, over torch.distributed.

A training loop (or anything holding a ``state_dict``) pushes fresh weights into
models that Rust services serve with transplant (``transplant::sync::Receiver``
into a ``ModelSlot``). Each receiver plans the sender's tensors against its own
model with its own rules -- other names, fused ``qkv`` from separate ``q``,
``k``, ``v``, other dtypes -- and swaps the new weights in only when every byte
arrived and checked: a sync is taken whole or not at all.

Only ``torch`` is needed. The transport is ``torch.distributed``'s own: a
``TCPStore`` to meet, a Gloo process group to broadcast the bytes; the protocol
is described in transplant's ``src/sync/mod.rs``::

    import transplant_sync

    sender = transplant_sync.Sender("127.0.0.1", 29600, receivers=2, state=model)
    for step in range(steps):
        train_step(model)
        if step % 100 == 0:
            sender.sync(model)          # every receiver now serves these weights
    sender.close()

``state`` is an ``nn.Module`` (its ``state_dict()``; parameters and buffers are
told apart) or a mapping of names to tensors. A model sharded with FSDP or
DTensors: gather its full state dict on every rank of the training group with
:func:`full_state_dict` and sync it from one rank; a ``DTensor`` value is
gathered with ``full_tensor()``.
"""

import functools
import json
import os
import socket
import threading
import time
import zlib
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["Sender", "SyncError", "full_state_dict"]

PROTOCOL = 2
DIGEST = "crc32"  # zlib.crc32 of each bucket's bytes, little-endian


class SyncError(RuntimeError):
    """A sync, or the start of a session, failed; the receivers keep their weights."""


def full_state_dict(model):
    """The full (unsharded) state dict of an FSDP / DTensor model, on the CPU.

    A collective: call it on every rank of the training group."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _plain(tensor):
    """A DTensor gathered whole; any other tensor as it is."""
    if type(tensor).__name__ == "DTensor":
        return tensor.full_tensor()
    return tensor


def _tensors(state):
    """name -> tensor, from a module (its state_dict: detached) or a mapping."""
    if isinstance(state, torch.nn.Module):
        return state.state_dict(keep_vars=False)
    return dict(state)


def _buffers(state):
    """The names of a module's buffers; None for a mapping (roles unknown)."""
    if isinstance(state, torch.nn.Module):
        return {name for name, _ in state.named_buffers()}
    return None


def _ties(names, tensors):
    """Groups of entries that are one tensor (the same memory, seen the same
    way): sent once. Only plain tensors: a subclass (DTensor) may report any
    data_ptr, and its entries are sent each on its own."""
    groups = {}
    for i, name in enumerate(names):
        t = tensors[name]
        if type(t) not in (torch.Tensor, torch.nn.Parameter) or t.numel() == 0 or t.data_ptr() == 0:
            continue
        key = (t.device, t.dtype, t.data_ptr(), tuple(t.shape), tuple(t.stride()))
        groups.setdefault(key, []).append(i)
    return sorted(g for g in groups.values() if len(g) > 1)


def _json(value):
    return json.dumps(value).encode()


def _said(error):
    """An exception's message, as a person reads it: its first line (c10d adds
    C++ frames), without Gloo's sign-off."""
    lines = str(error).strip().splitlines() or [type(error).__name__]
    return lines[0].replace(" GLHF! \U0001f3d6\ufe0f", "").replace("GLHF! \U0001f3d6\ufe0f", "").strip()


def _sync_errors(what):
    """Every failure of the decorated method as a :class:`SyncError`, its cause kept."""

    def wrap(method):
        @functools.wraps(method)
        def run(self, *args, **kwargs):
            try:
                return method(self, *args, **kwargs)
            except SyncError:
                raise
            except Exception as e:  # torch's DistError, RuntimeError, OSError, ...
                raise SyncError(f"{what}: {_said(e)}") from e

        return run

    return wrap


def _reachable(host, port, timeout):
    """Waits until something listens at host:port, at most ``timeout``
    (c10d's client retries past its own timeout when nothing does)."""
    deadline = time.monotonic() + timeout.total_seconds()
    while True:
        try:
            with socket.create_connection((host, port), timeout=max(0.1, deadline - time.monotonic())):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise SyncError(f"no store answers at {host}:{port} within {timeout}: {e}") from e
            time.sleep(0.1)


class _Keys:
    """A store's keys under a prefix, joined as text (c10d's ``PrefixStore``
    puts a ``/`` after every prefix: ``a//1//layout``)."""

    def __init__(self, tcp, prefix):
        self.tcp, self.prefix = tcp, prefix

    def set(self, key, value):
        self.tcp.set(self.prefix + key, value)

    def get(self, key):
        return self.tcp.get(self.prefix + key)

    def add(self, key, delta):
        return self.tcp.add(self.prefix + key, delta)

    def wait(self, key, timeout):
        self.tcp.wait([self.prefix + key], timeout)

    def delete_key(self, key):
        self.tcp.delete_key(self.prefix + key)


def _dropped(group):
    """Lets go of a Gloo group (its destructor waits for operations in flight)."""
    del group


class Sender:
    """Rank 0 of a sync session with ``receivers`` transplant receivers.

    Connecting announces the entries of ``state`` and waits until every
    receiver planned them: a receiver that cannot take them (a missing or
    resized tensor, an unmatched name) makes this raise :class:`SyncError`
    with its reason, and nothing is sent.

    Every failure is a :class:`SyncError` (its ``__cause__`` the transport's
    exception). After a sync failed, the next :meth:`sync` starts a new
    session first (or :meth:`reconnect` does): no new ``Sender`` is needed.
    :meth:`close` (or leaving a ``with`` block) ends the session, never
    raises, and releases the store's port where this sender serves it."""

    @_sync_errors("starting a sync session")
    def __init__(
        self,
        host,
        port,
        receivers,
        state,
        *,
        channel="default",
        serve_store=False,
        bucket_bytes=64 << 20,
        timeout=timedelta(seconds=60),
        hostname=None,
    ):
        self._tcp = self._group = self._store = None
        self._closed = False
        if receivers < 1:
            raise SyncError("a sync needs at least one receiver")
        self.receivers = receivers
        self.timeout = timeout
        self._host, self._channel, self._hostname = host, channel, hostname or host
        self._bucket_bytes = int(bucket_bytes)
        self._corrupt_bucket = None  # test hook: flip a byte after its digest is computed
        self._pause_after_bucket = None  # test hook: (bucket, seconds)
        self._fail_after_bucket = None  # test hook: raise after sending this bucket
        self._failed = None  # why the session ended (a sync failed), if it did
        self._port, self._serve_store = port, serve_store
        if serve_store:
            self._tcp = dist.TCPStore(host, port, None, True, timeout, wait_for_workers=False)
        self._connect(state)

    @_sync_errors("starting a sync session")
    def reconnect(self, state):
        """Starts a new session with the entries of ``state`` (the last one's
        group is let go: its receivers leave it and join the new one)."""
        if self._closed:
            raise SyncError("this sender is closed")
        self._connect(state)

    def _connect(self, state):
        self._release_group(wait=0)
        self._failed = "a new session is starting"
        if not self._serve_store:
            # A store served elsewhere may have gone and come back (a receiver restarted).
            self._tcp = None
            _reachable(self._host, self._port, self.timeout)
            self._tcp = dist.TCPStore(self._host, self._port, None, False, self.timeout, wait_for_workers=False)
        channel = _Keys(self._tcp, f"transplant/{self._channel}/")
        self.session = channel.add("session", 1)
        prefix = f"transplant/{self._channel}/{self.session}/"
        self._store = _Keys(self._tcp, prefix)
        tensors, buffers = _tensors(state), _buffers(state)
        self._names = list(tensors)
        entries, self._dtypes, self._shapes = [], [], []
        for name in self._names:
            t = _plain(tensors[name])
            self._dtypes.append(t.dtype)
            self._shapes.append(t.shape)
            entry = {"name": name, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
            if buffers is not None:
                entry["role"] = "buffer" if name in buffers else "parameter"
            entries.append(entry)
        self._entries = entries
        announcement = {
            "protocol": PROTOCOL,
            "origin": f"{type(state).__name__} from python pid {os.getpid()}",
            "receivers": self.receivers,
            "bucket_bytes": self._bucket_bytes,
            "entries": entries,
            "ties": _ties(self._names, tensors),
        }
        self._store.set("entries", _json(announcement))
        layout = json.loads(self._get("layout", "no receiver answered (is receiver 1 running on this channel?)"))
        if layout.get("error"):
            raise SyncError(f"the receivers refused the transfer: {layout['error']}")
        if layout.get("digest") != DIGEST:
            raise SyncError(f"the layout's digest is {layout.get('digest')!r}; this sender computes {DIGEST}")
        self._buckets = layout["buckets"]
        options = dist.ProcessGroupGloo._Options()
        options._timeout = self.timeout
        options._devices = [dist.ProcessGroupGloo.create_device(hostname=self._hostname)]
        self._group = dist.ProcessGroupGloo(
            dist.PrefixStore(prefix + "gloo", self._tcp), 0, self.receivers + 1, options
        )
        largest = max((b["bytes"] for b in self._buckets), default=0)
        self._buffers = [torch.zeros(largest, dtype=torch.uint8) for _ in range(2)]
        self._views = [None] * len(self._buckets)  # per bucket, its tensors' views of its buffer
        self._next = 1
        self._failed = None

    def _release_group(self, wait):
        """Lets go of the session's group on a thread of its own (its
        destructor waits for operations in flight), waiting up to ``wait``
        seconds for it."""
        group, self._group = self._group, None
        if group is not None:
            dropper = threading.Thread(target=_dropped, args=(group,), daemon=True)
            del group
            dropper.start()
            dropper.join(wait)

    @property
    def bytes_per_sync(self):
        """Bytes of each sync's buckets (the digests add 4 bytes a bucket)."""
        return sum(b["bytes"] for b in self._buckets)

    @property
    def next_sync(self):
        """The number the next sync (or bare broadcast) of this session gets."""
        return self._next

    def _get(self, key, why):
        try:
            self._store.wait(key, self.timeout)
        except Exception as e:  # DistStoreError on timeout
            raise SyncError(f"{why}: {self._store.prefix}{key} did not appear within {self.timeout}") from e
        return self._store.get(key)

    def _announce(self, what):
        sync = self._next
        self._next += 1
        self._store.set(f"sync/{sync}", _json(what))
        return sync

    def _answers(self, sync):
        refused = []
        for rank in range(1, self.receivers + 1):
            ack = json.loads(self._get(f"ack/{sync}/{rank}", f"receiver {rank} did not answer sync {sync}"))
            if ack.get("error"):
                refused.append(f"receiver {rank}: {ack['error']}")
        # Every receiver has read them: a long session does not grow the store.
        self._store.delete_key(f"sync/{sync}")
        for rank in range(1, self.receivers + 1):
            self._store.delete_key(f"ack/{sync}/{rank}")
        if refused:
            raise SyncError(f"sync {sync} was refused: " + "; ".join(refused))

    @_sync_errors("sync")
    def sync(self, state):
        """Sends the current values of ``state`` (the names, dtypes and shapes
        announced at connect) to every receiver and waits until each took them.
        Returns ``{"session", "sync", "bytes", "buckets", "seconds"}``. After a
        failed sync, starts a new session first."""
        if self._closed:
            raise SyncError("this sender is closed")
        if self._failed is not None:
            self._connect(state)
        start = time.perf_counter()
        tensors = _tensors(state)
        if list(tensors) != self._names:
            raise SyncError("the state's names are not the ones announced: call reconnect(state)")
        # Every tensor is checked before the sync is announced: a sync that
        # began is never abandoned half way by this side.
        needed = sorted({index for bucket in self._buckets for index, _, _ in bucket["tensors"]})
        sources = {index: self._checked(index, tensors) for index in needed}
        sync = self._run(
            {"kind": "weights", "buckets": [b["bytes"] for b in self._buckets]},
            lambda sync: self._transfer(sync, sources),
        )
        return {
            "session": self.session,
            "sync": sync,
            "bytes": self.bytes_per_sync,
            "buckets": len(self._buckets),
            "seconds": time.perf_counter() - start,
        }

    def _run(self, announcement, send):
        """Announces a sync, runs ``send(sync)``, then waits for every
        receiver's answer; the sync's number. A failure ends the session:
        receivers wait for the rest of the sync until the group's connections
        close (the group is let go) or their timeout, and anything else sent
        on this group could reach one as a bucket of another size."""
        sync = self._next
        try:
            self._announce(announcement)
            send(sync)
            self._answers(sync)
        except BaseException as e:
            self._failed = f"sync {sync}: {_said(e)}"
            self._release_group(wait=0)
            raise
        return sync

    def _transfer(self, sync, sources):
        """The buckets, then their digests."""
        on_buffer = [None, None]  # (bucket, work) per buffer
        on_tensors = []  # (bucket, work) sent straight from a tensor
        digests = bytearray()
        with torch.no_grad():
            for b, bucket in enumerate(self._buckets):
                corrupt = self._corrupt_bucket == b
                data = None
                whole = bucket["tensors"][0] if len(bucket["tensors"]) == 1 else None
                if whole is not None and whole[1] == 0 and whole[2] == bucket["bytes"] and not corrupt:
                    t = sources[whole[0]]
                    if t.device.type == "cpu" and t.is_contiguous() and t.numel() > 0:
                        data = t.detach().reshape(-1).view(torch.uint8)
                if data is None:
                    buffer = self._buffers[b % 2]
                    if on_buffer[b % 2] is not None:
                        self._wait(on_buffer[b % 2][1], sync, on_buffer[b % 2][0])
                        on_buffer[b % 2] = None
                    self._pack(b, sources)
                    data = buffer[: bucket["bytes"]]
                if corrupt:  # test hook: the digest of the bytes before a fault on the way
                    self._corrupt_bucket = None
                    digests += zlib.crc32(data.numpy()).to_bytes(4, "little")
                    data[0] ^= 0xFF
                    work = self._group.broadcast(data, 0)
                else:
                    # The digest is computed while the bytes travel (it goes last).
                    work = self._group.broadcast(data, 0)
                    digests += zlib.crc32(data.numpy()).to_bytes(4, "little")
                if data.data_ptr() == self._buffers[b % 2].data_ptr():
                    on_buffer[b % 2] = (b, work)
                else:
                    on_tensors.append((b, work))
                if self._pause_after_bucket is not None and self._pause_after_bucket[0] == b:
                    work.wait()
                    time.sleep(self._pause_after_bucket[1])
                if self._fail_after_bucket == b:
                    self._fail_after_bucket = None
                    raise RuntimeError("a failure half way (test hook)")
            for pending in [w for w in on_buffer if w is not None] + on_tensors:
                self._wait(pending[1], sync, pending[0])
            if self._buckets:
                self._wait(self._group.broadcast(torch.frombuffer(digests, dtype=torch.uint8), 0), sync, len(self._buckets) - 1)

    def _checked(self, index, tensors):
        t = _plain(tensors[self._names[index]])
        if t.dtype is not self._dtypes[index] or t.shape != self._shapes[index]:
            raise SyncError(f"{self._names[index]} changed dtype or shape since the session began")
        return t

    def _pack(self, b, sources):
        """Copies bucket ``b``'s tensors into its buffer: one ``_foreach_copy_``
        into views made once per session (a model of 28,000 tensors spent most
        of a sync slicing and checking them one at a time)."""
        if self._views[b] is None:
            buffer = self._buffers[b % 2]
            self._views[b] = [
                buffer[offset : offset + nbytes].view(self._dtypes[index]).view(self._shapes[index])
                for index, offset, nbytes in self._buckets[b]["tensors"]
            ]
        tensors = [sources[index] for index, _, _ in self._buckets[b]["tensors"]]
        views = self._views[b]
        if all(t.device.type == "cpu" for t in tensors):
            torch._foreach_copy_(views, tensors)
        else:
            for view, t in zip(views, tensors):
                view.copy_(t)

    def _wait(self, work, sync, b):
        try:
            work.wait()
        except Exception as e:
            raise SyncError(f"sync {sync}, bucket {b + 1}: {_said(e)} (receivers keep their weights)") from e

    @_sync_errors("bare broadcast")
    def raw_broadcast(self, nbytes):
        """A bare broadcast of ``nbytes`` that receivers take and drop: the
        network's cost for a sync's bytes (at most those: receivers refuse more).
        Seconds until every receiver answered."""
        if self._closed:
            raise SyncError("this sender is closed")
        if self._failed is not None:
            raise SyncError(f"this session ended when {self._failed}: the next sync starts a new one")
        if nbytes > self.bytes_per_sync:
            raise SyncError(f"a bare broadcast of {nbytes} bytes: at most a sync's {self.bytes_per_sync} bytes")
        data = torch.zeros(int(nbytes), dtype=torch.uint8)
        start = time.perf_counter()
        self._run({"kind": "raw", "bytes": int(nbytes)}, lambda sync: self._wait(self._group.broadcast(data, 0), sync, 0))
        return time.perf_counter() - start

    def close(self):
        """Ends the session (the receivers wait for the next sender) and lets
        go of the store, releasing its port where this sender serves it.
        Never raises: a peer or store that is gone has nothing to be told."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        try:
            if self._failed is None and self._store is not None:
                self._announce({"kind": "end"})
        except Exception:  # noqa: BLE001 -- nobody left to tell
            pass
        self._release_group(wait=2)
        self._store = self._tcp = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 -- interpreter shutdown
            pass

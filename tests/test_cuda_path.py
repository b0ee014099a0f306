"""The CUDA branch of extraction, run on a CPU with a fake CUDA API that checks the protocol.

The fake records every call; tensors stay on the CPU, so the whole branch (pinned ring, uploads,
device gather, side-stream copies, events, the writer's synchronisation) runs here and the store
must come out bit for bit the store of the plain CPU path.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from neurostore import extract as ex
from neurostore import transfer

import tiny


class FakeEvent:
    def __init__(self, log: list, blocking: bool) -> None:
        self.log, self.blocking, self.recorded_on, self.synchronized = log, blocking, None, False

    def record(self, stream) -> None:
        self.recorded_on = stream
        self.log.append(("event.record", stream.name))

    def synchronize(self) -> None:
        assert self.recorded_on is not None, "synchronize before record"
        self.synchronized = True


class FakeStream:
    def __init__(self, log: list, name: str) -> None:
        self.log, self.name = log, name

    def wait_stream(self, other: "FakeStream") -> None:
        self.log.append(("wait_stream", self.name, other.name))


class FakeCuda(transfer.CudaApi):
    """Records the protocol; the 'device' is the CPU, named cuda:1 in the log."""

    def __init__(self) -> None:
        self.log: list = []
        self.events: list[FakeEvent] = []
        self.pinned = 0

    def stream(self, device):
        return FakeStream(self.log, f"copy@{device}")

    def current_stream(self, device):
        self.log.append(("current_stream", str(device)))
        return FakeStream(self.log, f"compute@{device}")

    def use_stream(self, stream):
        self.log.append(("use_stream", stream.name))
        return contextlib.nullcontext()

    def use_device(self, device):
        self.log.append(("use_device", str(device)))
        return contextlib.nullcontext()

    def event(self):
        e = FakeEvent(self.log, blocking=True)
        self.events.append(e)
        return e

    def record_stream(self, tensor, stream):
        self.log.append(("record_stream", stream.name))

    def timing_event(self):
        return None  # no timing: the protocol log stays what the test reads

    def empty_pinned(self, shape, dtype):
        self.pinned += 1
        return torch.empty(shape, dtype=dtype)

    def to_device(self, t, device):
        self.log.append(("to_device", "non_blocking"))
        return t.clone()  # a device copy: the staged host buffer may be reused only after the event

    def copy_to_host(self, host, t):
        self.log.append(("copy", "non_blocking"))
        host.copy_(t)


def test_copy_protocol_order():
    api = FakeCuda()
    device = torch.device("cuda:1")  # not the current device: the copy must wait on cuda:1's stream
    copier = transfer.Copier(device, api)
    specs = {"tok:resid": transfer.Spec(10, (2, 3), torch.float16, layer_major=True), "ext:resid": transfer.Spec(2, (2,), torch.float32)}
    ring = transfer.HostRing(specs, 2, api)
    assert api.pinned == 2 * len(specs)  # allocated once, pinned, for the whole run
    slot = ring.acquire()
    values = {"tok:resid": torch.randn(2, 7, 3).half(), "ext:resid": torch.randn(2, 2)}
    api.log.clear()
    rows = copier.to_host(values, slot)
    assert rows == {"tok:resid": 7, "ext:resid": 2}
    log = api.log
    # the copy stream first waits on the compute stream of the tensors' own device
    assert log[0] == ("current_stream", "cuda:1") and log[1] == ("wait_stream", "copy@cuda:1", "compute@cuda:1")
    assert log[2] == ("use_stream", "copy@cuda:1")
    body = log[3:-1]
    assert body == [("copy", "non_blocking"), ("record_stream", "copy@cuda:1")] * 2  # record_stream after each copy
    assert log[-1] == ("event.record", "copy@cuda:1")  # the event is recorded last, on the copy stream
    assert slot.ready is api.events[-1] and slot.ready.blocking
    assert np.array_equal(slot.host("tok:resid", 7), values["tok:resid"].numpy().swapaxes(0, 1))


def _store(path: Path) -> dict[str, np.ndarray]:
    group = zarr.open_group(str(path), mode="r")
    out = {}
    for prefix in ("acts", "pooled/resid", "pooled/mlp"):
        if prefix in group:
            out.update({f"{prefix}/{name}": np.asarray(a[:]) for name, a in group[prefix].arrays()})
    return out


@pytest.mark.parametrize("store_dtype", ["float16", "bfloat16"])
def test_cuda_branch_on_cpu_gives_the_cpu_store(tiny_models, tmp_path, monkeypatch, store_dtype):
    opts = dict(sites=["resid", "mlp"], pool=["first", "mean", "last"], store_dtype=store_dtype, max_batch_tokens=96, buffer_mb=1, device="cpu")
    corpus = tiny.sample_subset(tmp_path / "sample.jsonl")  # 75 sentences: ~30 batches in 2 windows of 1 MB
    plain = tmp_path / "cpu.zarr"
    ex.extract([str(corpus)], str(plain), model=str(tiny_models["bert"]), options=ex.ExtractOptions(**opts))

    api = FakeCuda()
    reads: list[bool] = []
    original_host = transfer.Slot.host

    def checked_host(self, key, rows):  # the writer never reads a slot before its event is synchronized
        if not key.startswith("in:"):
            reads.append(self.ready is None or self.ready.synchronized)
        return original_host(self, key, rows)

    monkeypatch.setattr(transfer, "cuda_api", lambda device: api)
    monkeypatch.setattr(transfer.Slot, "host", checked_host)
    faked = tmp_path / "cuda.zarr"
    res = ex.extract([str(corpus)], str(faked), model=str(tiny_models["bert"]), options=ex.ExtractOptions(**opts))
    assert ("use_device", "cpu") in api.log  # the loop runs under the tensors' device
    assert api.events and all(e.synchronized for e in api.events)
    assert reads and all(reads)
    assert res.meta["complete"]
    a, b = _store(plain), _store(faked)
    assert a.keys() == b.keys() and len([n for n in a if not n.endswith("_layer")]) == 2 + 2 * 3  # and the layer coordinates
    for name in a:
        assert a[name].dtype == b[name].dtype and np.array_equal(a[name].view(np.uint8), b[name].view(np.uint8)), name


def test_gather_on_the_device_never_waits_for_it(monkeypatch):
    """The device gather builds nothing from device values on the host: no nonzero, item, cpu."""
    from neurostore import batching

    padded = batching.pad_host([[1, 2, 3], [4, 5], [6]], 0)
    inputs = {k: torch.from_numpy(v) for k, v in {"ids": padded.ids, "mask": padded.mask, "real": padded.real, "lengths": padded.lengths}.items()}
    layers = [torch.randn(3, 3, 4) for _ in range(2)]

    def refuse(*_a, **_k):
        raise AssertionError("host-device sync inside the gather")

    for name in ("nonzero", "item", "cpu", "tolist", "numpy", "__bool__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    values = ex.gather({"resid": layers}, inputs, True, ["first", "mean", "last"], torch.float16)
    monkeypatch.undo()
    tok = values["tok:resid"]
    assert tok.shape == (2, 6, 4)
    want = torch.stack([torch.cat([h[0, :3], h[1, :2], h[2, :1]]) for h in layers]).half()
    assert torch.equal(tok, want)
    assert torch.equal(values["doc:resid/last"], torch.stack([torch.stack([h[0, 2], h[1, 1], h[2, 0]]) for h in layers]).half())

"""Host buffers that batches travel in, and the CUDA device-to-host copy protocol.

A fixed ring of host buffers (pinned on CUDA) is allocated once, sized for the largest batch of
the plan, and reused: the extraction loop takes a free slot for each batch, the writer hands it
back once it has scattered the batch. Waiting for a free slot is the loop's only back-pressure, so
the forward waits for the writer only when the writer (the disk) is the bottleneck.

On CUDA the copy runs on a side stream: it waits on the compute stream of the tensors' device,
copies non-blocking into the slot, marks the device memory as used by the copy stream
(``record_stream``) and records an event last; the writer synchronizes on that event before
reading the slot. Every CUDA call goes through :class:`CudaApi`, so that tests can run the whole
branch on a CPU with a fake that checks the order of the calls.
"""

from __future__ import annotations

import contextlib
import queue
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch


class CudaApi:
    """The few CUDA calls the copy protocol makes (real ones; tests substitute a fake)."""

    def stream(self, device: torch.device) -> Any:
        return torch.cuda.Stream(device)

    def current_stream(self, device: torch.device) -> Any:
        return torch.cuda.current_stream(device)

    def use_stream(self, stream: Any) -> contextlib.AbstractContextManager:
        return torch.cuda.stream(stream)

    def use_device(self, device: torch.device) -> contextlib.AbstractContextManager:
        return torch.cuda.device(device)

    def event(self) -> Any:
        # blocking: the writer's synchronize() sleeps instead of spinning a core
        return torch.cuda.Event(blocking=True)

    def timing_event(self) -> Any:
        return torch.cuda.Event(enable_timing=True)

    def record_stream(self, tensor: torch.Tensor, stream: Any) -> None:
        tensor.record_stream(stream)

    def empty_pinned(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, pin_memory=True)

    def to_device(self, t: torch.Tensor, device: torch.device) -> torch.Tensor:
        return t.to(device, non_blocking=True)  # from a pinned slot buffer: truly asynchronous

    def copy_to_host(self, host: torch.Tensor, t: torch.Tensor) -> None:
        host.copy_(t, non_blocking=True)


def cuda_api(device: torch.device) -> CudaApi | None:
    """The CUDA calls to use for ``device``: None on a CPU (no copies, no streams)."""
    return CudaApi() if device.type == "cuda" else None


def numpy_view(t: torch.Tensor) -> np.ndarray:
    """A numpy array sharing a host tensor's memory (bfloat16 bits come back as uint16)."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


@dataclass(frozen=True)
class Spec:
    """One buffer of a slot: up to ``rows`` rows of ``inner`` shape.

    ``layer_major`` buffers (activations, ``inner = (n_layers, width)``) hold a batch as
    ``[n_layers, rows, width]``: each layer's rows are one contiguous block from the gather on the
    device to the compressed chunk on disk, which is the layout of a Zarr chunk ``(rows, 1, width)``.
    """

    rows: int
    inner: tuple[int, ...]
    dtype: torch.dtype
    layer_major: bool = False

    @property
    def size(self) -> int:
        return self.rows * int(np.prod(self.inner, dtype=np.int64))


@dataclass
class Slot:
    """One set of host buffers, flat, sized for the largest batch of the plan."""

    index: int
    specs: dict[str, Spec]
    flat: dict[str, torch.Tensor]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # numpy views of the same memory
    ready: Any = None  # CUDA event recorded after the copies into this slot

    def view(self, key: str, rows: int) -> torch.Tensor:
        """The first ``rows`` rows as a contiguous tensor (``[n_layers, rows, width]`` if layer-major)."""
        spec = self.specs[key]
        n = rows * int(np.prod(spec.inner, dtype=np.int64))
        if spec.layer_major:
            return self.flat[key][:n].view(spec.inner[0], rows, *spec.inner[1:])
        return self.flat[key][:n].view(rows, *spec.inner)

    def host(self, key: str, rows: int) -> np.ndarray:
        """The first ``rows`` rows as numpy, rows first (``[rows, n_layers, width]``, a strided view)."""
        spec = self.specs[key]
        n = rows * int(np.prod(spec.inner, dtype=np.int64))
        if spec.layer_major:
            return self.arrays[key][:n].reshape(spec.inner[0], rows, *spec.inner[1:]).swapaxes(0, 1)
        return self.arrays[key][:n].reshape(rows, *spec.inner)


class HostRing:
    """``slots`` reusable host buffer sets; ``acquire`` blocks until the writer released one."""

    def __init__(self, specs: dict[str, Spec], slots: int, api: CudaApi | None = None) -> None:
        self._free: queue.Queue[Slot] = queue.Queue()
        self.slots = slots
        self.waited = 0.0  # seconds the producer spent waiting for a free slot
        self.in_use_samples: list[int] = []
        for i in range(slots):
            flat = {
                key: (api.empty_pinned((spec.size,), spec.dtype) if api is not None else torch.empty((spec.size,), dtype=spec.dtype))
                for key, spec in specs.items()
            }
            self._free.put(Slot(i, specs, flat, {k: numpy_view(t) for k, t in flat.items()}))

    def acquire(self, alive: Callable[[], None] | None = None) -> Slot:
        """A free slot. ``alive`` is called while waiting and raises if the consumer died."""
        self.in_use_samples.append(self.slots - self._free.qsize())
        t0 = time.perf_counter()
        try:
            while True:
                try:
                    slot = self._free.get(timeout=0.2)
                    break
                except queue.Empty:
                    if alive is not None:
                        alive()
        finally:
            self.waited += time.perf_counter() - t0
        slot.ready = None
        return slot

    def release(self, slot: Slot) -> None:
        self._free.put(slot)

    def occupancy(self) -> dict:
        """How full the ring was when the loop asked for a slot: the writer's backlog."""
        s = self.in_use_samples
        return {"slots": self.slots, "mean_in_use": float(np.mean(s)) if s else 0.0, "max_in_use": int(max(s)) if s else 0,
                "full": int(sum(1 for x in s if x >= self.slots))}


class Copier:
    """Device-to-host copies of one batch into a ring slot, on a side stream of ``device``."""

    def __init__(self, device: torch.device, api: CudaApi) -> None:
        self.device, self.api = device, api
        self.stream = api.stream(device)
        self.spans: list[tuple[Any, Any]] = []  # timing events around each batch's copies

    def to_host(self, values: dict[str, torch.Tensor], slot: Slot) -> dict[str, int]:
        """Queue the copies of ``values`` into ``slot`` and record ``slot.ready``; returns rows per key.

        The copy stream first waits on the compute stream of the tensors' own device (not the
        current device's), so the copies never race the kernels that produce them.
        """
        api = self.api
        self.stream.wait_stream(api.current_stream(self.device))
        rows = {}
        with api.use_stream(self.stream):
            start = api.timing_event()
            if start is not None:
                start.record(self.stream)
            for key, t in values.items():
                n = int(t.shape[1] if slot.specs[key].layer_major else t.shape[0])
                api.copy_to_host(slot.view(key, n), t)
                api.record_stream(t, self.stream)
                rows[key] = n
            if start is not None:
                end = api.timing_event()
                end.record(self.stream)
                self.spans.append((start, end))
            event = api.event()
            event.record(self.stream)
        slot.ready = event
        return rows


    def seconds(self) -> float:
        """Device seconds spent copying (valid once the copies are done: the writer waited on them)."""
        return sum(start.elapsed_time(end) for start, end in self.spans) / 1000


@contextlib.contextmanager
def on_device(device: torch.device, api: CudaApi | None) -> Iterator[None]:
    """Make ``device`` the current CUDA device for the loop (kernels, streams, allocations)."""
    if api is None:
        yield
        return
    with api.use_device(device):
        yield

"""Shared helpers: machine description, peak RSS, raw disk bandwidth, child runs, statistics.

Every measured row runs in a fresh child process so that its peak RSS (``VmHWM`` of that
process, read by the child itself at the end) belongs to that row alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
DATA = ROOT / "data" / "emotions.jsonl"
BLOCK = 8 << 20


def now_stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB.

    ``VmHWM`` from ``/proc/self/status``: it belongs to this program's own address space. (Linux
    carries ``ru_maxrss`` over from the parent across fork + exec, so a child started by a big
    parent would report the parent's peak; ``ru_maxrss`` is only the fallback off Linux.)"""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return round(int(line.split()[1]) / (1 << 20), 1)
    except OSError:
        pass
    return None


def machine(workdir: Path | None = None, threads: int | None = None) -> dict:
    """What the numbers were measured on."""
    import numpy as np
    import zarr

    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": _mem_gib(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "zarr": zarr.__version__,
        "threads": threads,
    }
    try:
        import numcodecs

        info["numcodecs"] = numcodecs.__version__
    except ImportError:
        pass
    if workdir is not None:
        st = os.statvfs(workdir)
        info["workdir"] = str(workdir)
        info["workdir_free_gib"] = round(st.f_bavail * st.f_frsize / (1 << 30), 1)
    return info


@contextlib.contextmanager
def scratch(given: str | None, prefix: str) -> Iterator[Path]:
    """The benchmark's scratch folder: the one given (``--work``, kept), or a temporary one removed
    at the end, whatever happens."""
    work = Path(given) if given else Path(tempfile.mkdtemp(prefix=prefix))
    work.mkdir(parents=True, exist_ok=True)
    try:
        yield work
    finally:
        if not given:
            shutil.rmtree(work, ignore_errors=True)


def jaccard(a: set, b: set) -> float:
    """Overlap of two neuron sets (1.0 for two empty ones)."""
    return len(a & b) / len(a | b) if a | b else 1.0


def open_store(path: Path) -> Any:
    """``neurostore.open`` without its incomplete-store warning (benchmarks open what they wrote)."""
    import warnings

    import neurostore

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return neurostore.open(str(path))


def dir_bytes(path: Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    total = 0
    for dirpath, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
    return total


def drop_cache(path: Path) -> None:
    """Ask the kernel to forget the cached pages of every file under ``path`` (no root needed;
    only clean pages go, so call it after the data has been written back)."""
    path = Path(path)
    files = [path] if path.is_file() else [Path(d) / f for d, _, fs in os.walk(path) for f in fs]
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def write_bandwidth(folder: Path, nbytes: int) -> dict:
    """Sequential write of ``nbytes`` in 8 MiB blocks into one file: buffered (page cache, what
    ``np.save`` and Zarr see) and with fsync (the device). MB/s = 1e6 bytes per second."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    block = os.urandom(BLOCK)
    out = {"bytes": int(nbytes)}
    for mode in ("buffered", "fsync"):
        target = folder / f"raw-write-{mode}.bin"
        t0 = time.perf_counter()
        with open(target, "wb", buffering=0) as f:
            left = nbytes
            while left > 0:
                n = min(left, BLOCK)
                f.write(block[:n])
                left -= n
            if mode == "fsync":
                os.fsync(f.fileno())
        dt = time.perf_counter() - t0
        out[f"{mode}_seconds"] = dt
        out[f"{mode}_mb_s"] = nbytes / dt / 1e6 if dt > 0 else None
        target.unlink()
    return out


def read_bandwidth(paths: list[Path], cold: bool = True) -> dict:
    """Sequential read of every file under ``paths`` in 8 MiB blocks (cold: caches dropped first)."""
    files: list[Path] = []
    for p in paths:
        p = Path(p)
        files += [p] if p.is_file() else sorted(Path(d) / f for d, _, fs in os.walk(p) for f in fs)
    if cold:
        for f in files:
            drop_cache(f)
    total = 0
    t0 = time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while True:
                chunk = fh.read(BLOCK)
                if not chunk:
                    break
                total += len(chunk)
    dt = time.perf_counter() - t0
    return {"bytes": total, "seconds": dt, "mb_s": total / dt / 1e6 if dt > 0 else None, "cold": cold}


def run_child(args: list[str], env: dict | None = None, timeout: float | None = None) -> dict:
    """Run ``python -m <args>`` in a fresh process; it writes one JSON object to the file named by
    ``--result``. Raises with the child's stderr tail if it fails."""
    result_file = Path(args[args.index("--result") + 1])
    result_file.unlink(missing_ok=True)
    proc = subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=timeout, check=False,
    )
    if proc.returncode != 0 or not result_file.exists():
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"child {' '.join(args[:3])} failed (rc {proc.returncode}):\n{tail}")
    return json.loads(result_file.read_text())


def spread(values: list[float]) -> dict:
    """Median, min, max and relative spread ((max-min)/median) of repeated measurements."""
    values = [v for v in values if v is not None]
    if not values:
        return {"median": None, "min": None, "max": None, "spread": None, "n": 0}
    med = statistics.median(values)
    return {
        "median": med,
        "min": min(values),
        "max": max(values),
        "spread": (max(values) - min(values)) / med if med else None,
        "n": len(values),
    }


def save_results(payload: dict, name: str, folder: Path | None = None) -> Path:
    folder = Path(folder or RESULTS)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{now_stamp()}.json"
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def finish(payload: dict, name: str, results: str | Path, work: Path, keep: bool) -> int:
    """Save the results JSON, say where, and remove the scratch folder unless it was given (``keep``)."""
    path = save_results(payload, name, Path(results))
    print(f"\nresults: {path}  ({payload['wall_seconds']:.0f} s)")
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def fmt(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"

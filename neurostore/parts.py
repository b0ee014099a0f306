"""Extraction in N parts, one folder: run one after another, on local devices, or on a Dask cluster.

``extract --parts N`` writes ``OUT/part-i-of-N.zarr`` (each an ordinary ``--part i/N`` store) and
marks ``OUT`` itself as a parts folder (a Zarr group whose attribute ``neurostore_parts`` lists the
parts), which :func:`neurostore.store.open` reads as one store. Where the parts run:

* neither ``devices`` nor ``scheduler``: one after another in this process;
* ``devices=["cuda:0", "cuda:1", ...]`` (or ``["cpu", "cpu"]``): a local Dask cluster with one
  worker process per device (each declares the resource ``GPU=1``, so one part runs per worker at a
  time), shut down at the end;
* ``scheduler="tcp://host:8786"``: each part is a task on that cluster asking for ``GPU=1``; start
  each worker with ``--resources GPU=1`` and its own GPU (``CUDA_VISIBLE_DEVICES``).

A part is one call to :func:`neurostore.extract.extract` with ``resume=True``: a worker that dies
mid-part has its task retried by the scheduler on another worker, which resumes from the part's last
commit. The lock of the dead worker's part is taken over by the retry because both carry the same
owner token, which this run hands to every attempt of a part (:func:`neurostore.lock.acquire`):
a lock of another run is never taken. Progress is read from the parts' committed counts, so one bar
covers all parts wherever they run.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import store as st
from .errors import NeurostoreError

ATTR = "neurostore_parts"


def part_name(i: int, n: int) -> str:
    return f"part-{i}-of-{n}.zarr"


def part_paths(out: str, n: int) -> list[str]:
    return [f"{out.rstrip('/')}/{part_name(i, n)}" for i in range(n)]


def read_folder(path: str, storage_options: dict | None = None) -> list[str] | None:
    """The part stores of a parts folder, or None where ``path`` is not one."""
    try:
        group = st.open_group(path, mode="r", storage_options=storage_options)
    except Exception:  # noqa: BLE001 - not a zarr group at all: not a parts folder
        return None
    info = group.attrs.get(ATTR)
    if not info:
        return None
    return part_paths(path, int(info["n"]))


@dataclass
class PartsResult:
    path: str
    parts: list[str]
    docs: int = 0
    tokens: int = 0
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)


def _mark(out: str, n: int, run: str) -> None:
    import zarr

    group = zarr.open_group(st.zarr_store(out), mode="a")
    group.attrs.update({ATTR: {"n": n, "parts": [part_name(i, n) for i in range(n)], "run": run}})


def _check_folder(out: str, n: int, resume: bool, overwrite: bool) -> None:
    """Refuse a folder of another layout; clear it with ``overwrite``."""
    import shutil

    path = Path(out)
    if "://" in out or not path.exists():
        return
    if path.is_file():
        raise NeurostoreError(f"--out {out}: is a file, not a folder")
    existing = read_folder(out)
    if existing is None and any(path.iterdir()):
        raise NeurostoreError(f"--out {out}: exists and is not a parts folder; refusing to write into it")
    if existing is not None and len(existing) != n and not overwrite:
        raise NeurostoreError(f"--parts {n}: {out} holds {len(existing)} parts; give --parts {len(existing)} to resume, or --overwrite")
    if existing is not None and not resume and not overwrite:
        raise NeurostoreError(f"{out}: already exists; pass --resume to finish its parts or --overwrite to replace them")
    if overwrite:
        shutil.rmtree(path)


def _run_part(corpus_paths: list[str], path: str, i: int, n: int, model: Any, options: Any, corpus_options: dict | None,
              owner: str, devices: dict[str, str] | None, kill_at: Any = None) -> dict:
    """One part, on whatever process runs it (a Dask task, or this process)."""
    from dataclasses import replace

    from .extract import extract

    opts = replace(options, part=(i, n))
    if devices is not None:  # a local cluster: this worker's own device
        from distributed import get_worker

        opts = replace(opts, device=devices[get_worker().name])
    if kill_at is not None and Path(path).exists():
        kill_at = None  # fault injection (tests): the first attempt only
    result = extract(corpus_paths, path, model=model, options=opts, corpus_options=corpus_options, resume=True,
                     lock_owner=f"{owner}/{i}", kill_at=kill_at)
    return {"part": i, "docs": result.docs, "tokens": result.tokens, "warnings": result.warnings}


def extract_parts(
    corpus_paths: list[str], out: str, n: int, *, model: Any = None, options: Any = None, corpus_options: dict | None = None,
    resume: bool = False, overwrite: bool = False, devices: list[str] | None = None, scheduler: str | None = None,
    on_progress: Callable[[int, int, int], None] | None = None, faults: dict[int, str] | None = None,
) -> PartsResult:
    """Extract ``corpus_paths`` into the parts folder ``out`` in ``n`` parts (see the module doc).

    ``on_progress(done_docs, done_tokens, total_docs)`` is called about once a second from the
    parts' committed counts. ``faults`` ({part: kill point}) SIGKILLs the process running that
    part's first attempt at that point (the tests' dead worker)."""
    from .extract import ExtractOptions

    if n < 1:
        raise NeurostoreError(f"--parts {n}: give a number of parts, 1 or more")
    if devices is not None and scheduler is not None:
        raise NeurostoreError("--devices and --scheduler: give one (--devices starts a local cluster, --scheduler uses yours)")
    if devices is not None and not devices:
        raise NeurostoreError("--devices: name one device or more, e.g. cuda:0,cuda:1 or cpu,cpu")
    options = options or ExtractOptions()
    if (devices is not None or scheduler is not None) and not (model is None or isinstance(model, str)):
        raise NeurostoreError("--parts with --devices/--scheduler: give the model by name or folder; each worker loads its own")
    if options.part is not None:
        raise NeurostoreError("--part and --parts: --part i/N extracts one part by hand, --parts N runs all of them; give one")
    _check_folder(out, n, resume, overwrite)
    paths = part_paths(out, n)
    run = uuid.uuid4().hex
    _mark(out, n, run)
    t0 = time.perf_counter()
    result = PartsResult(out, paths)
    if devices is None and scheduler is None:
        for i, path in enumerate(paths):
            done = _run_part(corpus_paths, path, i, n, model, options, corpus_options, run, None)
            result.docs += done["docs"]
            result.tokens += done["tokens"]
            result.warnings += done["warnings"]
            if on_progress:
                on_progress(*_committed(paths))
    else:
        for done in _run_distributed(corpus_paths, paths, n, model, options, corpus_options, run, devices, scheduler, on_progress, faults or {}):
            result.docs += done["docs"]
            result.tokens += done["tokens"]
            result.warnings += done["warnings"]
    result.seconds = time.perf_counter() - t0
    return result


def _committed(paths: list[str]) -> tuple[int, int, int]:
    """(committed sentences, committed tokens, sentences in all parts) of the parts that exist."""
    docs = tokens = total = 0
    for path in paths:
        try:
            meta = st.read_meta(st.open_group(path, mode="r"))
        except Exception:  # noqa: BLE001 - not created yet
            continue
        if meta and meta.get("created"):
            docs += meta["committed_docs"]
            tokens += meta["committed_tokens"]
            total += meta["n_docs"]
    return docs, tokens, total


def _run_distributed(corpus_paths: list[str], paths: list[str], n: int, model: Any, options: Any, corpus_options: dict | None,
                     run: str, devices: list[str] | None, scheduler: str | None, on_progress: Any, faults: dict[int, str]) -> list[dict]:
    try:
        from distributed import Client, Nanny, SpecCluster, as_completed
    except ImportError:
        raise NeurostoreError("--devices/--scheduler need the 'distributed' package (pip install 'neurostore[distributed]')") from None
    cluster = None
    names = None
    if devices is not None:
        from distributed import Scheduler

        workers = {}
        for j, device in enumerate(devices):
            env = {"CUDA_VISIBLE_DEVICES": device.split(":")[1]} if device.startswith("cuda:") else {}
            workers[f"neurostore-{j}"] = {"cls": Nanny, "options": {"nthreads": 1, "resources": {"GPU": 1}, "env": env,
                                                                   "name": f"neurostore-{j}", "silence_logs": 40}}
        # each worker sees only its own GPU (CUDA_VISIBLE_DEVICES), where it is "cuda"
        names = {f"neurostore-{j}": ("cuda" if d.startswith("cuda") else d) for j, d in enumerate(devices)}
        cluster = SpecCluster(workers=workers, scheduler={"cls": Scheduler, "options": {"dashboard_address": None}}, silence_logs=40)
        client = Client(cluster, set_as_default=False)
    else:
        from .moments import connect

        client = connect(scheduler)
    try:
        futures = [
            client.submit(_run_part, corpus_paths, path, i, n, model, options, corpus_options, run, names, faults.get(i),
                          key=f"neurostore-part-{i}-of-{n}-{run}", resources={"GPU": 1}, pure=False)
            for i, path in enumerate(paths)
        ]
        done = []
        pending = as_completed(futures, with_results=True, raise_errors=False, loop=client.loop)
        last = 0.0
        while not pending.is_empty():
            if not pending.has_ready():
                time.sleep(0.2)
                if on_progress and time.perf_counter() - last > 1.0:
                    on_progress(*_committed(paths))
                    last = time.perf_counter()
                continue
            future, value = next(pending)
            if future.status == "error":
                raise _part_error(future)
            done.append(value)
        if on_progress:
            on_progress(*_committed(paths))
        return done
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _part_error(future: Any) -> BaseException:
    err = future.exception()
    if isinstance(err, NeurostoreError):
        return err
    text = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
    return NeurostoreError(f"{future.key}: failed on its worker ({type(err).__name__}: {text})")

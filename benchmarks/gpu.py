"""GPU extraction benchmark: where the time goes on a CUDA machine.

    python -m benchmarks.gpu              # XLM-R base and large sizes, fp16 and bf16 autocast,
                                          # batch token budgets 8k-64k
    python -m benchmarks.gpu --quick      # one size, one dtype, two budgets

For every (model size, dtype, token budget) it runs, interleaved over repeats, the bare forward
pass (same batches, activations discarded) and ``neurostore extract`` of ``resid`` for all layers
and tokens, and reports tokens/s, the ratio to the bare forward, and the share of wall time spent
in the forward pass on the GPU (CUDA events around every forward), in the device-to-host copy (CUDA
events on neurostore's copy stream) and in the writer thread (scatter, compression and writes,
wall clock), with the GPU utilisation sampled every 100 ms (``nvidia-smi``, or
``torch.cuda.utilization`` where pynvml is installed). Models have random weights built from
``XLMRobertaConfig`` (speed does not depend on the weights) and the packaged MiniLM tokenizer.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks import common

SIZES = {
    "xlmr-base": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072},
    "xlmr-large": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096},
}


def build(folder: Path, size: str) -> Path:
    if (folder / "config.json").exists():
        return folder
    import torch
    from transformers import AutoTokenizer, XLMRobertaConfig, XLMRobertaModel

    from neurostore import models

    tok = AutoTokenizer.from_pretrained(models.default_model())
    torch.manual_seed(0)
    config = XLMRobertaConfig(vocab_size=250002, pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id,
                              eos_token_id=tok.sep_token_id, **SIZES[size])
    XLMRobertaModel(config).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


class UtilSampler:
    """GPU utilisation (%) every ``period`` seconds in a background thread."""

    def __init__(self, period: float = 0.1) -> None:
        self.period, self.samples, self._stop = period, [], threading.Event()
        self.source = None
        self._proc = None

    def __enter__(self) -> UtilSampler:
        import torch

        try:
            torch.cuda.utilization()
            self.source = "torch.cuda.utilization"
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        except Exception:  # noqa: BLE001 - no pynvml: fall back to nvidia-smi
            if shutil.which("nvidia-smi"):
                self.source = "nvidia-smi"
                self._proc = subprocess.Popen(
                    ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", f"-lms={int(self.period * 1000)}"],
                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                self._thread = threading.Thread(target=self._read, daemon=True)
                self._thread.start()
        return self

    def _poll(self) -> None:
        import torch

        while not self._stop.is_set():
            self.samples.append(float(torch.cuda.utilization()))
            time.sleep(self.period)

    def _read(self) -> None:
        for line in self._proc.stdout:
            try:
                self.samples.append(float(line.strip().split(",")[0]))
            except ValueError:
                pass

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait()

    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


def bare(loaded, ids, lengths, budget, compute) -> dict:
    import torch

    from neurostore import batching, models

    events = []
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.inference_mode(), UtilSampler() as util:
        for docs in batching.plan_batches(lengths, budget):
            x, mask = batching.pad([ids[i] for i in docs], loaded.pad_id, loaded.device, pin=True)
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            with models.autocast(loaded.device, compute):
                loaded.model(input_ids=x, attention_mask=mask)
            e.record()
            events.append((s, e))
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    fwd = sum(s.elapsed_time(e) for s, e in events) / 1000
    return {"seconds": wall, "forward_s": fwd, "gpu_util": util.mean(), "util_source": util.source}


def neurostore_run(loaded, corpus: Path, out: Path, budget: int, dtype: str) -> dict:
    import torch

    from neurostore import extract as ex
    from neurostore import models, writer

    fwd_events, copy_events, busy = [], [], {"writer": 0.0}
    model_forward = loaded.model.forward

    def forward(*args, **kw):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        out_ = model_forward(*args, **kw)
        e.record()
        fwd_events.append((s, e))
        return out_

    to_host = ex._to_host_async

    def to_host_timed(batch, stream):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        stream.wait_stream(torch.cuda.current_stream())
        s.record(stream)
        to_host(batch, stream)
        e.record(stream)
        copy_events.append((s, e))

    def timed(fn):
        def wrapper(*args, **kw):
            t = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                busy["writer"] += time.perf_counter() - t
        return wrapper

    saved = (models.load, ex._to_host_async, writer.Writer._scatter, writer.Writer._finish)
    models.load = lambda *a, **k: loaded
    ex._to_host_async = to_host_timed
    writer.Writer._scatter, writer.Writer._finish = timed(saved[2]), timed(saved[3])
    loaded.model.forward = forward
    try:
        shutil.rmtree(out, ignore_errors=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with UtilSampler() as util:
            res = ex.extract([str(corpus)], str(out), options=ex.ExtractOptions(
                sites=["resid"], dtype=dtype, max_batch_tokens=budget, device="cuda"))
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    finally:
        models.load, ex._to_host_async, writer.Writer._scatter, writer.Writer._finish = saved
        loaded.model.forward = model_forward
    disk = common.dir_bytes(out)
    shutil.rmtree(out, ignore_errors=True)
    return {
        "seconds": wall, "tokens": res.tokens, "disk_bytes": disk,
        "forward_s": sum(s.elapsed_time(e) for s, e in fwd_events) / 1000,
        "copy_s": sum(s.elapsed_time(e) for s, e in copy_events) / 1000,
        "writer_busy_s": busy["writer"], "gpu_util": util.mean(), "util_source": util.source,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="One size (base), fp16, budgets 8k and 32k, one repeat.")
    p.add_argument("--sizes", default="xlmr-base,xlmr-large", help="Model sizes, comma-separated.")
    p.add_argument("--dtypes", default="float16,bfloat16", help="Autocast dtypes, comma-separated.")
    p.add_argument("--budgets", default="8192,16384,32768,65536", help="Padded tokens per batch, comma-separated.")
    p.add_argument("--docs", type=int, default=4000, help="Documents in the mixed-length corpus.")
    p.add_argument("--repeats", type=int, default=2, help="Interleaved repeats (bare, neurostore, bare, ...).")
    p.add_argument("--work", default=None, help="Scratch folder (default: a temporary folder).")
    p.add_argument("--results", default=str(common.RESULTS), help="Folder for the results JSON.")
    a = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("benchmarks.gpu: CUDA is not available on this machine; run it on a machine with an NVIDIA GPU.", file=sys.stderr)
        return 2
    from benchmarks.extract import make_corpus, texts_of
    from neurostore import batching, models

    if a.quick:
        a.sizes, a.dtypes, a.budgets, a.docs, a.repeats = "xlmr-base", "float16", "8192,32768", 500, 1
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="neurostore-gpubench-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = make_corpus(work / "corpus.jsonl", a.docs)
    rows = []
    for size in a.sizes.split(","):
        loaded = models.load(str(build(work / size, size)), torch.device("cuda"))
        ids, _ = batching.tokenize(loaded.tokenizer, texts_of(corpus), loaded.max_length())
        import numpy as np

        lengths = np.array([len(x) for x in ids])
        with torch.inference_mode():
            loaded.model(input_ids=torch.full((8, 64), 1000, device="cuda"))
        for dtype in a.dtypes.split(","):
            compute = models.DTYPES[dtype]
            for budget in (int(b) for b in a.budgets.split(",")):
                for rep in range(a.repeats):
                    b = bare(loaded, ids, lengths, budget, compute)
                    n = neurostore_run(loaded, corpus, work / "store.zarr", budget, dtype)
                    tokens = int(lengths.sum())
                    row = {"size": size, "dtype": dtype, "budget": budget, "repeat": rep, "tokens": tokens,
                           "bare_tokens_per_s": tokens / b["seconds"], "bare": b,
                           "neurostore_tokens_per_s": tokens / n["seconds"], "neurostore": n,
                           "vs_bare": b["seconds"] / n["seconds"],
                           "forward_share": n["forward_s"] / n["seconds"], "copy_share": n["copy_s"] / n["seconds"],
                           "writer_share": n["writer_busy_s"] / n["seconds"],
                           "mb_s_written": n["disk_bytes"] / n["seconds"] / 1e6}
                    rows.append(row)
                    print(f"{size} {dtype} {budget:>6}: bare {row['bare_tokens_per_s']:,.0f} tok/s | neurostore "
                          f"{row['neurostore_tokens_per_s']:,.0f} tok/s ({row['vs_bare']:.2f}x) forward {row['forward_share']:.0%} "
                          f"copy {row['copy_share']:.0%} writer {row['writer_share']:.0%} GPU util {n['gpu_util'] or 0:.0f}%", flush=True)
        del loaded
        torch.cuda.empty_cache()
    summary = {}
    for r in rows:
        key = f"{r['size']}/{r['dtype']}/{r['budget']}"
        summary.setdefault(key, []).append(r)
    summary = {k: {m: common.spread([r[m] for r in v]) for m in ("bare_tokens_per_s", "neurostore_tokens_per_s", "vs_bare",
                                                                   "forward_share", "copy_share", "writer_share", "mb_s_written")}
               for k, v in summary.items()}
    payload = {
        "benchmark": "gpu", "quick": a.quick, "command": "python -m benchmarks.gpu " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {**common.machine(work), "gpu": torch.cuda.get_device_name(0), "cuda": torch.version.cuda, "torch": torch.__version__},
        "settings": {"docs": a.docs, "repeats": a.repeats, "store_dtype": "float16", "sites": ["resid"]},
        "summary": summary, "rows": rows,
    }
    path = common.save_results(payload, "gpu-quick" if a.quick else "gpu", Path(a.results))
    print(f"results: {path}")
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

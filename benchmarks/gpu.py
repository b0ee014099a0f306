"""GPU extraction benchmark: where the time goes on a CUDA machine.

    python -m benchmarks.gpu              # XLM-R base and large sizes, fp16 and bf16 autocast,
                                          # batch token budgets 8k-64k
    python -m benchmarks.gpu --quick      # one size, one dtype, two budgets

For every (model size, dtype, token budget) it runs, interleaved over repeats, the bare forward
pass over exactly the batches neurostore will run (same plan, padded and uploaded as carefully,
activations dropped) and ``extract()`` of ``resid`` for all layers and tokens on the same loaded
model, both warmed up in the compute dtype under autocast. It reports tokens/s of the loop (first
forward to last commit: tokenising and creating the store are outside both clocks), the ratio to
the bare forward, device time of the forwards and of the copies (CUDA events), the writer's own
work (scatter, encode, write, commit; waiting on the GPU counted apart), how often the forward
waited for a free pinned slot, the real-token share of the batches, and the GPU utilisation of the
device used (``torch.cuda.utilization``, or ``nvidia-smi -i N``; unknown when neither answers). Models have random weights built from
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
from benchmarks.extract import texts_of

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
    """GPU utilisation (%) of one device every ``period`` seconds; ``mean()`` is None when unknown."""

    def __init__(self, index: int, period: float = 0.1) -> None:
        self.index, self.period, self.samples, self._stop = index, period, [], threading.Event()
        self.source = None
        self._proc = None
        self._thread = None

    def __enter__(self) -> UtilSampler:
        import torch

        try:
            torch.cuda.utilization(self.index)
            self.source = "torch.cuda.utilization"
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        except Exception:  # noqa: BLE001 - no pynvml: fall back to nvidia-smi for this device only
            if shutil.which("nvidia-smi"):
                self.source = f"nvidia-smi -i {self.index}"
                self._proc = subprocess.Popen(
                    ["nvidia-smi", "-i", str(self.index), "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                     f"-lms={int(self.period * 1000)}"],
                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                self._thread = threading.Thread(target=self._read, daemon=True)
                self._thread.start()
        return self

    def _poll(self) -> None:
        import torch

        while not self._stop.is_set():
            self.samples.append(float(torch.cuda.utilization(self.index)))
            time.sleep(self.period)

    def _read(self) -> None:
        for line in self._proc.stdout:
            try:
                self.samples.append(float(line.strip()))
            except ValueError:  # "[N/A]" and the like: unknown, not 0%
                pass

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait()

    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


def plan(loaded, corpus: Path, budget: int, store_dtype: str = "float16"):
    """The batches neurostore will run for ``resid`` (all layers, tokens, default pooling): bare
    runs exactly this list, so the ratio measures the pipeline, not another batching."""
    import numpy as np

    from neurostore import batching
    from neurostore import extract as ex

    ids, _ = batching.tokenize(loaded.tokenizer, texts_of(corpus), loaded.max_length())
    n_tokens = np.array([len(x) for x in ids])
    per_row = (loaded.n_layers + 1) * loaded.hidden_size * 2
    opts = ex.ExtractOptions(sites=["resid"], pool=["first", "mean"], tokens=True, store_dtype=store_dtype, max_batch_tokens=budget)
    opts.buffer_mb = batching.default_buffer_mb(loaded.device, budget, per_row)
    windows = ex.plan_windows(n_tokens, per_row, opts)
    return ids, n_tokens, [b for p in ex.plan_batches(n_tokens, windows, opts, batching.PLAN_VERSION) for b in p], opts.buffer_mb


class Timed:
    """Wraps a model: CUDA events around every forward (device time, not launch time)."""

    def __init__(self, model) -> None:
        self.model, self.events = model, []

    def __call__(self, *args, **kw):
        import torch

        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        out = self.model(*args, **kw)
        e.record()
        self.events.append((s, e))
        return out

    def seconds(self) -> float:
        return sum(s.elapsed_time(e) for s, e in self.events) / 1000


def bare(loaded, ids, batches, compute) -> dict:
    """The same batches, padded and uploaded as carefully (pinned, non-blocking), outputs dropped."""
    import torch

    from neurostore import batching, models

    timed = Timed(loaded.model)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.inference_mode(), UtilSampler(loaded.device.index or 0) as util:
        for docs in batches:
            x, mask = batching.pad([ids[i] for i in docs], loaded.pad_id, loaded.device, pin=True)
            with models.autocast(loaded.device, compute):
                timed(input_ids=x, attention_mask=mask, output_hidden_states=True)
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    return {"seconds": wall, "forward_s": timed.seconds(), "gpu_util": util.mean(), "util_source": util.source}


def neurostore_run(loaded, corpus: Path, out: Path, budget: int, dtype: str, buffer_mb: int) -> dict:
    """``extract()`` of resid on the loaded model; the loop's wall time excludes tokenising and
    creating the store (``stages["loop"]``), as the bare row's does."""
    import dataclasses

    import torch

    from neurostore import extract as ex

    timed = Timed(loaded.model)
    model = dataclasses.replace(loaded, model=timed)
    shutil.rmtree(out, ignore_errors=True)
    torch.cuda.synchronize()
    with UtilSampler(loaded.device.index or 0) as util:
        res = ex.extract([str(corpus)], str(out), model=model, options=ex.ExtractOptions(
            sites=["resid"], dtype=dtype, max_batch_tokens=budget, buffer_mb=buffer_mb))
        torch.cuda.synchronize()
    disk = common.dir_bytes(out)
    shutil.rmtree(out, ignore_errors=True)
    st = res.stages
    b = res.meta["batches"]
    return {
        "seconds": st["loop"], "total_seconds": res.seconds, "tokens": res.tokens, "disk_bytes": disk,
        "forward_s": timed.seconds(), "copy_s": st.get("copy_device", 0.0),
        "writer_busy_s": st["scatter"] + st["encode"] + st["write"] + st["commit"], "wait_copy_s": st["wait_copy"],
        "wait_slot_s": st["wait_slot"], "ring": st["ring"], "stages": {k: v for k, v in st.items() if isinstance(v, float)},
        "real_share": b["real_tokens"] / b["padded_tokens"], "gpu_util": util.mean(), "util_source": util.source,
    }


def multi_gpu(work: Path, corpus: Path, a) -> dict | None:
    """``extract --parts N --devices cuda:0,...`` over every visible GPU against one GPU (``--parts 1
    --devices cuda:0``, the same path and its start-up), wall clock from the call to the last commit,
    model loading on the workers included."""
    import torch

    from neurostore.extract import ExtractOptions
    from neurostore.parts import extract_parts

    n = torch.cuda.device_count()
    if n < 2:
        print(f"--multi-gpu: {n} GPU visible; the multi-GPU row needs 2 or more", file=sys.stderr)
        return None
    size, dtype, budget = a.sizes.split(",")[0], a.dtypes.split(",")[0], max(int(b) for b in a.budgets.split(","))
    model = str(build(work / size, size))
    out = {}
    for gpus in (1, n):
        folder = work / f"parts-{gpus}"
        shutil.rmtree(folder, ignore_errors=True)
        t0 = time.perf_counter()
        res = extract_parts([str(corpus)], str(folder), gpus, model=model, devices=[f"cuda:{i}" for i in range(gpus)],
                            options=ExtractOptions(sites=["resid"], dtype=dtype, max_batch_tokens=budget))
        seconds = time.perf_counter() - t0
        out[f"{gpus}_gpu"] = {"seconds": seconds, "tokens_per_s": res.tokens / seconds}
        print(f"--parts {gpus} on {gpus} GPU(s): {res.tokens / seconds:,.0f} tok/s ({seconds:.1f} s, start-up included)", flush=True)
        shutil.rmtree(folder, ignore_errors=True)
    out["speedup"] = out[f"{n}_gpu"]["tokens_per_s"] / out["1_gpu"]["tokens_per_s"]
    return out


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
    p.add_argument("--multi-gpu", action="store_true", help="Also run extract --parts N --devices cuda:0..N-1 over every visible GPU "
                   "against one GPU, on the first size and dtype at the largest budget (needs 2 GPUs or more).")
    a = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("benchmarks.gpu: CUDA is not available on this machine; run it on a machine with an NVIDIA GPU.", file=sys.stderr)
        return 2
    from benchmarks.extract import make_corpus
    from neurostore import models

    if a.quick:
        a.sizes, a.dtypes, a.budgets, a.docs, a.repeats = "xlmr-base", "float16", "8192,32768", 500, 1
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="neurostore-gpubench-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = make_corpus(work / "corpus.jsonl", a.docs)
    rows = []
    for size in a.sizes.split(","):
        for dtype in a.dtypes.split(","):
            compute = models.DTYPES[dtype]
            loaded = models.load(str(build(work / size, size)), torch.device("cuda"), dtype=compute)
            with torch.inference_mode(), models.autocast(loaded.device, compute):  # warm-up as the rows run
                loaded.model(input_ids=torch.full((8, 64), 1000, device="cuda"), attention_mask=torch.ones(8, 64, dtype=torch.long, device="cuda"))
            for budget in (int(b) for b in a.budgets.split(",")):
                ids, lengths, batches, buffer_mb = plan(loaded, corpus, budget)
                for rep in range(a.repeats):
                    b = bare(loaded, ids, batches, compute)
                    n = neurostore_run(loaded, corpus, work / "store.zarr", budget, dtype, buffer_mb)
                    tokens = int(lengths.sum())
                    row = {"size": size, "dtype": dtype, "budget": budget, "repeat": rep, "tokens": tokens,
                           "bare_tokens_per_s": tokens / b["seconds"], "bare": b,
                           "neurostore_tokens_per_s": tokens / n["seconds"], "neurostore": n,
                           "vs_bare": b["seconds"] / n["seconds"],
                           "forward_share": n["forward_s"] / n["seconds"], "copy_share": n["copy_s"] / n["seconds"],
                           "writer_share": n["writer_busy_s"] / n["seconds"], "real_share": n["real_share"],
                           "mb_s_written": n["disk_bytes"] / n["seconds"] / 1e6}
                    rows.append(row)
                    util = "unknown" if n["gpu_util"] is None else f"{n['gpu_util']:.0f}%"
                    print(f"{size} {dtype} {budget:>6}: bare {row['bare_tokens_per_s']:,.0f} tok/s | neurostore "
                          f"{row['neurostore_tokens_per_s']:,.0f} tok/s ({row['vs_bare']:.2f}x) forward {row['forward_share']:.0%} "
                          f"copy {row['copy_share']:.0%} writer {row['writer_share']:.0%} real tokens {row['real_share']:.2f} "
                          f"ring full {n['ring']['full']}x GPU util {util}", flush=True)
            del loaded
            torch.cuda.empty_cache()
    multi = multi_gpu(work, corpus, a) if a.multi_gpu else None
    summary = {}
    for r in rows:
        key = f"{r['size']}/{r['dtype']}/{r['budget']}"
        summary.setdefault(key, []).append(r)
    summary = {k: {m: common.spread([r[m] for r in v]) for m in ("bare_tokens_per_s", "neurostore_tokens_per_s", "vs_bare",
                                                                   "forward_share", "copy_share", "writer_share", "real_share", "mb_s_written")}
               for k, v in summary.items()}
    payload = {
        "benchmark": "gpu", "quick": a.quick, "command": "python -m benchmarks.gpu " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {**common.machine(work), "gpu": torch.cuda.get_device_name(0), "cuda": torch.version.cuda, "torch": torch.__version__},
        "settings": {"docs": a.docs, "repeats": a.repeats, "store_dtype": "float16", "sites": ["resid"]},
        "summary": summary, "rows": rows, "multi_gpu": multi,
    }
    path = common.save_results(payload, "gpu-quick" if a.quick else "gpu", Path(a.results))
    print(f"results: {path}")
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

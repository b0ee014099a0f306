"""Query benchmark: neurostore's out-of-core pass against the in-memory numpy way.

    python -m benchmarks.query            # full run (by hand)
    python -m benchmarks.query --quick    # CI-sized

Synthetic stores of growing size (token rows of one ``mlp`` site, float16, the store's own codec)
are built through the store API. For each size and each query (``variance``, ``correlate``,
``lape``) two child processes run under the same address-space limit (``RLIMIT_AS``, the memory
a query is allowed): neurostore's query API, and numpy loading the slice into memory and
computing the same statistic. Page caches are dropped before each timed pass; the raw cold read
bandwidth of the same files is measured alongside. A second neurostore query on the same slice
(answered from the in-store cache) is timed too.

The pass rows time the grouped pass alone (``moments.compute`` over every layer of the token rows,
by label, no cache) side by side with a sequential ``O_DIRECT`` read of the same files: with 1 and
2 local worker threads, on a 2-worker ``distributed.LocalCluster`` (processes), and with the
quantile sketch; each in a fresh child, the store's pages evicted first (``posix_fadvise``
DONTNEED on its files; the global ``drop_caches`` would also evict a concurrent job's files).
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common

QUERIES = ("variance", "correlate", "lape")
LABELS = ["anger", "joy", "sadness", "fear", "love", "neutral"]
LANGS = ["en", "es", "fr", "de"]
ENV = {"MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "1"}


# ----------------------------------------------------------------------------------------------
# synthetic stores


def build_store(path: Path, n_tokens: int, n_layers: int, width: int, seed: int = 0, block: int = 65536, checksums: bool = True) -> dict:
    """A store of ``n_tokens`` token rows (sentences of 4 to 60 tokens, skewed label and language
    frequencies), written block by block through :class:`ShardAppender`: never all in memory."""
    import numpy as np

    from neurostore import store as st

    rng = np.random.default_rng(seed)
    lengths = []
    total = 0
    while total < n_tokens:
        n = int(min(rng.integers(4, 61), n_tokens - total))
        lengths.append(n)
        total += n
    n_tok = np.array(lengths, dtype=np.int32)
    n_docs = len(n_tok)
    label = rng.choice(len(LABELS), size=n_docs, p=[0.3, 0.25, 0.15, 0.12, 0.1, 0.08]).astype(np.int32)
    lang = rng.choice(len(LANGS), size=n_docs, p=[0.4, 0.25, 0.2, 0.15]).astype(np.int32)
    sites = {"mlp": {"layers": list(range(n_layers)), "width": width}}
    meta = st.new_meta(
        model={"name": "synthetic", "model_type": "synthetic"}, compute_dtype="float32", store_dtype="float16",
        sites=sites, pool=[], tokens=True, options={}, corpus={"fingerprint": f"synthetic-{seed}-{n_tokens}"},
        n_docs=n_docs, n_tokens=total, n_truncated=0, version="benchmark", checksums=checksums,
    )
    group = st.create(
        str(path), meta, texts=[f"s{i}" for i in range(n_docs)], label=(LABELS, label), lang=(LANGS, lang),
        n_tokens=n_tok, truncated=np.zeros(n_docs, bool), token_ids=np.zeros(total, np.int32), classes=None,
    )
    doc_of = np.repeat(np.arange(n_docs, dtype=np.int32), n_tok)
    app = st.ShardAppender(group["acts/mlp"], 0)
    offset = (np.arange(width) % 7 - 3).astype(np.float32) * 0.2
    for lo in range(0, total, block):
        hi = min(total, lo + block)
        g = label[doc_of[lo:hi]] + 0.5 * lang[doc_of[lo:hi]]
        x = rng.standard_normal((hi - lo, n_layers, width), dtype=np.float32)
        x += offset + 0.1 * g[:, None, None].astype(np.float32)  # groups differ a little
        full, new = app.buffer(hi - lo)
        new[:] = x.astype(np.float16)
        app.flush(full)
    st.commit(group, st.read_meta(group), n_docs, total, complete=True)
    return {"n_tokens": total, "n_docs": n_docs, "n_layers": n_layers, "width": width,
            "raw_bytes": total * n_layers * width * 2, "store_bytes": common.dir_bytes(path / "acts" / "mlp")}


# ----------------------------------------------------------------------------------------------
# raw reads


def odirect_read(path: Path, block: int = 8 << 20) -> dict:
    """Sequential read of every file under ``path`` with ``O_DIRECT`` (no page cache, so always
    from the device) into one page-aligned buffer. MB/s = 1e6 bytes per second."""
    files = sorted(Path(d) / f for d, _, fs in os.walk(path) for f in fs)
    buf = mmap.mmap(-1, block)  # anonymous maps are page aligned, as O_DIRECT requires
    total = 0
    t0 = time.perf_counter()
    try:
        for f in files:
            fd = os.open(f, os.O_RDONLY | os.O_DIRECT)
            try:
                while True:
                    n = os.readv(fd, [buf])
                    total += n
                    if n < block:
                        break
            finally:
                os.close(fd)
    except OSError as err:  # e.g. tmpfs has no O_DIRECT
        return {"ok": False, "error": f"O_DIRECT read failed: {err}"}
    dt = time.perf_counter() - t0
    return {"ok": True, "bytes": total, "seconds": dt, "mb_s": total / dt / 1e6, "block": block}


# ----------------------------------------------------------------------------------------------
# children


def _limit(mb: int) -> None:
    if mb:
        resource.setrlimit(resource.RLIMIT_AS, (mb << 20, mb << 20))


def child_neurostore(a) -> dict:
    import numpy as np

    import neurostore
    from neurostore import query

    s = neurostore.open(a.store)
    kw = {"rows": "tokens", "workers": a.threads}

    def run():
        if a.query == "variance":
            return query.variance(s, "mlp", 0, by="label", **kw).variance
        if a.query == "correlate":
            return query.correlate(s, "mlp", 0, by="label", across="lang", **kw).mean
        return query.lape(s, "mlp", None, **kw).H

    t0 = time.perf_counter()
    first = run()
    seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    run()
    cached = time.perf_counter() - t0
    return {"ok": True, "seconds": seconds, "cached_seconds": cached,
            "finite": None if first is None else bool(np.isfinite(np.asarray(first, dtype=float)).any())}


def child_memory(a) -> dict:
    """What one writes with numpy when the data fits: load the slice, then compute."""
    import numpy as np
    import zarr

    g = zarr.open_group(a.store, mode="r")
    t0 = time.perf_counter()
    arr = g["acts/mlp"]
    x = np.asarray(arr[:, 0, :] if a.query in ("variance", "correlate") else arr[:]).astype(np.float32)
    doc = np.asarray(g["tokens/doc"][:])
    label = np.asarray(g["docs/label"][:])[doc]
    lang = np.asarray(g["docs/lang"][:])[doc]
    if a.query in ("variance", "correlate"):
        z = np.empty_like(x)
        for li in range(len(LANGS)):  # z-score within each language
            m = lang == li
            z[m] = (x[m] - x[m].mean(0)) / (x[m].std(0) + 1e-12)
        if a.query == "variance":
            means = np.stack([z[label == e].mean(0) for e in range(len(LABELS))])
            result = means.var(0)
        else:
            mats = []
            for e in range(len(LABELS)):
                per_lang = np.stack([z[(label == e) & (lang == li)].mean(0) for li in range(len(LANGS))])
                ranks = per_lang.argsort(1).argsort(1).astype(np.float64)  # Spearman across neurons
                mats.append(np.corrcoef(ranks))
            result = np.mean(mats, axis=0)
    else:
        P = np.stack([(x[lang == li] > 0).mean(0) for li in range(len(LANGS))])  # [langs, layers, width]
        p = P / P.sum(0, keepdims=True)
        result = -(p * np.log(np.where(p > 0, p, 1))).sum(0)
    return {"ok": True, "seconds": time.perf_counter() - t0, "finite": bool(np.isfinite(result).any())}


def child_pass(a) -> dict:
    """The grouped pass alone: every layer of the token rows, by label, no cache."""
    import neurostore
    from neurostore import moments as mo

    s = neurostore.open(a.store)
    sel = mo.Selection("mlp", tuple(s.sites["mlp"]["layers"]), "tokens", "label")
    worker_rss = None
    if a.cluster:
        import distributed

        with distributed.LocalCluster(n_workers=a.threads, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
            with distributed.Client(cluster) as client:
                client.run(lambda: None)  # workers up before the clock
                t0 = time.perf_counter()
                mom = mo.compute(s, sel, quantiles=a.quantiles, scheduler=client)
                seconds = time.perf_counter() - t0
                worker_rss = max(client.run(common.peak_rss_mb).values())
    else:
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        mom = mo.compute(s, sel, quantiles=a.quantiles, workers=a.threads)
        seconds = time.perf_counter() - t0
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    # CPU seconds of this process (all its threads): on a shared machine MB per CPU-second is the
    # figure that other jobs do not move; not measured across a cluster's worker processes.
    return {"ok": True, "seconds": seconds, "rows": int(mom.count.sum()), "worker_peak_rss_mb": worker_rss,
            "cpu_seconds": None if a.cluster else cpu}


def child(a) -> None:
    _limit(a.limit_mb)
    try:
        info = {"neurostore": child_neurostore, "memory": child_memory, "pass": child_pass}[a.child](a)
    except MemoryError:
        info = {"ok": False, "error": f"MemoryError under a {a.limit_mb} MiB address-space limit"}
    except Exception as err:  # noqa: BLE001 - report how it failed
        text = str(err).splitlines()[0] if str(err) else ""
        kind = "out of memory" if "alloc" in text.lower() or "memory" in text.lower() else "failed"
        info = {"ok": False, "error": f"{kind}: {type(err).__name__}: {text[:200]}"}
    info["peak_rss_mb"] = common.peak_rss_mb()
    Path(a.result).write_text(json.dumps(info))


# ----------------------------------------------------------------------------------------------
# parent


def run_one(kind: str, store: Path, query: str, a, work: Path) -> dict:
    shutil.rmtree(store / "cache", ignore_errors=True)  # a first query is a real pass
    common.drop_cache(store)
    args = ["benchmarks.query", "--child", kind, "--store", str(store), "--query", query, "--threads", str(a.threads),
            "--limit-mb", str(a.limit_mb), "--result", str(work / "result.json")]
    try:
        return common.run_child(args, env=ENV, timeout=1800)
    except Exception as err:  # noqa: BLE001 - e.g. killed by the kernel
        return {"ok": False, "error": str(err).splitlines()[0][:300]}


def run_pass(store: Path, a, work: Path, threads: int, cluster: bool = False, quantiles: bool = False) -> dict:
    common.drop_cache(store)
    args = ["benchmarks.query", "--child", "pass", "--store", str(store), "--threads", str(threads),
            "--limit-mb", "0", "--result", str(work / "result.json")]
    args += ["--cluster"] if cluster else []
    args += ["--quantiles"] if quantiles else []
    try:
        return common.run_child(args, env=ENV, timeout=1800)
    except Exception as err:  # noqa: BLE001
        return {"ok": False, "error": str(err).splitlines()[0][:300]}


PASS_ROWS = (  # (key, label, threads, cluster, quantiles)
    ("threads1", "pass, 1 local thread", 1, False, False),
    ("threads2", "pass, 2 local threads", 2, False, False),
    ("cluster2", "pass, LocalCluster 2 workers", 2, True, False),
    ("quantiles2", "pass + quantile sketch, 2 threads", 2, False, True),
    ("nocrc2", "pass, 2 local threads, same store without checksums", 2, False, False),  # what the CRC32C check costs
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.query", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CI-sized run: two small stores, one repeat.")
    p.add_argument("--sizes-mb", default=None, help="Store sizes (raw float16 MB), comma-separated. Default 256,1024,3072 (quick 8,32).")
    p.add_argument("--limit-mb", type=int, default=None, help="Address-space limit of every query process, MiB (default 1536; quick 1024).")
    p.add_argument("--layers", type=int, default=2, help="Layers in the synthetic stores.")
    p.add_argument("--width", type=int, default=1024, help="Neurons per layer.")
    p.add_argument("--queries", default=",".join(QUERIES), help="Queries to run, comma-separated.")
    p.add_argument("--threads", type=int, default=None, help="Query worker threads (default: all cores).")
    p.add_argument("--work", default=None, help="Scratch folder for the stores (default: a temporary folder).")
    p.add_argument("--results", default=str(common.RESULTS), help="Folder for the results JSON.")
    p.add_argument("--passes", default="threads1,threads2,cluster2,quantiles2,nocrc2",
                   help="Pass rows to run (threads1, threads2, cluster2, quantiles2, nocrc2; empty for none).")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--cluster", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--quantiles", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--store", help=argparse.SUPPRESS)
    p.add_argument("--query", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.threads = a.threads or os.cpu_count() or 1
    if a.limit_mb is None:
        a.limit_mb = 1024 if a.quick else 1536
    if a.child:
        child(a)
        return 0

    sizes = [int(x) for x in (a.sizes_mb or ("8,32" if a.quick else "256,1024,3072")).split(",")]
    queries = [q for q in a.queries.split(",") if q]
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="neurostore-qbench-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    out_sizes = []
    for size in sizes:
        n_tokens = (size << 20) // (a.layers * a.width * 2)
        path = work / f"synthetic-{size}mb.zarr"
        shutil.rmtree(path, ignore_errors=True)
        t0 = time.perf_counter()
        info = build_store(path, n_tokens, a.layers, a.width)
        info["build_seconds"] = time.perf_counter() - t0
        acts = path / "acts" / "mlp"
        bw = common.read_bandwidth([acts], cold=True)
        bw_warm = common.read_bandwidth([acts], cold=False)
        print(f"store {size} MB raw: {info['n_tokens']:,} tokens, {info['store_bytes'] / 1e6:,.0f} MB on disk; "
              f"raw read {bw['mb_s']:,.0f} MB/s cold, {bw_warm['mb_s']:,.0f} MB/s warm", flush=True)
        common.drop_cache(acts)
        direct = odirect_read(acts)
        print("  O_DIRECT sequential read: " + (f"{direct['mb_s']:,.0f} MB/s" if direct["ok"] else direct["error"]), flush=True)
        entry = {"size_mb": size, **info, "read_bandwidth": bw, "read_bandwidth_warm": bw_warm, "odirect": direct,
                 "passes": {}, "queries": []}
        wanted = [r for r in PASS_ROWS if r[0] in a.passes.split(",")]
        for key, label, threads, cluster, quantiles in wanted:
            target = path
            if key == "nocrc2":
                target = work / f"synthetic-{size}mb-nocrc.zarr"
                shutil.rmtree(target, ignore_errors=True)
                build_store(target, n_tokens, a.layers, a.width, checksums=False)
            r = run_pass(target, a, work, threads, cluster, quantiles)
            if key == "nocrc2":
                shutil.rmtree(target, ignore_errors=True)
            if r.get("ok"):
                r["mb_s"] = info["store_bytes"] / r["seconds"] / 1e6
                r["mb_per_cpu_s"] = info["store_bytes"] / r["cpu_seconds"] / 1e6 if r.get("cpu_seconds") else None
                r["x_odirect"] = r["mb_s"] / direct["mb_s"] if direct["ok"] else None
            entry["passes"][key] = r
            shown = (f"{r['seconds']:.2f}s {r['mb_s']:,.0f} MB/s ({common.fmt(r['x_odirect'], 2)}x O_DIRECT), "
                     f"{common.fmt(r.get('mb_per_cpu_s'), 0)} MB per CPU-s, RSS {r['peak_rss_mb']:,.0f} MiB"
                     + (f", workers {r['worker_peak_rss_mb']:,.0f} MiB" if r.get("worker_peak_rss_mb") else "")) if r.get("ok") else r.get("error")
            print(f"  {label:36s} {shown}", flush=True)
        for q in queries:
            layers_read = 1 if q in ("variance", "correlate") else a.layers
            read = info["store_bytes"] * layers_read / a.layers
            ns = run_one("neurostore", path, q, a, work)
            mem = run_one("memory", path, q, a, work)
            for r in (ns, mem):
                if r.get("ok"):
                    r["mb_s"] = read / r["seconds"] / 1e6
                    r["share_of_raw_read"] = r["mb_s"] / bw["mb_s"]
            entry["queries"].append({"query": q, "bytes_read": read, "decoded_bytes": info["n_tokens"] * a.width * layers_read * 4,
                                     "neurostore": ns, "in_memory": mem})
            show = lambda r: (f"{r['seconds']:.2f}s {r['mb_s']:,.0f} MB/s RSS {r['peak_rss_mb']:,.0f} MiB" if r.get("ok") else r.get("error", "failed"))
            cached = f", cached {ns['cached_seconds']:.3f}s" if ns.get("ok") else ""
            print(f"  {q:9s} neurostore {show(ns)}{cached} | in-memory {show(mem)}", flush=True)
        shutil.rmtree(path, ignore_errors=True)
        out_sizes.append(entry)

    goals = []
    largest = out_sizes[-1]
    for q in largest["queries"]:
        ns = q["neurostore"]
        goals.append({"target": f"{q['query']}: neurostore completes at {largest['size_mb']} MB under a {a.limit_mb} MiB limit",
                      "pass": bool(ns.get("ok")), "detail": "in-memory: " + ("ok" if q["in_memory"].get("ok") else q["in_memory"].get("error", "failed"))})
        if ns.get("ok"):
            goals.append({"target": f"{q['query']}: pass reaches >= 70% of raw cold read bandwidth", "pass": ns["share_of_raw_read"] >= 0.7,
                          "detail": f"{ns['mb_s']:,.0f} of {largest['read_bandwidth']['mb_s']:,.0f} MB/s ({ns['share_of_raw_read']:.0%})"})
            goals.append({"target": f"{q['query']}: second (cached) query < 1 s", "pass": ns["cached_seconds"] < 1.0,
                          "detail": f"{ns['cached_seconds']:.3f} s"})
    ps = largest["passes"]
    if ps.get("threads2", {}).get("ok") and largest["odirect"]["ok"]:
        r = ps["threads2"]
        goals.append({"target": f"uncached pass (2 threads, store pages evicted) >= 0.5x O_DIRECT sequential read at {largest['size_mb']} MB",
                      "pass": r["x_odirect"] >= 0.5,
                      "detail": f"{r['mb_s']:,.0f} of {largest['odirect']['mb_s']:,.0f} MB/s ({r['x_odirect']:.2f}x)"})
    if ps.get("threads2", {}).get("ok") and ps.get("cluster2", {}).get("ok"):
        ratio = ps["threads2"]["seconds"] / ps["cluster2"]["seconds"]
        goals.append({"target": "LocalCluster (2 worker processes) within 20% of 2 local threads", "pass": ratio >= 0.8,
                      "detail": f"{ps['cluster2']['mb_s']:,.0f} vs {ps['threads2']['mb_s']:,.0f} MB/s ({ratio:.2f}x)"})
    if ps.get("threads2", {}).get("ok") and ps.get("nocrc2", {}).get("ok"):
        goals.append({"target": "checksums: the pass with CRC32C checks, against the same store without them (information)", "pass": True,
                      "detail": f"{ps['threads2']['mb_s']:,.0f} vs {ps['nocrc2']['mb_s']:,.0f} MB/s "
                                f"({ps['threads2']['seconds'] / ps['nocrc2']['seconds'] - 1:+.1%} time)"})
    rss = [(e["size_mb"], e["passes"]["threads2"]["peak_rss_mb"]) for e in out_sizes if e["passes"].get("threads2", {}).get("ok")]
    if len(rss) >= 2:
        goals.append({"target": "pass peak RSS flat in store size (largest / smallest <= 1.10)", "pass": rss[-1][1] / rss[0][1] <= 1.10,
                      "detail": ", ".join(f"{s:,} MB: {r:,.0f} MiB" for s, r in rss)})
    plines = ["| store (raw MB) | on disk MB | O_DIRECT MB/s | row | s | MB/s | x O_DIRECT | MB per CPU-s | peak RSS MiB |",
              "|---|---|---|---|---|---|---|---|---|"]
    for e in out_sizes:
        for key, label, *_ in PASS_ROWS:
            r = e["passes"].get(key)
            if r is None:
                continue
            rss_txt = common.fmt(r.get("peak_rss_mb"), 0) + (f" (+ workers {r['worker_peak_rss_mb']:,.0f} each)" if r.get("worker_peak_rss_mb") else "")
            plines.append(f"| {e['size_mb']:,} | {e['store_bytes'] / 1e6:,.0f} | {common.fmt(e['odirect'].get('mb_s'), 0)} | {label} "
                          f"| {common.fmt(r.get('seconds'), 2) if r.get('ok') else 'failed: ' + r.get('error', '')[:60]} | {common.fmt(r.get('mb_s'), 0)} "
                          f"| {common.fmt(r.get('x_odirect'), 2)} | {common.fmt(r.get('mb_per_cpu_s'), 0)} | {rss_txt} |")
    lines = plines + ["", "| store (raw MB) | query | neurostore s | MB/s (share of raw read) | RSS MiB | cached s | in-memory s | in-memory RSS MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for e in out_sizes:
        for q in e["queries"]:
            ns, mem = q["neurostore"], q["in_memory"]
            lines.append(
                f"| {e['size_mb']:,} | {q['query']} | {common.fmt(ns.get('seconds'), 2) if ns.get('ok') else 'failed'} "
                f"| {common.fmt(ns.get('mb_s'), 0)} ({(ns.get('share_of_raw_read') or 0):.0%}) | {common.fmt(ns.get('peak_rss_mb'), 0)} "
                f"| {common.fmt(ns.get('cached_seconds'), 3)} | {common.fmt(mem.get('seconds'), 2) if mem.get('ok') else 'fails: ' + mem.get('error', '')[:40]} "
                f"| {common.fmt(mem.get('peak_rss_mb'), 0)} |"
            )
    lines.append("\n| target | result | detail |\n|---|---|---|")
    lines += [f"| {g['target']} | {'PASS' if g['pass'] else 'short'} | {g['detail']} |" for g in goals]
    table = "\n".join(lines)
    print("\n" + table)
    payload = {
        "benchmark": "query", "quick": a.quick,
        "command": "python -m benchmarks.query " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": common.machine(work, a.threads),
        "settings": {"passes": a.passes, "page_cache": "store files evicted with posix_fadvise(DONTNEED) before each timed pass and read; O_DIRECT bypasses it",
                     "limit_mb": a.limit_mb, "layers": a.layers, "width": a.width, "store_dtype": "float16", "threads": a.threads,
                     "env": ENV, "rss": "ru_maxrss of a fresh child process per query",
                     "cold": "page cache of the store dropped (posix_fadvise DONTNEED) before each first query"},
        "load_average_at_end": os.getloadavg(), "sizes": out_sizes, "targets": goals, "table_markdown": table, "wall_seconds": time.perf_counter() - started,
    }
    return common.finish(payload, "query-quick" if a.quick else "query", a.results, work, keep=bool(a.work))


if __name__ == "__main__":
    sys.exit(main())

"""Extraction benchmark: neurostore against the bare forward pass and the ways people write it.

    python -m benchmarks.extract            # full run (by hand; ~15 min on 2 CPU cores)
    python -m benchmarks.extract --quick    # CI-sized (MiniLM only, ~200 sentences, 1 repeat)

Every row runs in a fresh child process (its own peak RSS, read by the child from
``VmHWM``), on the same model, the same corpus and float32 compute, with the same torch
thread count. Repeats are interleaved (A B C ... A B C ...) and ratios are taken within a repeat,
so a slow moment of the machine hits every row alike. Times cover reading the corpus,
tokenising, forward passes and writing; the model is loaded (and warmed up with one forward)
before the clock starts, for every row alike.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from contextlib import redirect_stdout
from pathlib import Path

from benchmarks import common

ROWS = ("bare", "ns_resid", "ns_resid_mlp", "ns_relevance", "ns_attnlrp", "ns_pooled", "ns_parts2", "paper", "usual", "careful", "neurox")
# relevance rows load the model with a (random) classification head and explain its predicted logit:
# MiniLM has no head, and the head's cost is negligible next to the encoder's backward pass
LABELS = {
    "bare": "bare forward (ceiling)",
    "ns_resid": "neurostore resid, all layers+tokens",
    "ns_resid_mlp": "neurostore resid+mlp, all layers+tokens",
    "ns_relevance": "neurostore resid+mlp, --quantity both, grad-x-act",
    "ns_attnlrp": "neurostore resid+mlp, --quantity both, attnlrp",
    "ns_pooled": "neurostore pooled only (--no-tokens)",
    "ns_parts2": "neurostore resid, --parts 2 --devices cpu,cpu",
    "paper": "paper's way (hooks, 1 sentence, lists, np.save)",
    "usual": "usual loop (32 in corpus order, padded np.save)",
    "careful": "careful loop (32 length-sorted, padding stripped)",
    "neurox": "NeuroX extract_representations (hdf5)",
    "ns_resid_scale_1x": "neurostore resid, RSS corpus 1x",
    "ns_resid_scale_4x": "neurostore resid, RSS corpus 4x",
}
BATCH = 32


# ----------------------------------------------------------------------------------------------
# corpus and models


def make_corpus(path: Path, n_docs: int, seed: int = 0) -> Path:
    """Mixed-length documents from the sample sentences: 1 to 6 sentences of one language joined
    (most documents are one sentence, a few are paragraphs), so padding in corpus order is costly."""
    rows = [json.loads(line) for line in common.DATA.read_text(encoding="utf-8").splitlines()]
    by_lang: dict[str, list[dict]] = {}
    for r in rows:
        by_lang.setdefault(r["lang"], []).append(r)
    rng = random.Random(seed)
    langs = sorted(by_lang)
    sizes = [1, 1, 1, 1, 1, 2, 2, 3, 4, 6]
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n_docs):
            lang = rng.choice(langs)
            picked = rng.sample(by_lang[lang], rng.choice(sizes))
            text = " ".join(p["text"] for p in picked)
            f.write(json.dumps({"text": text, "label": picked[0]["label"], "lang": lang}, ensure_ascii=False) + "\n")
    return path


def build_xlmr_base(folder: Path) -> Path:
    """An XLM-R-base-sized encoder with random weights (XLMRobertaConfig defaults: 12 layers,
    hidden 768, MLP 3072, vocabulary 250002) and the packaged MiniLM's tokenizer (its ids are a
    subset of the vocabulary). Speed does not depend on the weights."""
    if (folder / "config.json").exists():
        return folder
    import torch
    from transformers import AutoTokenizer, XLMRobertaConfig, XLMRobertaModel

    from neurostore import models

    tok = AutoTokenizer.from_pretrained(models.default_model())
    torch.manual_seed(0)
    config = XLMRobertaConfig(vocab_size=250002, pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id)
    model = XLMRobertaModel(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def texts_of(corpus: Path) -> list[str]:
    return [json.loads(line)["text"] for line in corpus.read_text(encoding="utf-8").splitlines()]


# ----------------------------------------------------------------------------------------------
# the rows (run inside a child process)


def _payload(n_values: int) -> int:
    """Bytes of the kept values at float32, the compute dtype: the base of the compression ratio."""
    return int(n_values) * 4


def row_bare(loaded, corpus: Path, out: Path, a) -> dict:
    import numpy as np
    import torch

    from neurostore import batching

    ids, _ = batching.tokenize(loaded.tokenizer, texts_of(corpus), loaded.max_length())
    lengths = np.array([len(x) for x in ids])
    with torch.inference_mode():
        for docs in batching.plan_batches(lengths, a.batch_tokens):
            x, mask = batching.pad([ids[i] for i in docs], loaded.pad_id, loaded.device)
            loaded.model(input_ids=x, attention_mask=mask)
    return {"tokens": int(lengths.sum()), "payload_bytes": 0, "disk_path": None}


def _row_neurostore(loaded, corpus: Path, out: Path, a, sites: list[str], tokens: bool, **relevance) -> dict:
    from neurostore import extract as ex

    store = out / "store.zarr"  # the model was loaded before the clock starts: extract() takes it as is
    res = ex.extract([str(corpus)], str(store), model=loaded,
                     options=ex.ExtractOptions(sites=sites, tokens=tokens, max_batch_tokens=a.batch_tokens, **relevance))
    meta = res.meta
    values = 0
    for spec in meta["sites"].values():
        per_row = len(spec["layers"]) * spec["width"]
        values += per_row * (meta["n_tokens"] if meta["tokens"] else 0) + per_row * meta["n_docs"] * len(meta["pool"])
    values *= len(meta.get("quantities") or ["activation"])
    return {"tokens": int(res.tokens), "payload_bytes": _payload(values), "disk_path": str(store), "store": str(store)}


def row_ns_resid(loaded, corpus, out, a):
    return _row_neurostore(loaded, corpus, out, a, ["resid"], True)


def row_ns_resid_mlp(loaded, corpus, out, a):
    return _row_neurostore(loaded, corpus, out, a, ["resid", "mlp"], True)


def row_ns_relevance(loaded, corpus, out, a):
    return _row_neurostore(loaded, corpus, out, a, ["resid", "mlp"], True, quantity="both", rule="grad-x-act", relevance_target="predicted")


def row_ns_attnlrp(loaded, corpus, out, a):
    return _row_neurostore(loaded, corpus, out, a, ["resid", "mlp"], True, quantity="both", rule="attnlrp", relevance_target="predicted")


def row_ns_pooled(loaded, corpus, out, a):
    return _row_neurostore(loaded, corpus, out, a, ["resid"], False)


def row_ns_parts2(loaded, corpus: Path, out: Path, a) -> dict:
    """``--parts 2 --devices cpu,cpu``: a local Dask cluster of 2 worker processes, each loading the
    model itself (inside the clock: that is the distributed path's cost). On 2 cores it shows the
    overhead against ``ns_resid`` (one process), not a speed-up."""
    from neurostore import extract as ex
    from neurostore import store as st
    from neurostore.parts import extract_parts

    folder = out / "parts"
    res = extract_parts([str(corpus)], str(folder), 2, model=str(a.model_path), devices=["cpu", "cpu"],
                        options=ex.ExtractOptions(sites=["resid"], max_batch_tokens=a.batch_tokens, device="cpu"))
    metas = st.open(str(folder)).metas
    values = sum(len(spec["layers"]) * spec["width"] * (m["n_tokens"] + m["n_docs"] * len(m["pool"])) for m in metas for spec in m["sites"].values())
    return {"tokens": int(res.tokens), "payload_bytes": _payload(values), "disk_path": str(folder), "store": str(folder)}


def row_paper(loaded, corpus: Path, out: Path, a) -> dict:
    """Forward hooks on the embeddings and every block, one sentence at a time, vectors appended
    to Python lists, one np.save per layer at the end."""
    import numpy as np
    import torch

    model, tok = loaded.model, loaded.tokenizer
    blocks = [model.embeddings, *model.encoder.layer]
    acts: list[list] = [[] for _ in blocks]

    def hook_for(k):
        def hook(_mod, _inp, output):
            h = output[0] if isinstance(output, tuple) else output
            acts[k].append(h[0].cpu().numpy())

        return hook

    handles = [b.register_forward_hook(hook_for(k)) for k, b in enumerate(blocks)]
    n_tokens = 0
    with torch.no_grad():
        for text in texts_of(corpus):
            enc = tok(text, return_tensors="pt", truncation=True, max_length=loaded.max_length())
            model(**enc)
            n_tokens += enc["input_ids"].shape[1]
    for h in handles:
        h.remove()
    folder = out / "paper"
    folder.mkdir()
    values = 0
    for k, rows in enumerate(acts):
        arr = np.concatenate(rows)
        values += arr.size
        np.save(folder / f"layer{k:02d}.npy", arr)
    return {"tokens": n_tokens, "payload_bytes": _payload(values), "disk_path": str(folder)}


def row_usual(loaded, corpus: Path, out: Path, a) -> dict:
    """Batches of 32 in corpus order, output_hidden_states=True, one np.save of the padded batch
    (and its attention mask) per file."""
    import numpy as np
    import torch

    model, tok = loaded.model, loaded.tokenizer
    texts = texts_of(corpus)
    folder = out / "usual"
    folder.mkdir()
    n_tokens, values = 0, 0
    with torch.no_grad():
        for b, i in enumerate(range(0, len(texts), BATCH)):
            enc = tok(texts[i:i + BATCH], padding=True, truncation=True, max_length=loaded.max_length(), return_tensors="pt")
            hs = model(**enc, output_hidden_states=True).hidden_states
            arr = torch.stack(hs, dim=1).cpu().numpy()  # [B, L+1, S, H]
            np.save(folder / f"batch{b:05d}.npy", arr)
            np.save(folder / f"mask{b:05d}.npy", enc["attention_mask"].numpy())
            real = int(enc["attention_mask"].sum())
            n_tokens += real
            values += real * arr.shape[1] * arr.shape[3]
    return {"tokens": n_tokens, "payload_bytes": _payload(values), "disk_path": str(folder)}


def row_careful(loaded, corpus: Path, out: Path, a) -> dict:
    """The same loop with batches of 32 sorted by length and padding stripped before np.save
    (one [real tokens, L+1, H] array and the sentence indices per batch)."""
    import numpy as np
    import torch

    model, tok = loaded.model, loaded.tokenizer
    texts = texts_of(corpus)
    ids = tok(texts, truncation=True, max_length=loaded.max_length())["input_ids"]
    order = np.argsort([-len(x) for x in ids], kind="stable")
    folder = out / "careful"
    folder.mkdir()
    n_tokens, values = 0, 0
    with torch.no_grad():
        for b, i in enumerate(range(0, len(order), BATCH)):
            docs = order[i:i + BATCH]
            enc = tok.pad({"input_ids": [ids[j] for j in docs]}, return_tensors="pt")
            hs = model(**enc, output_hidden_states=True).hidden_states
            real = torch.stack(hs, dim=2)[enc["attention_mask"].bool()].cpu().numpy()  # [n_real, L+1, H]
            np.save(folder / f"batch{b:05d}.npy", real)
            np.save(folder / f"docs{b:05d}.npy", docs)
            n_tokens += real.shape[0]
            values += real.size
    return {"tokens": n_tokens, "payload_bytes": _payload(values), "disk_path": str(folder)}


def row_neurox(loaded, corpus: Path, out: Path, a) -> dict:
    """NeuroX 1.0.9 as documented: ``extract_representations(model, corpus.txt, out.hdf5)``; one
    sentence at a time, subword vectors aggregated to words (its default, ``last``), float32."""
    import os

    from neurox.data.extraction import transformers_extractor as tx

    loaded.model.config.output_hidden_states = True  # what its own loader sets
    tx.get_model_and_tokenizer = lambda *args, **kw: (loaded.model, loaded.tokenizer)  # loaded before the clock
    texts = texts_of(corpus)
    txt = out / "corpus.txt"
    txt.write_text("\n".join(texts) + "\n", encoding="utf-8")
    target = out / "neurox.hdf5"
    with open(os.devnull, "w") as devnull, redirect_stdout(devnull):
        tx.extract_representations(a.model_path, str(txt), str(target), output_type="hdf5")
    ids = loaded.tokenizer(texts, truncation=True, max_length=loaded.max_length())["input_ids"]
    words = sum(len(t.split(" ")) for t in texts)
    layers = loaded.n_layers + 1
    return {"tokens": sum(len(x) for x in ids), "payload_bytes": _payload(words * layers * loaded.hidden_size),
            "disk_path": str(target), "note": "stores word vectors (last subword), not token vectors"}


def child(a) -> None:
    import numpy as np
    import torch

    torch.set_num_threads(a.threads)
    from neurostore import models

    t0 = time.perf_counter()
    torch.manual_seed(0)  # the relevance rows' random head
    loaded = models.load(a.model_path, torch.device("cpu"), classifier=True if a.child in ("ns_relevance", "ns_attnlrp") else None)
    load_s = time.perf_counter() - t0
    with torch.inference_mode():  # one warm-up forward, every row alike
        loaded.model(input_ids=torch.full((8, 32), 1000), attention_mask=torch.ones(8, 32, dtype=torch.long))
    out = Path(a.work)
    out.mkdir(parents=True, exist_ok=True)
    fn = globals()[f"row_{a.child}"]
    rss_before = common.peak_rss_mb()
    t0 = time.perf_counter()
    info = fn(loaded, Path(a.corpus), out, a)
    seconds = time.perf_counter() - t0
    info.update(seconds=seconds, load_seconds=load_s, peak_rss_mb=common.peak_rss_mb(), rss_before_mb=rss_before,
                threads=torch.get_num_threads())
    info["disk_bytes"] = common.dir_bytes(Path(info["disk_path"])) if info.get("disk_path") else 0
    if info.get("store"):  # leave a store that can be queried: prove it
        import neurostore
        from neurostore import query

        t0 = time.perf_counter()
        s = neurostore.open(info["store"])
        rows = "tokens" if s.meta["tokens"] else "mean"
        res = query.variance(s, "resid", rows=rows, by="label", top=5, workers=a.threads, cache=False)
        info["query_check"] = {"ok": bool(np.isfinite(res.variance).all()), "seconds": time.perf_counter() - t0, "rows": rows}
    Path(a.result).write_text(json.dumps(info))


# ----------------------------------------------------------------------------------------------
# the parent: schedule, summarise, save


def run_rows(model_name: str, model_path: Path, corpus: Path, rows: list[str], repeats: int, a, work: Path) -> list[dict]:
    results = []
    for rep in range(repeats):
        for row in rows:
            row_dir = work / f"{model_name}-{row}-{rep}"
            shutil.rmtree(row_dir, ignore_errors=True)
            args = ["benchmarks.extract", "--child", row, "--model-path", str(model_path), "--corpus", str(corpus),
                    "--work", str(row_dir), "--threads", str(a.threads), "--batch-tokens", str(a.batch_tokens),
                    "--result", str(work / "result.json")]
            try:
                r = common.run_child(args, env={"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"})
                r.update(ok=True)
            except Exception as err:  # noqa: BLE001 - a peer library failing is a result, not a crash
                r = {"ok": False, "error": str(err).splitlines()[-1][:300]}
            r.update(model=model_name, row=row, repeat=rep)
            if r["ok"]:
                r["tokens_per_s"] = r["tokens"] / r["seconds"]
                r["mb_s_written"] = r["disk_bytes"] / r["seconds"] / 1e6
                r["compression"] = r["payload_bytes"] / r["disk_bytes"] if r["disk_bytes"] else None
            shutil.rmtree(row_dir, ignore_errors=True)
            results.append(r)
            status = f"{r['tokens_per_s']:,.0f} tok/s, {r['disk_bytes'] / 1e6:,.1f} MB, RSS {r['peak_rss_mb']:,.0f} MiB" if r["ok"] else r["error"]
            print(f"  [{model_name} rep {rep + 1}/{repeats}] {row:13s} {status}", flush=True)
    return results


def summarise(results: list[dict], model_name: str) -> dict:
    mine = [r for r in results if r["model"] == model_name and "scale" not in r["row"]]
    rows = sorted({r["row"] for r in mine}, key=lambda x: list(LABELS).index(x))
    bare = {r["repeat"]: r["tokens_per_s"] for r in mine if r["row"] == "bare" and r["ok"]}
    out = {}
    for row in rows:
        ok = [r for r in mine if r["row"] == row and r["ok"]]
        if not ok:
            out[row] = {"ok": False, "error": next(r["error"] for r in mine if r["row"] == row)}
            continue
        out[row] = {
            "ok": True,
            "tokens": ok[0]["tokens"],
            "tokens_per_s": common.spread([r["tokens_per_s"] for r in ok]),
            "mb_s_written": common.spread([r["mb_s_written"] for r in ok]),
            "disk_bytes": common.spread([r["disk_bytes"] for r in ok])["median"],
            "payload_bytes": ok[0]["payload_bytes"],
            "compression": common.spread([r["compression"] for r in ok])["median"] if ok[0]["compression"] else None,
            "peak_rss_mb": common.spread([r["peak_rss_mb"] for r in ok]),
            "vs_bare": common.spread([r["tokens_per_s"] / bare[r["repeat"]] for r in ok if r["repeat"] in bare]),
            "query_check": ok[0].get("query_check"),
            "note": ok[0].get("note"),
        }
    return out


def ratio_within(results: list[dict], model_name: str, a_row: str, b_row: str) -> dict:
    """tokens/s of ``a_row`` over ``b_row``, taken within each repeat."""
    by = {(r["row"], r["repeat"]): r for r in results if r["model"] == model_name and r["ok"]}
    vals = [by[(a_row, k)]["tokens_per_s"] / by[(b_row, k)]["tokens_per_s"] for (row, k) in by if row == a_row and (b_row, k) in by]
    return common.spread(vals)


def targets(results: list[dict], summary: dict, scale: dict | None) -> list[dict]:
    out = []

    def add(model, name, value, goal, ok, detail=""):
        out.append({"model": model, "target": name, "value": value, "goal": goal, "pass": bool(ok), "detail": detail})

    for model, rows in summary.items():
        if "ns_resid" not in rows or not rows["ns_resid"]["ok"]:
            continue
        r = ratio_within(results, model, "ns_resid", "bare")
        if r["median"] is not None:
            add(model, "resid all layers+tokens vs bare forward", r["median"], ">= 0.90", r["median"] >= 0.90, f"spread {r['min']:.2f}-{r['max']:.2f}")
        for peer, goal in (("paper", 3.0), ("usual", 1.5), ("careful", 1.0)):
            if peer in rows and rows[peer]["ok"]:
                r = ratio_within(results, model, "ns_resid", peer)
                add(model, f"resid tokens/s vs {peer}", r["median"], f">= {goal:g}x", r["median"] >= goal, f"spread {r['min']:.2f}-{r['max']:.2f}")
        if "careful" in rows and rows["careful"]["ok"]:
            mine, theirs = rows["ns_resid"]["disk_bytes"], rows["careful"]["disk_bytes"]
            q = rows["ns_resid"].get("query_check") or {}
            add(model, "fewer bytes than careful, queryable", mine / theirs, "< 1 and query ok", mine < theirs and q.get("ok"),
                f"{mine / 1e6:,.0f} MB vs {theirs / 1e6:,.0f} MB; query {q.get('seconds', 0):.1f}s")
    if scale:
        g = scale["rss_4x_mb"] / scale["rss_1x_mb"]
        add(scale["model"], "peak RSS flat, 4x corpus vs 1x", g, "<= 1.10", g <= 1.10,
            f"{scale['rss_1x_mb']:,.0f} -> {scale['rss_4x_mb']:,.0f} MiB ({scale['tokens_1x']:,} -> {scale['tokens_4x']:,} tokens)")
    return out


def print_tables(summary: dict, bandwidth: dict, goals: list[dict]) -> str:
    lines = []
    for model, rows in summary.items():
        lines.append(f"\n### {model}\n")
        lines.append("| row | tokens/s (median, spread) | x bare | MB/s written | on disk MB | compression | peak RSS MiB |")
        lines.append("|---|---|---|---|---|---|---|")
        for row, s in rows.items():
            if not s["ok"]:
                lines.append(f"| {LABELS[row]} | failed: {s['error'][:80]} | | | | | |")
                continue
            t = s["tokens_per_s"]
            lines.append(
                f"| {LABELS[row]} | {common.fmt(t['median'], 0)} (±{(t['spread'] or 0) * 50:.0f}%) | {common.fmt(s['vs_bare']['median'], 2)} "
                f"| {common.fmt(s['mb_s_written']['median'])} | {common.fmt(s['disk_bytes'] / 1e6)} | {common.fmt(s['compression'], 2)} "
                f"| {common.fmt(s['peak_rss_mb']['median'], 0)} |"
            )
        bw = bandwidth.get(model)
        if bw:
            lines.append(f"\nRaw sequential write of the same bytes as neurostore resid ({bw['bytes'] / 1e6:,.0f} MB): "
                         f"{bw['buffered_mb_s']:,.0f} MB/s buffered ({bw['buffered_seconds']:.2f} s), {bw['fsync_mb_s']:,.0f} MB/s with fsync ({bw['fsync_seconds']:.2f} s).")
    lines.append("\n| model | target | value | goal | result |\n|---|---|---|---|---|")
    for g in goals:
        lines.append(f"| {g['model']} | {g['target']} | {g['value']:.2f} ({g['detail']}) | {g['goal']} | {'PASS' if g['pass'] else 'short'} |")
    text = "\n".join(lines)
    print(text)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.extract", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CI-sized run: MiniLM only, small corpus, one repeat (under 2 minutes).")
    p.add_argument("--models", default=None, help="Comma-separated: minilm, xlmr-base. Default: both (quick: minilm).")
    p.add_argument("--docs", type=int, default=None, help="Documents for MiniLM (default 300; quick 96).")
    p.add_argument("--xlmr-docs", type=int, default=None, help="Documents for the XLM-R-base-sized model (default 40).")
    p.add_argument("--repeats", type=int, default=None, help="Interleaved repeats per row (default 3 for MiniLM, 2 for XLM-R; quick 1).")
    p.add_argument("--rows", default=",".join(ROWS), help="Rows to run, comma-separated.")
    p.add_argument("--threads", type=int, default=None, help="torch threads in every row (default: all cores).")
    p.add_argument("--batch-tokens", type=int, default=512, help="Padded tokens per batch for neurostore and the bare forward (neurostore's CPU default).")
    p.add_argument("--no-scale", action="store_true", help="Skip the 1x/4x-corpus peak-RSS rows.")
    p.add_argument("--scale-docs", type=int, default=None, help="Documents of the 1x corpus of the peak-RSS rows (default 1200, more than one 256 MB window; quick: --docs).")
    p.add_argument("--work", default=None, help="Scratch folder for corpora, models and outputs (default: a temporary folder).")
    p.add_argument("--results", default=str(common.RESULTS), help="Folder for the results JSON.")
    # internal: one row in a child process
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--model-path", help=argparse.SUPPRESS)
    p.add_argument("--corpus", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    import os

    a.threads = a.threads or os.cpu_count() or 1
    if a.child:
        child(a)
        return 0

    model_names = (a.models or ("minilm" if a.quick else "minilm,xlmr-base")).split(",")
    docs = a.docs or (96 if a.quick else 300)
    xdocs = a.xlmr_docs or 40
    rows = [r for r in a.rows.split(",") if r]
    try:
        import h5py  # noqa: F401
        import neurox  # noqa: F401
    except ImportError:
        rows = [r for r in rows if r != "neurox"]
        print("NeuroX not installed: its row is skipped (pip install neurox h5py --no-deps to include it)")
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="neurostore-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    from neurostore import models

    paths = {}
    for name in model_names:
        if name == "minilm":
            paths[name] = Path(models.default_model())
        elif name == "xlmr-base":
            paths[name] = build_xlmr_base(work / "xlmr-base")
        else:
            p.error(f"--models: unknown model {name!r} (use minilm, xlmr-base)")
    results, corpora = [], {}
    for name in model_names:
        n = docs if name == "minilm" else xdocs
        reps = a.repeats or (1 if a.quick else (3 if name == "minilm" else 2))
        corpus = make_corpus(work / f"corpus-{name}-{n}.jsonl", n)
        corpora[name] = {"docs": n, "repeats": reps, "path": str(corpus)}
        print(f"{name}: {n} documents, {reps} interleaved repeat(s), rows: {', '.join(rows)}", flush=True)
        results += run_rows(name, paths[name], corpus, rows, reps, a, work)
    scale = None
    if not a.no_scale and "ns_resid" in rows:
        name = model_names[0]
        n = a.scale_docs or (docs if a.quick else 1200)
        small = make_corpus(work / f"corpus-{name}-scale-1x.jsonl", n, seed=1)
        big = work / f"corpus-{name}-scale-4x.jsonl"
        base = small.read_text(encoding="utf-8").splitlines()
        shuffled = []
        for seed in range(4):  # four shuffled copies of the same corpus
            copy = list(base)
            random.Random(seed).shuffle(copy)
            shuffled += copy
        big.write_text("\n".join(shuffled) + "\n", encoding="utf-8")
        print(f"{name}: peak RSS of neurostore resid at 1x ({n}) and 4x ({4 * n}) documents", flush=True)
        r1 = run_rows(name, paths[name], small, ["ns_resid"], 1, a, work)
        r4 = run_rows(name, paths[name], big, ["ns_resid"], 1, a, work)
        for r, tag in ((r1[0], "ns_resid_scale_1x"), (r4[0], "ns_resid_scale_4x")):
            r["row"] = tag
        results += r1 + r4
        if r1[0]["ok"] and r4[0]["ok"]:
            scale = {"model": name, "docs_1x": n, "rss_1x_mb": r1[0]["peak_rss_mb"], "rss_4x_mb": r4[0]["peak_rss_mb"],
                     "tokens_1x": r1[0]["tokens"], "tokens_4x": r4[0]["tokens"],
                     "tokens_per_s_1x": r1[0]["tokens_per_s"], "tokens_per_s_4x": r4[0]["tokens_per_s"],
                     "disk_bytes_1x": r1[0]["disk_bytes"], "disk_bytes_4x": r4[0]["disk_bytes"], "buffer_mb": 256}
    summary = {name: summarise(results, name) for name in model_names}
    bandwidth = {}
    for name in model_names:
        s = summary[name].get("ns_resid")
        if s and s["ok"]:
            bandwidth[name] = common.write_bandwidth(work / "raw", int(s["disk_bytes"]))
            c = summary[name].get("careful")
            if c and c["ok"]:
                bandwidth[name]["careful_bytes"] = common.write_bandwidth(work / "raw", int(c["disk_bytes"]))
    for name in model_names:  # the relevance pass's cost: forward + backward against forward-only, same sites
        for row in ("ns_relevance", "ns_attnlrp"):
            if summary[name].get(row, {}).get("ok") and summary[name].get("ns_resid_mlp", {}).get("ok"):
                summary[name][row]["vs_forward_only"] = ratio_within(results, name, row, "ns_resid_mlp")
    goals = targets(results, summary, scale)
    table = print_tables(summary, bandwidth, goals)
    payload = {
        "benchmark": "extract",
        "quick": a.quick,
        "command": "python -m benchmarks.extract " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": common.machine(work, a.threads),
        "settings": {"threads": a.threads, "batch_tokens": a.batch_tokens, "compute_dtype": "float32", "store_dtype": "float16",
                     "usual_batch": BATCH, "rss": "VmHWM (peak RSS) of a fresh child process per row, read by the child at its end (includes the loaded model)",
                     "timing": "corpus read + tokenise + forward + write; model load and one warm-up forward excluded for every row"},
        "corpora": corpora,
        "summary": summary,
        "write_bandwidth": bandwidth,
        "rss_scaling": scale,
        "targets": goals,
        "rows": results,
        "table_markdown": table,
        "wall_seconds": time.perf_counter() - started,
    }
    return common.finish(payload, "extract-quick" if a.quick else "extract", a.results, work, keep=bool(a.work))


if __name__ == "__main__":
    sys.exit(main())

"""End to end typicality scoring of a corpus (issue 6): ``fastmft score`` against the pipelines a
user would otherwise write, with the same encoder and the same rows.

Providers (one timed call = score every row of the corpus, from the JSONL file to the scores):
- ``fastmft-score``: :func:`fastmft.pipelines.typicality.score_files`, the whole command: streaming reader and
  background tokeniser, length-sorted batches within chunks, one encoder pass into a float32 on-disk
  cache, prototypes from the cached embeddings, typicality from the cache, Parquet output (a fresh
  cache every call);
- ``naive``: all rows loaded, random order, every batch padded to the max length, two encoder
  passes (prototype sums in the first, typicality in the second);
- ``peer``: sentence-transformers-style: all rows loaded, sorted by length, batches padded to their
  longest row, every embedding held in memory, prototypes and typicality in numpy.
``items`` = rows, so results carry rows/s. Mode ``inference-fp32`` on CPU, ``inference-bf16`` on CUDA.

``python -m benchmarks.bench_score --data FILE.jsonl --rows N --model minilm`` measures the
providers (default: the three above; also ``fastmft-score-fp32|bf16|int8`` and ``st-fp32|bf16``)
in fresh subprocesses, ``--repeat`` rounds interleaved (wall time, rows/s and peak RSS of the whole process, which
the harness cannot see: it counts torch allocations only) and appends rows to
``runs/bench/score.jsonl`` (untracked; ``--record``: the committed ``benchmarks/results/score.jsonl``). The data is read from the given file and never copied.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from benchmarks.harness import LOCAL_RESULTS_DIR, RESULTS_DIR, Case, environment

MODELS = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256),
}
PROVIDERS = ("fastmft-score", "naive", "peer")
# The standalone mode also knows fastmft-score-<precision> (fp32, bf16, int8: `fastmft score
# --precision`) and st-fp32 / st-bf16: sentence-transformers' own length-sorted encode (the optional
# `bench` extra) with the same prototype and typicality formula.
PRECISION_PROVIDERS = {"fastmft-score-fp32": "fp32", "fastmft-score-bf16": "bf16", "fastmft-score-int8": "int8"}
_BUILT: dict[str, str] = {}


def model_folder(name: str) -> str | None:
    """None for the default MiniLM; a folder with a random tiny BERT and MiniLM's tokenizer otherwise."""
    if name == "minilm":
        return None
    if name in _BUILT:
        return _BUILT[name]
    from transformers import AutoTokenizer, BertConfig, BertModel

    from fastmft.runtime.backbone import default_backbone_path

    folder = Path(tempfile.mkdtemp(prefix=f"fastmft-bench-{name}-"))
    tok = AutoTokenizer.from_pretrained(str(default_backbone_path()), local_files_only=True)
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tok.vocab_size, max_position_embeddings=512, **MODELS[name])).save_pretrained(
        folder
    )
    _BUILT[name] = str(folder)
    return str(folder)


def read_rows(path: str, n: int) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                rows.append(json.loads(line))
                if len(rows) == n:
                    break
    return rows


# ------------------------------------------------------------------------------------------------
# The baselines


def _load(model_name: str, device):
    from fastmft.runtime.backbone import load_backbone

    model, tok = load_backbone(model_folder(model_name))
    model.eval().to(device)
    if device.type == "cuda":
        model.to(torch.bfloat16)
    return model, tok


def _encode(model, tok, texts, max_length, device, pad_to_max):
    enc = tok(
        texts, truncation=True, max_length=max_length, padding="max_length" if pad_to_max else True, return_tensors="pt"
    )
    enc = {k: v.to(device) for k, v in enc.items()}
    hidden = model(**enc).last_hidden_state.float()
    mask = enc["attention_mask"].unsqueeze(-1).float()
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)


def _vocab(rows, key):
    return {v: i for i, v in enumerate(sorted({r[key] for r in rows}))}


def naive_pipeline(path, n_rows, model, tok, *, max_length, batch_size, device, alpha=0.5, seed=0):
    rows = read_rows(path, n_rows)
    lv, dv = _vocab(rows, "label"), _vocab(rows, "domain")
    y = torch.tensor([lv[r["label"]] for r in rows])
    d = torch.tensor([dv[r["domain"]] for r in rows])
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    K, M = len(dv), len(lv)
    sums = counts = None
    scores = torch.zeros(len(rows))
    with torch.inference_mode():
        for second in (False, True):
            if second:
                protos = sums / counts.clamp_min(1)[..., None]
            for s in range(0, len(order), batch_size):
                idx = order[s : s + batch_size]
                e = _encode(model, tok, [rows[i]["text"] for i in idx], max_length, device, True).cpu().double()
                yi, di = y[idx], d[idx]
                if not second:
                    if sums is None:
                        sums = torch.zeros(K, M, e.shape[1], dtype=torch.float64)
                        counts = torch.zeros(K, M, dtype=torch.float64)
                    sums.index_put_((di, yi), e, accumulate=True)
                    counts.index_put_((di, yi), torch.ones(len(idx), dtype=torch.float64), accumulate=True)
                else:
                    c = torch.nn.functional.normalize(protos, dim=-1, eps=1e-8)  # [K, M, D]
                    cos = torch.einsum("nd,kmd->nkm", torch.nn.functional.normalize(e, dim=-1, eps=1e-8), c)
                    cos_y = cos[torch.arange(len(idx)), :, yi]  # [n, K]
                    present = (counts[:, yi].T > 0).double()
                    own = cos_y[torch.arange(len(idx)), di]
                    other = present.clone()
                    other[torch.arange(len(idx)), di] = 0
                    n_other = other.sum(1)
                    mean_other = (cos_y * other).sum(1) / n_other.clamp_min(1)
                    scores[idx] = torch.where(n_other > 0, alpha * own + (1 - alpha) * mean_other, own).float()
    return scores


def peer_pipeline(path, n_rows, model, tok, *, max_length, batch_size, device, alpha=0.5):
    rows = read_rows(path, n_rows)
    texts = [r["text"] for r in rows]
    lengths = [len(x) for x in tok(texts, truncation=True, max_length=max_length)["input_ids"]]
    order = np.argsort(lengths)[::-1]  # sentence-transformers sorts by length (longest first)
    emb = np.zeros((len(rows), model.config.hidden_size), dtype=np.float32)
    with torch.inference_mode():
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            emb[idx] = _encode(model, tok, [texts[i] for i in idx], max_length, device, False).cpu().numpy()
    lv, dv = _vocab(rows, "label"), _vocab(rows, "domain")
    y = np.array([lv[r["label"]] for r in rows])
    d = np.array([dv[r["domain"]] for r in rows])
    return prototype_typicality(emb, y, d, alpha)


def prototype_typicality(emb: np.ndarray, y: np.ndarray, d: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The MFT typicality of every row from its embedding, in numpy (what a peer pipeline writes)."""
    K, M = int(d.max()) + 1, int(y.max()) + 1
    unit = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-8)
    scores = np.zeros(len(emb), dtype=np.float32)
    centers = np.zeros((K, M, emb.shape[1]))
    counts = np.zeros((K, M))
    for k in range(K):
        for m in range(M):
            sel = (d == k) & (y == m)
            counts[k, m] = sel.sum()
            if sel.any():
                centers[k, m] = emb[sel].mean(0)
    cu = centers / np.maximum(np.linalg.norm(centers, axis=-1, keepdims=True), 1e-8)
    for i in range(len(emb)):
        cos = cu[:, y[i]] @ unit[i]
        others = [cos[k] for k in range(K) if k != d[i] and counts[k, y[i]] > 0]
        scores[i] = alpha * cos[d[i]] + (1 - alpha) * np.mean(others) if others else cos[d[i]]
    return scores


def sentence_transformers_pipeline(path, n_rows, model_name, *, max_length, batch_size, device, dtype, alpha=0.5):
    """sentence-transformers' ``encode`` (its own length sorting and mean pooling, no
    normalisation) in ``dtype`` weights, then :func:`prototype_typicality`."""
    from sentence_transformers import SentenceTransformer

    from fastmft.runtime.backbone import default_backbone_path

    if model_name != "minilm":
        raise SystemExit("the sentence-transformers providers run the default MiniLM only")
    rows = read_rows(path, n_rows)
    full = SentenceTransformer(str(default_backbone_path()), device=str(device), local_files_only=True)
    # Transformer + mean pooling: the MFT embedding E(x), without the Normalize module
    st = SentenceTransformer(modules=[full[0], full[1]], device=str(device))
    st.max_seq_length = max_length
    st.to(dtype)
    emb = st.encode([r["text"] for r in rows], batch_size=batch_size, convert_to_numpy=False, show_progress_bar=False)
    emb = torch.stack(emb).float().numpy()
    lv, dv = _vocab(rows, "label"), _vocab(rows, "domain")
    y = np.array([lv[r["label"]] for r in rows])
    d = np.array([dv[r["domain"]] for r in rows])
    return prototype_typicality(emb, y, d, alpha)


def fastmft_pipeline(
    path,
    n_rows,
    model_name,
    *,
    max_length,
    batch_size,
    device,
    workdir,
    chunk_rows=4096,
    model=None,
    tok=None,
    precision=None,
):
    """``fastmft score`` on the first ``n_rows`` rows of ``path`` (the whole file when it has no more)."""
    from fastmft.pipelines.typicality import ScoreConfig, score_files

    out = Path(workdir) / "scores.parquet"
    shutil.rmtree(str(out) + ".score-cache", ignore_errors=True)
    cfg = ScoreConfig(
        [path],
        str(out),
        backbone=model_folder(model_name),
        max_length=max_length,
        batch_size=batch_size,
        chunk_rows=chunk_rows,
        progress=False,
        restart=True,
        device=str(device),
        precision=precision,
    )
    return score_files(cfg, model=model, tokenizer=tok)


# ------------------------------------------------------------------------------------------------
# Harness cases


def _corpus(rows: int) -> str:
    """A generated corpus in a temporary JSONL file (the synthetic demo data, repeated)."""
    from fastmft.data.synthetic import synthetic_corpus

    base = synthetic_corpus(64, domains=4, seed=0)
    path = Path(tempfile.mkdtemp(prefix="fastmft-bench-score-")) / f"rows-{rows}.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i in range(rows):
            r = base[i % len(base)]
            f.write(json.dumps({"id": i, "text": r["text"], "label": r["label"], "domain": r["domain"]}) + "\n")
    return str(path)


def sizes(scale: str, device) -> list[dict]:
    if scale == "quick":
        return [dict(model="tiny", rows=256, max_len=64, batch=32)]
    if device.type == "cuda":
        return [dict(model="minilm", rows=65536, max_len=128, batch=256)]
    return [dict(model="minilm", rows=512, max_len=128, batch=32)]


def cases(scale: str, device) -> Iterable[Case]:
    device = torch.device(device)
    mode = "inference-bf16" if device.type == "cuda" else "inference-fp32"
    for size in sizes(scale, device):
        path = _corpus(size["rows"])
        workdir = tempfile.mkdtemp(prefix="fastmft-bench-score-out-")
        common = dict(max_length=size["max_len"], batch_size=size["batch"], device=device)
        model, tok = _load(size["model"], device)
        n = size["rows"]
        # Defaults bind this size's values (not loop variables).
        bound = dict(path=path, n=n, model=model, tok=tok, common=common)
        fastmft_case = Case(
            "score",
            "fastmft-score",
            mode,
            size,
            lambda b=bound, name=size["model"], workdir=workdir: fastmft_pipeline(
                b["path"],
                b["n"],
                name,
                workdir=workdir,
                model=b["model"],
                tok=b["tok"],
                precision=mode.split("-")[1],  # the mode's, as the baselines run: not the CPU's default
                **b["common"],
            ),
            items=n,
        )
        naive_case = Case(
            "score",
            "naive",
            mode,
            size,
            lambda b=bound: naive_pipeline(b["path"], b["n"], b["model"], b["tok"], **b["common"]),
            items=n,
        )
        peer_case = Case(
            "score",
            "peer",
            mode,
            size,
            lambda b=bound: peer_pipeline(b["path"], b["n"], b["model"], b["tok"], **b["common"]),
            items=n,
        )
        yield [fastmft_case, naive_case, peer_case]


# ------------------------------------------------------------------------------------------------
# Standalone: whole-process wall time and peak RSS, one fresh subprocess per provider


def _one(args) -> dict:
    import resource

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    common = dict(max_length=args.max_length, batch_size=args.batch_size, device=device)
    (data,) = args.data  # main() hands each subprocess one prepared file
    t0 = time.perf_counter()
    extra = {}
    if args.provider.startswith("fastmft-score"):
        workdir = tempfile.mkdtemp(prefix="fastmft-bench-score-out-")
        precision = PRECISION_PROVIDERS.get(args.provider)
        s = fastmft_pipeline(
            data, args.rows, args.model, workdir=workdir, chunk_rows=args.chunk_rows, precision=precision, **common
        )
        n, extra["precision"] = s.scored, s.precision
        if args.scores_out:
            import pyarrow.parquet as pq

            np.save(args.scores_out, np.asarray(pq.read_table(Path(workdir) / "scores.parquet")["typicality"]))
        shutil.rmtree(workdir, ignore_errors=True)
    elif args.provider.startswith("st-"):
        import sentence_transformers

        dtype = {"st-fp32": torch.float32, "st-bf16": torch.bfloat16}[args.provider]
        scores = sentence_transformers_pipeline(data, args.rows, args.model, dtype=dtype, **common)
        n, extra["sentence_transformers"] = len(scores), sentence_transformers.__version__
        if args.scores_out:
            np.save(args.scores_out, scores)
    else:
        model, tok = _load(args.model, device)
        fn = naive_pipeline if args.provider == "naive" else peer_pipeline
        n = len(fn(data, args.rows, model, tok, **common))
    wall = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "provider": args.provider,
        "rows": n,
        "wall_s": wall,
        "rows_per_s": n / wall,
        # CPU seconds of the whole process (all threads, model loading included): on a shared,
        # loaded core they move far less than the wall time
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_rss_bytes": usage.ru_maxrss * 1024,
        **extra,
    }


def _fidelity(reference: np.ndarray, got: np.ndarray) -> dict:
    ra, rb = np.argsort(np.argsort(reference)), np.argsort(np.argsort(got))
    return {
        "spearman_vs_fp32": float(np.corrcoef(ra, rb)[0, 1]),
        "max_abs_diff_vs_fp32": float(np.abs(reference - got).max()),
    }


def _fidelity_rows(args, data_name: str) -> int:
    """--fidelity: rows of kept scores against --reference-scores, no timing."""
    if not args.reference_scores:
        raise SystemExit("--fidelity needs --reference-scores")
    reference = np.load(args.reference_scores)
    out = Path(args.out) if args.out else (RESULTS_DIR if args.record else LOCAL_RESULTS_DIR) / "score.jsonl"
    env = {
        k: v
        for k, v in environment(torch.device("cpu"), "").items()
        if k not in ("timing_method", "interpreted", "scale")
    }
    with open(out, "a", encoding="utf-8") as f:
        for path in args.fidelity:
            got = np.load(path)
            if len(got) != len(reference):
                raise SystemExit(f"{path}: {len(got)} scores, the reference has {len(reference)}")
            name = Path(path).stem.removeprefix("scores-").rsplit("-", 1)[0]
            row = {"provider": name, "kind": "fidelity", "rows": len(got), **_fidelity(reference, got), **env}
            row.update(
                data=data_name,
                model=args.model,
                max_length=args.max_length,
                batch_size=args.batch_size,
                device=args.device,
                threads=args.threads,
                note=args.label,
            )
            f.write(json.dumps(row) + "\n")
            print(f"{name:20s} Spearman {row['spearman_vs_fp32']:.5f} max|diff| {row['max_abs_diff_vs_fp32']:.2g}")
    return 0


def main(argv=None) -> int:
    import subprocess
    import sys

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--data",
        nargs="+",
        help="JSONL files or globs with text/label/domain, read in sorted order (default: generated synthetic rows)",
    )
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--model", default="minilm", choices=("minilm", *MODELS))
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--chunk-rows", type=int, default=4096)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int)
    p.add_argument("--providers", default=",".join(PROVIDERS))
    p.add_argument("--provider", help=argparse.SUPPRESS)  # internal: run one provider in this process
    p.add_argument("--scores-out", help=argparse.SUPPRESS)  # internal: where fastmft-score* and st-* keep their scores
    p.add_argument("--label", help="free-form note stored with the rows")
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--out", help="JSON lines file the rows are appended to (default runs/bench/score.jsonl, untracked)"
    )
    where.add_argument("--record", action="store_true", help="append to the committed benchmarks/results/score.jsonl")
    p.add_argument("--repeat", type=int, default=1, help="rounds; each runs every provider once, in order")
    p.add_argument(
        "--reference-scores", help="fp32 scores (.npy, input order) to compare against (default: the first fp32 run's)"
    )
    p.add_argument("--keep-scores", help="folder to keep each run's scores in (scores-PROVIDER-ROUND.npy)")
    p.add_argument(
        "--fidelity",
        nargs="+",
        metavar="SCORES_NPY",
        help="run nothing: append one row per kept scores file with its Spearman and max |diff| against "
        "--reference-scores (for runs made concurrently, one per core, before the fp32 reference existed)",
    )
    p.add_argument("--keep-reference", help="save the reference fp32 scores to this .npy file")
    args = p.parse_args(argv)
    if args.provider:
        print("RESULT " + json.dumps(_one(args)))
        return 0

    if args.data:  # the first --rows rows of the files in order, in a temporary file outside the repository
        files = sorted({f for pattern in args.data for f in (glob.glob(pattern) or [pattern])})
        data = str(Path(tempfile.mkdtemp(prefix="fastmft-bench-score-")) / f"first-{args.rows}.jsonl")
        kept = 0
        with open(data, "w", encoding="utf-8") as dst:
            for name in files:
                with open(name, encoding="utf-8") as src:
                    for line in src:
                        if line.strip() and kept < args.rows:
                            dst.write(line if line.endswith("\n") else line + "\n")
                            kept += 1
        args.rows = kept
        data_name = ",".join(os.path.basename(f) for f in files) + f"[:{kept}]"
    else:
        data = _corpus(args.rows)
        data_name = f"synthetic-{args.rows}"
    if args.fidelity:
        return _fidelity_rows(args, data_name)
    # device name, versions, date, commit (the kernel harness's timing fields do not apply here)
    env = {
        k: v
        for k, v in environment(torch.device(args.device), "").items()
        if k not in ("timing_method", "interpreted", "scale")
    }
    out = Path(args.out) if args.out else (RESULTS_DIR if args.record else LOCAL_RESULTS_DIR) / "score.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    reference = None
    for round_ in range(args.repeat):
        for provider in args.providers.split(","):  # interleaved: each round runs every provider once
            cmd = [
                sys.executable,
                "-m",
                "benchmarks.bench_score",
                "--provider",
                provider,
                "--data",
                data,
                "--rows",
                str(args.rows),
                "--model",
                args.model,
                "--max-length",
                str(args.max_length),
                "--batch-size",
                str(args.batch_size),
                "--chunk-rows",
                str(args.chunk_rows),
                "--device",
                args.device,
            ]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            scores_path = None
            if provider.startswith(("fastmft-score", "st-")):
                folder = Path(args.keep_scores) if args.keep_scores else Path(data).parent
                folder.mkdir(parents=True, exist_ok=True)
                scores_path = str(folder / f"scores-{provider}-{round_}.npy")
                cmd += ["--scores-out", scores_path]
            t0 = time.perf_counter()
            load_before = os.getloadavg()[0]
            proc = subprocess.run(
                cmd, capture_output=True, text=True, env=dict(os.environ, TOKENIZERS_PARALLELISM="false")
            )
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not line:
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
            row = json.loads(line[0][7:])
            row.update(
                env,
                process_wall_s=time.perf_counter() - t0,
                data=data_name,
                model=args.model,
                max_length=args.max_length,
                batch_size=args.batch_size,
                device=args.device,
                threads=args.threads or torch.get_num_threads(),
                cpus=os.cpu_count(),
                cpus_allowed=len(os.sched_getaffinity(0)),
                loadavg_before=load_before,
                loadavg=os.getloadavg()[0],
                round=round_,
                note=args.label,
            )
            if scores_path is not None:
                got = np.load(scores_path)
                if reference is None and args.reference_scores:
                    reference = np.load(args.reference_scores)
                if reference is None and row.get("precision") == "fp32" and provider.startswith("fastmft-score"):
                    reference = got  # the first fastmft fp32 run is the reference of all the others
                    if args.keep_reference:
                        np.save(args.keep_reference, got)
                if reference is not None and len(reference) == len(got):
                    row.update(_fidelity(reference, got))
            with open(out, "a", encoding="utf-8") as f:  # each row at once: a long run keeps what it measured
                f.write(json.dumps(row) + "\n")
            fidelity = (
                f" Spearman {row['spearman_vs_fp32']:.5f} max|diff| {row['max_abs_diff_vs_fp32']:.2g}"
                if "spearman_vs_fp32" in row
                else ""
            )
            print(
                f"{provider:20s} {row['rows']:7d} rows {row['wall_s']:8.1f} s ({row['cpu_s']:.1f} CPU s) "
                f"{row['rows_per_s']:8.1f} rows/s peak RSS {row['peak_rss_bytes'] / 2**20:8.1f} MiB "
                f"(load {load_before:.1f}-{row['loadavg']:.1f}){fidelity}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

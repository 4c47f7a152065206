"""``fastmft score``: streaming, resumable, sharded typicality scoring (issue 6).

Small synthetic data through a tiny BERT: the scores equal the float64 reference typicality of the
cached embeddings; every input format gives the same output; resume after a crash anywhere equals
an uninterrupted run (in-process crashes at every crash point, and a real kill -9 of a subprocess);
2 gloo processes equal 1 process; rejects add up; held memory does not grow with the row count.
"""

import csv
import gc
import json
import os
import subprocess
import sys
import textwrap
import tracemalloc
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from fastmft.data import batching
from fastmft.data.synthetic import synthetic_corpus
from fastmft.pipelines.typicality import ScoreConfig, ScoreError, score_files
from fastmft.runtime import faults
from tests.helpers import assert_close, tiny_bert, two_process_command
from tests.oracles import prototypes64, typicality64

REPO = Path(__file__).resolve().parents[2]
BAD = {5: "undecodable", 9: "no text", 14: "no label", 20: "unknown domain", 31: "no domain"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(folder, bert folder, rows, jsonl path) with 5 bad lines among 101 input rows."""
    root = tmp_path_factory.mktemp("score")
    rows = synthetic_corpus(32, domains=3, seed=3)
    rng = np.random.default_rng(0)
    rows = [rows[i] for i in rng.permutation(len(rows))][:96]
    words = " ".join(r["text"] for r in rows).replace(".", " ").replace(",", " ").split()
    bert = tiny_bert(root / "bert", words)
    lines = []
    for r in rows:
        if len(lines) in BAD:
            kind = BAD[len(lines)]
            bad = dict(r, id=f"bad-{len(lines)}")
            if kind == "undecodable":
                lines.append(b'{"text": "broken \xff\xfe json')
            else:
                if kind == "no text":
                    bad["text"] = "   "
                elif kind == "no label":
                    del bad["label"]
                elif kind == "unknown domain":
                    bad["domain"] = "garden"
                elif kind == "no domain":
                    bad["domain"] = None
                lines.append(json.dumps(bad).encode())
        lines.append(json.dumps(r).encode())
    path = root / "rows.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n\n")  # a trailing blank line is not a row
    return root, bert, rows, path


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: faster for a tiny model on a shared 2-core machine, and deterministic."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)
    faults.HOOK = None


def config(corpus, tmp_path, name="out", **kw):
    _, bert, _, path = corpus
    kw.setdefault("inputs", [str(path)])
    kw.setdefault("domain_values", ["books", "electronics", "kitchen"])
    kw.setdefault("precision", "fp32")  # the same test on every CPU (the default follows the CPU's bf16)
    return ScoreConfig(
        output=str(tmp_path / f"{name}.parquet"),
        backbone=str(bert),
        max_length=32,
        batch_size=8,
        chunk_rows=16,
        progress=False,
        threads=1,
        id_column="id",
        **kw,
    )


def read(path):
    return pq.read_table(path).to_pydict()


def test_scores_equal_float64_reference_and_rejects_add_up(corpus, tmp_path, monkeypatch):
    _, bert, rows, path = corpus
    monkeypatch.setattr(batching, "TOKENIZE_ROWS", 5)  # several tokenizer calls per 16-row chunk
    cfg = config(corpus, tmp_path, keep_cache=True, alpha=0.3, report=str(tmp_path / "report.json"), top_k=2)
    s = score_files(cfg)
    out = read(cfg.output)
    assert s.rows == 101 and s.scored == 96 and s.rejected == 5 and s.scored + s.rejected == s.rows
    assert out["id"] == [r["id"] for r in rows]  # every accepted row once, in input order
    rejects = [json.loads(x) for x in Path(cfg.rejects_path()).read_text().splitlines()]
    assert [r["line"] for r in rejects] == [i + 1 for i in sorted(BAD)]
    assert [r["reason"] for r in rejects] == [
        "undecodable line",
        "missing text ('text')",
        "missing label ('label')",
        "unknown domain 'garden'",
        "missing domain ('domain')",
    ]
    assert sum(s.reasons.values()) == 5

    # the cached embeddings are the unpadded single-row embeddings, rounded to fp16
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(bert, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(bert, local_files_only=True)
    cache = cfg.cache_path()
    chunks = sorted(cache.glob("chunk-*.emb.npy"))
    emb = torch.from_numpy(np.concatenate([np.load(p) for p in chunks])).double()
    with torch.no_grad():
        ref = torch.stack(
            [
                model(**tok(r["text"], truncation=True, max_length=32, return_tensors="pt"))
                .last_hidden_state[0]
                .double()
                .mean(0)
                for r in rows
            ]
        )
    assert_close(emb, ref, torch.float16)
    # the scores are the float64 reference typicality of those cached embeddings
    labels = torch.tensor([["negative", "positive"].index(r["label"]) for r in rows])
    domains = torch.tensor([["books", "electronics", "kitchen"].index(r["domain"]) for r in rows])
    centers, counts = prototypes64(emb, labels, domains, 2, 3)
    assert_close(
        torch.tensor(out["typicality"]), typicality64(emb, labels, domains, centers, counts, 0.3), torch.float32
    )
    assert out["label"] == [r["label"] for r in rows] and out["domain"] == [r["domain"] for r in rows]
    report = json.loads(Path(cfg.report).read_text())
    best = max(range(len(rows)), key=lambda i: out["typicality"][i] if rows[i]["domain"] == "books" else -9)
    assert report["domains"]["books"]["most_typical"][0]["id"] == rows[best]["id"]
    assert len(report["domains"]["kitchen"]["least_typical"]) == 2
    # every listed row carries its own text, shortened to 80 characters at a word
    by_id = {r["id"]: r["text"] for r in rows}
    listed = [e for dom in report["domains"].values() for e in dom["most_typical"] + dom["least_typical"]]
    assert len(listed) == 12 and all(
        e["text"] == textwrap.shorten(by_id[e["id"]], width=80, placeholder=" …") for e in listed
    )

    # rerunning the finished command is a no-op that reports the same summary
    again = score_files(cfg)
    assert (again.scored, again.rejected) == (96, 5) and read(cfg.output) == out


def test_text_pairs_are_encoded_as_pairs(corpus, tmp_path, monkeypatch):
    """--text-pair-column: each row is encoded as the pair (text, text pair), in tokenizer slices."""
    from transformers import AutoModel, AutoTokenizer

    _, bert, rows, _ = corpus
    monkeypatch.setattr(batching, "TOKENIZE_ROWS", 3)
    pairs = [dict(r, hypothesis=rows[(i + 1) % len(rows)]["text"]) for i, r in enumerate(rows[:20])]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in pairs))
    cfg = config(corpus, tmp_path, inputs=[str(path)], text_pair_column="hypothesis", keep_cache=True)
    assert score_files(cfg).scored == 20
    emb = torch.from_numpy(
        np.concatenate([np.load(p) for p in sorted(cfg.cache_path().glob("chunk-*.emb.npy"))])
    ).double()
    model = AutoModel.from_pretrained(bert, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(bert, local_files_only=True)
    with torch.no_grad():
        ref = torch.stack(
            [
                model(**tok(r["text"], r["hypothesis"], truncation=True, max_length=32, return_tensors="pt"))
                .last_hidden_state[0]
                .double()
                .mean(0)
                for r in pairs
            ]
        )
    assert_close(emb, ref, torch.float16)


def test_strict_and_foreign_cache(corpus, tmp_path):
    with pytest.raises(ScoreError, match="line 6: undecodable line"):
        score_files(config(corpus, tmp_path, strict=True))
    cfg = config(corpus, tmp_path, name="x", keep_cache=True)
    score_files(cfg)
    with pytest.raises(ScoreError, match="different command"):
        score_files(config(corpus, tmp_path, name="x", alpha=0.9))
    assert score_files(config(corpus, tmp_path, name="x", alpha=0.9, restart=True)).scored == 96


def test_formats_and_shards_give_the_same_output(corpus, tmp_path):
    import datasets

    _, _, rows, path = corpus
    ref = score_files(config(corpus, tmp_path, name="ref", inputs=[str(path)]))
    want = read(tmp_path / "ref.parquet")
    good = [json.loads(x) for x in path.read_text(errors="replace").splitlines() if x.strip() and "broken" not in x]
    good = [{k: v for k, v in r.items() if k in ("id", "text", "label", "domain")} for r in good]
    # two JSONL shards through a glob; CSV; Parquet; a saved dataset (the undecodable line is dropped:
    # it cannot be written in those formats, so compare on the rows without it)
    shard_lines = path.read_bytes().split(b"\n")
    (tmp_path / "s-000.jsonl").write_bytes(b"\n".join(shard_lines[:40]) + b"\n")
    (tmp_path / "s-001.jsonl").write_bytes(b"\n".join(shard_lines[40:]))
    shards = score_files(config(corpus, tmp_path, name="shards", inputs=[str(tmp_path / "s-*.jsonl")]))
    assert (shards.rows, shards.scored) == (ref.rows, ref.scored)
    assert read(tmp_path / "shards.parquet") == want

    with open(tmp_path / "rows.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["id", "text", "label", "domain"])
        w.writeheader()
        w.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in good)
    datasets.Dataset.from_list(good).to_parquet(str(tmp_path / "rows.parquet"))
    datasets.Dataset.from_list(good).save_to_disk(str(tmp_path / "saved"))
    outs = {}
    for name, src in (("csv", "rows.csv"), ("parquet", "rows.parquet"), ("saved", "saved")):
        s = score_files(config(corpus, tmp_path, name=name, inputs=[str(tmp_path / src)]))
        assert (s.rows, s.scored, s.rejected) == (100, 96, 4), name
        outs[name] = read(tmp_path / f"{name}.parquet")
    assert outs["csv"] == outs["parquet"] == outs["saved"]
    assert outs["csv"]["id"] == want["id"]
    # chunk boundaries moved by one row, so the batches differ: equal to fp16-cache precision
    np.testing.assert_allclose(outs["csv"]["typicality"], want["typicality"], atol=2e-3)
    rej = [json.loads(x) for x in (tmp_path / "csv.parquet.rejects.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rej] == [10, 15, 21, 32]  # header is line 1


class Crash(Exception):
    pass


def _crash_at(point: str, n: int = 1):
    """A fault hook (:mod:`fastmft.runtime.faults`) that raises Crash the n-th time a run reaches
    ``point``: an in-process kill at that moment."""
    seen = 0

    def hook(name):
        nonlocal seen
        if name == point:
            seen += 1
            if seen == n:
                raise Crash(name)

    return hook


@pytest.mark.parametrize("point,n", [("batch", 3), ("batch", 9), ("chunk-write", 2), ("score", 4), ("merge", 3)])
def test_resume_after_crash_equals_uninterrupted(corpus, tmp_path, point, n):
    full = config(corpus, tmp_path, name="full")
    score_files(full)
    want = read(full.output)
    want_rej = Path(full.rejects_path()).read_text()

    cfg = config(corpus, tmp_path, name="crashed")
    faults.HOOK = _crash_at(point, n)
    with pytest.raises(Crash):
        score_files(cfg)
    faults.HOOK = None
    assert not Path(cfg.output).exists()
    s = score_files(cfg)
    assert s.resumed_chunks >= (1 if point != "batch" or n > 2 else 0)
    assert read(cfg.output) == want
    assert Path(cfg.rejects_path()).read_text() == want_rej


def _damage(path: Path, how: str) -> None:
    """Truncate a file to half, or flip a high exponent bit of its first float32 after the 128-byte
    npy header (a value that changes by orders of magnitude, so a result using it cannot match)."""
    data = bytearray(path.read_bytes())
    if how == "truncate":
        data = data[: len(data) // 2]
    else:
        data[128 + 3] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "name,how",
    [
        ("chunk-0000001.emb.npy", "flip"),
        ("chunk-0000001.emb.npy", "truncate"),
        ("chunk-0000002.meta.npz", "truncate"),
        ("chunk-0000001.scores.npy", "flip"),
        ("prototypes.pt", "truncate"),
    ],
)
def test_a_damaged_cache_file_is_not_trusted_and_the_resume_is_exact(corpus, tmp_path, name, how):
    """A cache on shared storage can be damaged between runs: the resumed run must verify what it
    did not write, encode a damaged chunk again (with a warning naming it) and still give exactly
    the uninterrupted output."""
    full = config(corpus, tmp_path, name="full")
    score_files(full)
    want = read(full.output)

    cfg = config(corpus, tmp_path, name="crashed")
    faults.HOOK = _crash_at("merge")
    with pytest.raises(Crash):  # every chunk, the prototypes and every chunk's scores are written
        score_files(cfg)
    faults.HOOK = None
    _damage(cfg.cache_path() / name, how)
    encoded = len(list(cfg.cache_path().glob("chunk-*.meta.npz")))
    if name.endswith((".emb.npy", ".meta.npz")):
        with pytest.warns(RuntimeWarning, match=f"cache chunk {int(name[6:13])} .* is damaged"):
            s = score_files(cfg)
        assert s.resumed_chunks == encoded - 1
    else:
        score_files(cfg)
    assert read(cfg.output) == want


def test_an_unreadable_manifest_with_encoded_rows_is_a_clear_error(corpus, tmp_path):
    cfg = config(corpus, tmp_path)
    faults.HOOK = _crash_at("score")
    with pytest.raises(Crash):
        score_files(cfg)
    faults.HOOK = None
    (cfg.cache_path() / "manifest.json").write_bytes(b'{"key": "trunc')
    with pytest.raises(ScoreError, match="manifest .* is unreadable; rerun with `restart`"):
        score_files(cfg)
    score_files(replace(cfg, restart=True))
    full = config(corpus, tmp_path, name="full")
    score_files(full)
    assert read(cfg.output) == read(full.output)


def _cli(args, env=None, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **(env or {}))
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=170, **kw)


def _cli_args(corpus, out):
    _, bert, _, path = corpus
    return [
        str(path),
        "--output",
        str(out),
        "--backbone",
        str(bert),
        "--max-length",
        "32",
        "--batch-size",
        "8",
        "--chunk-rows",
        "16",
        "--id-column",
        "id",
        "--threads",
        "1",
        "--no-progress",
        "--domain-values",
        "books,electronics,kitchen",
        "--precision",
        "fp32",  # as config(): the in-process runs these are compared with
    ]


def test_kill9_resume_and_two_gloo_processes(corpus, tmp_path):
    """One subprocess killed with SIGKILL mid pass one and rerun; then a 2-process torchrun over
    the same command: all outputs equal the in-process, uninterrupted run."""
    full = config(corpus, tmp_path, name="full")
    score_files(full)
    want = read(full.output)

    out = tmp_path / "killed.parquet"
    killed = _cli(["-m", "fastmft", "score", *_cli_args(corpus, out)], env={"FASTMFT_TEST_FAULT": "chunk-write:3"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not out.exists() and len(list(Path(str(out) + ".score-cache").glob("chunk-*.meta.npz"))) == 2
    # the same command, resumed in this process (the cache key is the command's, not the process's)
    done = score_files(config(corpus, tmp_path, name="killed"))
    assert (done.scored, done.rejected, done.resumed_chunks) == (96, 5, 2)
    assert read(out) == want

    out2 = tmp_path / "two.parquet"
    two = _cli([*two_process_command("score"), *_cli_args(corpus, out2)])
    assert two.returncode == 0, two.stderr[-3000:]
    got = read(out2)
    assert {k: v for k, v in got.items() if k != "typicality"} == {k: v for k, v in want.items() if k != "typicality"}
    # the same embeddings; only the order of the float64 prototype sums differs across ranks
    np.testing.assert_allclose(got["typicality"], want["typicality"], rtol=1e-6, atol=1e-7)


def test_multi_prototypes(corpus, tmp_path):
    cfg = config(corpus, tmp_path, prototypes=3, keep_cache=True)
    s = score_files(cfg)
    t = np.array(read(cfg.output)["typicality"])
    assert s.scored == 96 and np.isfinite(t).all() and (np.abs(t) <= 1 + 1e-5).all()
    obj = torch.load(cfg.cache_path() / "prototypes.pt", weights_only=True)
    assert obj["centers"].shape == (3, 2, 3, 16) and int(obj["counts"].sum()) == 96


def _held_memory(corpus, tmp_path, n_rows, name):
    """Peak traced Python/numpy allocation while scoring a generated stream of n_rows rows: the
    least of two runs. Inside a long test session one run's peak can hold a one-off event of the
    interpreter: in the full suite the table of interned strings (pathlib interns every path part,
    and it holds the whole session's names) grew once during the 8,000-row run, one 7.7 MB block,
    against 0.8 MB alone. A stream that held its rows would show in both runs."""
    _, bert, rows, _ = corpus
    path = tmp_path / f"{name}.jsonl"
    with open(path, "w") as f:
        for i in range(n_rows):
            r = rows[i % len(rows)]
            f.write(json.dumps({"id": f"r{i}", "text": r["text"], "label": r["label"], "domain": r["domain"]}) + "\n")
    peaks = []
    for run in range(2):
        cfg = ScoreConfig(
            [str(path)],
            str(tmp_path / f"{name}-{run}.parquet"),
            backbone=str(bert),
            max_length=32,
            batch_size=64,
            chunk_rows=256,
            progress=False,
            threads=1,
            id_column="id",
        )
        gc.collect()
        tracemalloc.start()
        try:
            s = score_files(cfg)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert s.scored == n_rows
        peaks.append(peak)
    return min(peaks)


def test_memory_does_not_grow_with_rows(corpus, tmp_path):
    _held_memory(corpus, tmp_path, 300, "warm-up")  # first-time imports and caches are not the stream's
    small = _held_memory(corpus, tmp_path, 1_000, "small")
    large = _held_memory(corpus, tmp_path, 8_000, "large")
    # 8x the rows: the held memory stays within noise (holding all rows' text and ids alone
    # would add several MB)
    print("held memory", small, large)
    assert large < small * 1.25 + (512 << 10), (small, large)


def test_register_cli_parses_into_a_config():
    import argparse

    from fastmft.cli import score as score_cli

    parser = argparse.ArgumentParser(prog="fastmft")
    sub = parser.add_subparsers(dest="command", required=True)
    score_cli.register_cli(sub, "score")
    args = parser.parse_args(
        [
            "score",
            "a.jsonl",
            "shards/*.parquet",
            "-o",
            "out.parquet",
            "--label-values",
            "neg, pos",
            "--prototypes",
            "3",
            "--strict",
            "--no-progress",
        ]
    )
    cfg = score_cli.config_from_args(args)
    assert args.command == "score" and args.func is score_cli._command
    assert cfg.inputs == ["a.jsonl", "shards/*.parquet"] and cfg.label_values == ["neg", "pos"]
    assert (cfg.prototypes, cfg.strict, cfg.progress, cfg.domain_values) == (3, True, False, None)
    assert str(cfg.cache_path()) == "out.parquet.score-cache"


# ----------------------------------------------------------------------------------------------
# issue 13: never touch what fastmft did not create; a right output or a clear error


def _small(corpus, tmp_path, n=12, name="small.jsonl", transform=None, raw=None):
    """A small JSONL input (optionally with rows changed by ``transform`` or given raw bytes)."""
    _, _, rows, _ = corpus
    path = tmp_path / name
    if raw is not None:
        path.write_bytes(raw)
        return path
    rows = [dict(r) for r in rows[:n]]
    if transform:
        rows = [transform(i, r) for i, r in enumerate(rows)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cache_dir_that_is_not_ours_is_refused_and_kept(corpus, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    path = _small(corpus, data)
    (data / "notes.txt").write_text("mine")
    for restart in (False, True):
        with pytest.raises(ScoreError, match="not a fastmft score cache"):
            score_files(config(corpus, tmp_path, inputs=[str(path)], cache_dir=str(data), restart=restart))
    assert sorted(p.name for p in data.iterdir()) == ["notes.txt", "small.jsonl"]
    # a cache folder of ours with a stranger's file in it: --restart removes only fastmft's files
    cache = tmp_path / "cache"
    cfg = config(corpus, tmp_path, inputs=[str(path)], cache_dir=str(cache), keep_cache=True)
    score_files(cfg)
    (cache / "chunk-notes.txt").write_text("also mine")
    score_files(config(corpus, tmp_path, inputs=[str(path)], cache_dir=str(cache), alpha=0.2, restart=True))
    assert (cache / "chunk-notes.txt").read_text() == "also mine"
    assert not list(cache.glob("chunk-*.npy")) and not (cache / "manifest.json").exists()


@pytest.mark.parametrize("option", ["output", "rejects", "report"])
def test_an_output_path_that_is_an_input_is_refused(corpus, tmp_path, option):
    path = _small(corpus, tmp_path)
    before = path.read_bytes()
    kw = {"inputs": [str(path)], option: str(path)} if option != "output" else {"inputs": [str(path)]}
    cfg = config(corpus, tmp_path, **kw)
    if option == "output":
        cfg.output = str(tmp_path / "." / path.name)
    with pytest.raises(ScoreError, match="is an input"):
        score_files(cfg)
    assert path.read_bytes() == before


def test_only_its_own_temporary_files_are_removed(corpus, tmp_path):
    path = _small(corpus, tmp_path)
    cfg = config(corpus, tmp_path, inputs=[str(path)])
    mine = [
        tmp_path / "out.parquet.tmp",
        tmp_path / "out.parquet.tmp.backup",
        tmp_path / "out.parquet.rejects.jsonl.tmp1",
    ]
    for f in mine:
        f.write_text("keep me")

    faults.HOOK = _crash_at("merge")  # a kill in the merge, after the temporary outputs exist
    with pytest.raises(Crash):
        score_files(cfg)
    faults.HOOK = None
    leftovers = sorted(p.name for p in tmp_path.glob(".out.parquet*.tmp"))
    assert len(leftovers) == 2, leftovers  # the killed run's own temporaries
    s = score_files(cfg)
    assert s.scored == 12 and all(f.read_text() == "keep me" for f in mine)
    assert not list(tmp_path.glob(".out.parquet*.tmp"))
    # after success: no cache folder, no empty rejects file
    assert not cfg.cache_path().exists() and not cfg.rejects_path().exists()


def test_resume_notices_a_same_size_edit_with_mtime_kept(corpus, tmp_path):
    path = _small(corpus, tmp_path)
    cfg = config(corpus, tmp_path, inputs=[str(path)])
    cfg.chunk_rows = 4
    faults.HOOK = _crash_at("score")
    with pytest.raises(Crash):
        score_files(cfg)
    faults.HOOK = None
    st = path.stat()
    text = path.read_text()
    i = text.index('"label": "positive"')
    path.write_text(text[:i] + text[i:].replace("positive", "negative", 1))  # the same size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size
    with pytest.raises(ScoreError, match="changed inputs"):
        score_files(cfg)


def test_a_second_run_on_the_same_cache_gets_a_clear_message(corpus, tmp_path):
    path = _small(corpus, tmp_path)
    cfg = config(corpus, tmp_path, inputs=[str(path)])
    second = {}

    def hook(name):
        if name == "batch" and not second:
            with pytest.raises(ScoreError, match="another fastmft score run is using the cache") as err:
                score_files(cfg)
            second["err"] = err

    faults.HOOK = hook
    assert score_files(cfg).scored == 12 and second


def test_large_embeddings_keep_float32_and_non_finite_is_an_error(corpus, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    _, bert, _, _ = corpus
    path = _small(corpus, tmp_path)
    model = AutoModel.from_pretrained(bert, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(bert, local_files_only=True)
    with torch.no_grad():  # pooled values ~1e5: beyond fp16's 65504
        model.encoder.layer[-1].output.LayerNorm.weight.fill_(1e5)
    s = score_files(config(corpus, tmp_path, inputs=[str(path)]), model=model, tokenizer=tok)
    t = np.array(read(tmp_path / "out.parquet")["typicality"])
    assert s.scored == 12 and np.isfinite(t).all() and np.abs(t).max() > 0.1
    with torch.no_grad():
        model.encoder.layer[-1].output.LayerNorm.weight.fill_(float("nan"))
    with pytest.raises(ScoreError, match="not finite for 12 row"):
        score_files(config(corpus, tmp_path, name="nan", inputs=[str(path)]), model=model, tokenizer=tok)
    assert not (tmp_path / "nan.parquet").exists()


def test_labels_1_and_1_0_are_one_label_and_list_labels_are_rejected(corpus, tmp_path):
    def numeric(i, r):
        return dict(r, label=[1, 1.0, 0, 0.0][i % 4] if i != 5 else [1, 2])

    path = _small(corpus, tmp_path, transform=numeric)
    s = score_files(config(corpus, tmp_path, inputs=[str(path)]))
    assert (s.scored, s.rejected, s.labels) == (11, 1, [0, 1])
    assert list(s.reasons) == ["label ('label') is a JSON list, not a value"]


def test_missing_columns_and_zero_accepted_rows_are_errors(corpus, tmp_path):
    path = _small(corpus, tmp_path)
    array = tmp_path / "rows.json"
    array.write_text(json.dumps([json.loads(x) for x in path.read_text().splitlines()], indent=2))
    for src in (path, array):
        with pytest.raises(ScoreError, match="no field in its first 1000 rows named 'txt'"):
            score_files(config(corpus, tmp_path, inputs=[str(src)], text_column="txt"))
    assert score_files(config(corpus, tmp_path, name="array", inputs=[str(array)])).scored == 12
    blank = _small(corpus, tmp_path, name="blank.jsonl", transform=lambda i, r: dict(r, text=" "))
    with pytest.raises(ScoreError, match=r"no row was accepted \(12 rows: missing text"):
        score_files(config(corpus, tmp_path, name="blank", inputs=[str(blank)]))
    assert not (tmp_path / "blank.parquet").exists()


def test_bom_default_text_ids_and_a_rerun_summary(corpus, tmp_path):
    path = _small(corpus, tmp_path)
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    csv_path = tmp_path / "bom.csv"
    with open(csv_path, "w", newline="", encoding="utf-8-sig") as f:
        w = csv.DictWriter(f, ["text", "label", "domain"])
        w.writeheader()
        w.writerows({k: r[k] for k in ("text", "label", "domain")} for r in rows)
    a = config(corpus, tmp_path, name="bom", inputs=[str(bom)], keep_cache=True)
    a.id_column = None  # the input's own id column is used by default
    assert score_files(a).rejected == 0
    assert read(a.output)["id"] == [r["id"] for r in rows]
    b = config(corpus, tmp_path, name="csv", inputs=[str(csv_path)])
    b.id_column = None  # no id column: the row index, as text
    assert score_files(b).rejected == 0
    assert pq.read_schema(b.output).field("id").type == "string" and read(b.output)["id"][:3] == ["0", "1", "2"]
    again = score_files(a)
    assert again.already_complete and "already complete (the first run took" in again.text()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--output", "{tmp}"], "is a folder"),
        (["--output", "{file}/x.parquet"], "is a file, not a folder"),
        (["--output", "{locked}/x.parquet"], "is not writable"),
        (["--max-length", "129"], "--max-length 129 is more than the model's 128 positions"),
        (["--prototypes", "2", "--temperature", "nan"], "argument --temperature: must be a finite number > 0"),
        (["--device", "tpu9"], "--device 'tpu9' is not a device torch knows"),
        (["--device", "cuda"], "--device 'cuda': this torch build or machine has no CUDA device"),
        (["--threads", "-1"], "argument --threads: must be an integer >= 1"),
        (["--quantize", "int8", "--precision", "bf16"], "--quantize int8 contradicts --precision bf16"),
        (["--precision", "fp16"], "argument --precision: invalid choice"),
    ],
)
def test_bad_options_are_one_line_errors(corpus, tmp_path, capsys, args, message):
    from fastmft.cli import main

    if args == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")

    if os.geteuid() == 0 and "{locked}" in args[1]:
        pytest.skip("root can write anywhere")
    path = _small(corpus, tmp_path)
    (tmp_path / "file").write_text("")
    (tmp_path / "locked").mkdir(mode=0o500)
    args = [a.format(tmp=tmp_path, file=tmp_path / "file", locked=tmp_path / "locked") for a in args]
    cli = _cli_args(corpus, tmp_path / "out.parquet")
    cli[0] = str(path)
    try:
        status = main(["score", *cli, *args])
    except SystemExit as exit:  # argparse's own check of an option's type
        status = exit.code
    assert status == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # (library loading bars may come before it)
    assert last.startswith("fastmft score: error: ") and message in last and "Traceback" not in err
    assert not list(tmp_path.glob("*.parquet"))


def test_precision_is_reported_and_a_cache_of_another_precision_is_refused(corpus, tmp_path):
    path = _small(corpus, tmp_path)
    fp32 = score_files(config(corpus, tmp_path, inputs=[str(path)], keep_cache=True))
    assert fp32.precision == "fp32" and "precision: fp32 encoder" in fp32.text()
    t32 = np.asarray(read(fp32.output)["typicality"])
    bf16 = config(corpus, tmp_path, inputs=[str(path)], precision="bf16")
    with pytest.raises(ScoreError, match="holds embeddings of the fp32 encoder, this run's is bf16; rerun with"):
        score_files(bf16)
    assert np.array_equal(np.asarray(read(fp32.output)["typicality"]), t32)  # refused: nothing was touched
    got = score_files(replace(bf16, restart=True))
    t16 = np.asarray(read(got.output)["typicality"])
    assert got.precision == "bf16" and "precision: bf16 encoder" in got.text()
    # bf16 encoder, fp32 pooling and typicality: close to fp32 (the bf16 atol of the dtype table)
    # and not the same numbers (the cache was not reused)
    assert 0 < np.abs(t16 - t32).max() <= 2e-2


def test_quantize_int8_is_an_alias_of_precision_int8(corpus, tmp_path, capsys):
    from fastmft.cli import main

    path = _small(corpus, tmp_path)
    api = score_files(config(corpus, tmp_path, inputs=[str(path)], precision=None, quantize="int8"))
    assert api.precision == "int8"
    cli = _cli_args(corpus, tmp_path / "cli.parquet")
    cli[0] = str(path)
    at = cli.index("--precision")
    del cli[at : at + 2]
    assert main(["score", *cli, "--quantize", "int8"]) == 0
    assert "precision: int8 encoder" in capsys.readouterr().out
    assert read(tmp_path / "cli.parquet")["typicality"] == read(api.output)["typicality"]

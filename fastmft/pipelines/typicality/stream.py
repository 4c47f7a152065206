"""``fastmft score``: streaming, resumable, sharded typicality scoring of large corpora.

Two passes as the MFT paper defines them (prototypes from all rows, then a score per row), with the
encoder run once. :func:`score_files` runs these stages:

* **manifest** (rank 0): the cache is checked against the command's key, or created; a first cheap
  pass counts the rows and infers the vocabularies (reading only the label and domain fields).
* **encode** (pass one) streams the input rows (JSONL/CSV/Parquet files, globs of shards, or a
  dataset saved with ``datasets.save_to_disk``; :mod:`fastmft.data.sources`) in *chunks* of
  ``chunk_rows`` consecutive input rows. A background thread parses, checks
  (:func:`fastmft.data.check_row`) and tokenises (fast tokenizer) the next chunk while the encoder
  runs on the current one; each chunk is sorted by length (longest first) and cut into batches, the
  encoder runs under ``torch.inference_mode`` in ``--precision`` (:mod:`fastmft.runtime.precision`), the last layer is masked-mean pooled
  (:mod:`.embed`), and the chunk's float32 embeddings go to the on-disk cache (:mod:`.cache`). A
  non-finite embedding or score is an error naming the rows.
* **prototypes**: a :class:`~fastmft.ops.prototypes.PrototypeAccumulator` on the CPU is fed the
  sums of each chunk of the cache, taken on the scoring device (deterministic: the GPU kernel has
  no float atomics; all-reduced across ranks), and the prototypes are saved in the cache, so a
  resumed pass two uses exactly the same ones.
* **score** (pass two): typicality per chunk from the cache only.
* **merge** (rank 0, :mod:`.merge`): the chunks in input order into one Parquet file with columns
  ``id, domain, label, typicality`` (every accepted input row exactly once, in input order), a
  rejects file (JSON lines: ``file, line, row, reason``) and optionally a small JSON report (per
  domain: rows, mean typicality, the top/bottom-k rows).

Usage: ``fastmft score data/*.jsonl --output scores.parquet [--label-values neg,pos]
[--id-column id] [--report report.json] [--prototypes 3]``; the same as ``python -m fastmft score``
(what ``torchrun --nproc_per_node N -m fastmft score ...`` runs), and from Python
:func:`score_files` with a :class:`ScoreConfig`.

Memory: at most a few chunks (rows, tokens, embeddings) are held at any time, so peak memory does
not depend on the number of rows (the multi-prototype option is the exception: see below).

Resume: the cache folder (default ``<output>.score-cache/``) holds ``manifest.json`` keyed by the
command's arguments and the inputs' paths and content hashes; after success (without
``--keep-cache``) the cache folder is removed. Rerunning the same command after a crash (``kill -9``
anywhere) skips the done chunks and produces the same output as an uninterrupted run; chunk
boundaries do not depend on the number of processes, so a resumed run may even use another world
size. A different command on the same cache folder is an error (``--restart`` discards the cache).

Vocabularies: ``--label-values``/``--domain-values`` fix them (rows with other values are
rejected); otherwise they are inferred in the first cheap pass (sorted distinct values,
:meth:`fastmft.data.Vocab.from_values`). Values match by :func:`fastmft.data.value_key`
(``--label-values 0,1`` matches JSON ``0``).

Row numbering: ``line`` in rejects is as :mod:`fastmft.data.sources` numbers rows. Ids are written as
text: the ``--id-column`` value, else the input's own ``id`` column when every input has one, else
the 0-based index of the row in the whole input (all files in order, rejected rows included).

Multi-node / multi-process (``torchrun``): chunk c belongs to rank c mod world_size; each rank
encodes its chunks, feeds them to its accumulator, the sums are all-reduced
(:meth:`PrototypeAccumulator.all_reduce`), each rank scores its chunks and rank 0 merges. The cache
folder must be visible to all ranks (a shared filesystem on several nodes).

Multi-prototype (``--prototypes J`` > 1): spherical k-means per (domain, label) cell
(:func:`.core.cell_prototypes`, seeded with ``stream_seed(seed, cell)``) on the cached embeddings,
loaded one cell at a time; peak memory then grows with the largest cell (rows x dim x 4 bytes).
"""

from __future__ import annotations

import hashlib
import json
import math
import queue
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from fastmft.data import (
    SAMPLE_ROWS,
    Collator,
    DataError,
    Reject,
    Source,
    Vocab,
    check_columns,
    check_row,
    column_names,
    count_rows,
    decode_record,
    iter_records,
    resolve_inputs,
    tokenize_texts,
    value_key,
)
from fastmft.ops.prototypes import MultiPrototypes, Prototypes
from fastmft.runtime.faults import fault_point
from fastmft.runtime.files import atomic_json, atomic_write

from . import cache as chunks
from .config import ScoreConfig, ScoreSummary, check_outputs
from .core import ScoreError, accumulate, cell_prototypes, check_finite, score_rows
from .embed import embed_batches, length_batches
from .merge import merge

if TYPE_CHECKING:
    from fastmft.runtime.dist import Dist


def score_files(cfg: ScoreConfig, *, model=None, tokenizer=None) -> ScoreSummary:
    """Run ``fastmft score`` with ``cfg`` (the Python API). ``model``/``tokenizer`` override the
    backbone (the cache key then uses ``cfg.backbone`` as given). Returns the summary (on every
    rank; the files are written by rank 0)."""
    t0 = time.perf_counter()
    cfg.__post_init__()  # checked again: a field may have been set after the config was made
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    from fastmft.runtime.dist import Dist

    dist = Dist(cfg.device)
    try:
        try:
            cfg = replace(cfg, precision=_precision(cfg, dist.device), quantize=None)
            summary = _run(cfg, dist, model, tokenizer, t0)
        except ScoreError:
            raise
        except DataError as err:  # the data layer's errors, as this command's
            raise ScoreError(str(err)) from None
        # Every rank done before any rank leaves the group: a rank that tore down its gloo pairs
        # while its peer still exchanged was seen to abort (1 run in about 8, under load).
        dist.barrier()
        return summary
    finally:
        dist.close()


def _precision(cfg: ScoreConfig, device: torch.device) -> str:
    """The encoder's precision this run uses (the cache key holds it, never None)."""
    from fastmft.runtime.precision import merge_quantize_alias, resolve_precision

    try:
        return resolve_precision(merge_quantize_alias(cfg.precision, cfg.quantize), device)
    except ValueError as err:
        raise ScoreError(str(err)) from None


def _run(cfg: ScoreConfig, dist: Dist, model, tokenizer, t0: float) -> ScoreSummary:
    sources = resolve_inputs(cfg.inputs, cfg.format)
    check_outputs(cfg, sources)
    cache = cfg.cache_path()
    lock = chunks.open_cache(cache) if dist.rank == 0 else None
    try:
        summary = _run_locked(cfg, dist, model, tokenizer, t0, sources, cache)
    except BaseException:
        if lock is not None:
            if cfg.keep_cache or chunks.encoded_rows(cache):
                lock.close()
            else:  # nothing encoded: leave nothing that would block the corrected command
                chunks.close_cache(cache, lock, keep=False)
        raise
    if lock is not None:
        chunks.close_cache(cache, lock, cfg.keep_cache)
    return summary


def _run_locked(
    cfg: ScoreConfig, dist: Dist, model, tokenizer, t0: float, sources: list[Source], cache: Path
) -> ScoreSummary:
    state = dist.broadcast_obj(_manifest(cfg, sources, cache) if dist.rank == 0 else None)
    if state.get("status") == "complete" and Path(cfg.output).exists():
        summary = ScoreSummary(**state["summary"])
        summary.already_complete = True
        return summary
    cfg = replace(cfg, id_column=state["id_column"])
    labels, domains = _vocab(state["labels"], "label"), _vocab(state["domains"], "domain")
    n_chunks = state["n_chunks"]
    mine = [c for c in range(n_chunks) if c % dist.world == dist.rank]

    todo = {c for c in mine if not chunks.meta_path(cache, c).exists()}
    for c in sorted(set(mine) - todo):  # chunks of an earlier run: verified before they are trusted
        if (damage := chunks.chunk_damage(cache, c)) is not None:
            warnings.warn(
                f"cache chunk {c} of {cache} is damaged: {damage}; encoding it again", RuntimeWarning, stacklevel=2
            )
            chunks.discard_chunk(cache, c)
            todo.add(c)
    if todo:
        model, tokenizer = _load_model(cfg, dist.device, model, tokenizer)
        _encode(cfg, sources, labels, domains, todo, n_chunks, dist, model, tokenizer, cache, state["rows"])
    dist.barrier()
    protos = _prototypes(cfg, dist, cache, mine, n_chunks, len(labels), len(domains))
    _score(cfg, dist, cache, mine, protos)
    dist.barrier()

    summary = None
    if dist.rank == 0:
        summary = merge(cfg, cache, n_chunks, labels, domains, state["rows"], sources)
        summary.seconds = time.perf_counter() - t0
        summary.rows_per_s = summary.rows / summary.seconds if summary.seconds > 0 else 0.0
        summary.resumed_chunks = len(mine) - len(todo)
        summary.precision = cfg.precision
        state["status"], state["summary"] = "complete", asdict(summary)
        atomic_json(cache / "manifest.json", state)  # first: a kill during the clean-up that follows is harmless
    return dist.broadcast_obj(summary)


# ----------------------------------------------------------------------------------------------
# Stage: manifest


def _manifest(cfg: ScoreConfig, sources: list[Source], cache: Path) -> dict:
    """Rank 0: the cache's manifest when it belongs to this command, else (after discarding the
    cache's files) a new one from the first cheap pass, :func:`_scan`."""
    key_obj = {
        "version": chunks.CACHE_VERSION,
        "inputs": chunks.fingerprint(sources),
        "args": {k: getattr(cfg, k) for k in ScoreConfig._KEYED},
    }
    key = hashlib.sha256(json.dumps(key_obj, sort_keys=True, default=str).encode()).hexdigest()
    manifest_path = cache / "manifest.json"
    manifest = None
    if manifest_path.exists():
        try:
            manifest = json.loads(manifest_path.read_text())
        except ValueError:  # not JSON, or not UTF-8
            manifest = None
        if not isinstance(manifest, dict):
            if not cfg.restart and chunks.encoded_rows(cache):
                raise ScoreError(
                    f"the cache's manifest {manifest_path} is unreadable; rerun with `restart` to discard the "
                    "cache, or pass another `cache_dir`"
                )
            manifest = {}
        if manifest.get("status") == "complete" and not Path(cfg.output).exists() and manifest.get("key") == key:
            manifest = None  # the output was removed since: run again
        elif manifest.get("key") != key:
            refuse = not cfg.restart and chunks.encoded_rows(cache)  # a cache with rows is never mixed
            cached = manifest.get("command", {}).get("args", {}).get("precision")
            if refuse and cached is not None and cached != cfg.precision:
                raise ScoreError(
                    f"the cache {cache} holds embeddings of the {cached} encoder, this run's is {cfg.precision}; "
                    f"rerun with `precision` {cached} to resume it, `restart` to discard it, or pass another "
                    "`cache_dir`"
                )
            if refuse:
                raise ScoreError(
                    f"the cache {cache} belongs to a different command or changed inputs; rerun with `restart` "
                    "to discard it, or pass another `cache_dir`"
                )
            manifest = None
        elif cfg.restart:
            manifest = None
        elif manifest.get("status") != "complete":  # a resume: only the verified chunks are kept
            chunks.discard_derived(cache)
    if manifest is None:
        chunks.discard_cache(cache)
        manifest = {"key": key, "command": key_obj, "status": "started"}
        manifest.update(_scan(sources, cfg))
        atomic_json(manifest_path, manifest)
    return manifest


def _vocab(values: list, name: str) -> Vocab:
    if not values:
        raise ScoreError(f"no {name} value found in the input")
    try:
        return Vocab(values, name)
    except ValueError as e:
        raise ScoreError(str(e)) from None


def _scan(sources: list[Source], cfg: ScoreConfig) -> dict:
    """The cheap first pass: the columns checked, the id column chosen (``id`` when every input has
    one and --id-column is not given), row count (and chunk count), and the vocabularies when not
    given."""
    names = [column_names(src) for src in sources]
    id_column = cfg.id_column
    if id_column is None and all("id" in n for n in names):
        id_column = "id"
    columns = replace(cfg.columns(), id=id_column)
    for src, present in zip(sources, names):
        check_columns(present, columns, source=src.path, sampled_rows=SAMPLE_ROWS if src.kind == "json" else None)
    need_labels, need_domains = cfg.label_values is None, cfg.domain_values is None
    rows = 0
    seen: dict[str, dict] = {"label": {}, "domain": {}}  # value_key -> first value seen
    if not (need_labels or need_domains):
        rows = sum(count_rows(s) for s in sources)
    else:
        wanted = [
            (name, column)
            for need, name, column in (
                (need_labels, "label", cfg.label_column),
                (need_domains, "domain", cfg.domain_column),
            )
            if need
        ]
        for src in sources:
            for _, payload in iter_records(src, [c for _, c in wanted]):
                rows += 1
                try:
                    row = decode_record(payload)
                except Reject:
                    continue
                for name, column in wanted:  # Vocab.from_values drops what check_row rejects
                    v = row.get(column)
                    seen[name].setdefault(value_key(v), v)

    def values(given, name):
        if given is not None:
            return list(given)
        try:
            return Vocab.from_values(seen[name].values(), name).values
        except DataError as err:
            raise ScoreError(f"{err}; pass `{name}_values`") from None

    out = {
        "rows": rows,
        "n_chunks": math.ceil(rows / cfg.chunk_rows),
        "id_column": id_column,
        "labels": values(cfg.label_values, "label"),
        "domains": values(cfg.domain_values, "domain"),
    }
    _vocab(out["labels"], "label"), _vocab(out["domains"], "domain")  # validate
    return out


# ----------------------------------------------------------------------------------------------
# Stage: encode (pass one)


@dataclass
class _Chunk:
    index: int
    rows: list  # global row index of accepted rows
    ids: list
    labels: list
    domains: list
    texts: list
    pairs: list | None
    rejects: list  # dicts {file, line, row, reason}
    n_input: int = 0
    batches: list = field(default_factory=list)  # (positions, padded input tensors)


def _load_model(cfg: ScoreConfig, device, model=None, tokenizer=None):
    if model is None or tokenizer is None:
        from fastmft.runtime.backbone import load_backbone

        model, tokenizer = load_backbone(cfg.backbone, trust_remote_code=cfg.trust_remote_code)
    from fastmft.runtime.backbone import check_max_length

    check_max_length(model, cfg.max_length)
    if not getattr(tokenizer, "is_fast", False):
        warnings.warn(
            "the tokenizer is not a fast (Rust) tokenizer; tokenisation will be slow", RuntimeWarning, stacklevel=2
        )
    from fastmft.runtime.precision import prepare_encoder

    return prepare_encoder(model, cfg.precision, device), tokenizer


def _reader(cfg, sources, labels, domains, todo, n_chunks, tokenizer, out: queue.Queue, stop: threading.Event):
    """Background thread: parse, check and tokenise the chunks in ``todo``, put them on ``out``
    (length-sorted, padded batches ready for the encoder), then None. Exceptions go on the queue."""
    try:
        collate = Collator(tokenizer.pad_token_id or 0)
        columns = cfg.columns()

        def finish(ch: _Chunk) -> None:
            if ch.texts:
                enc = tokenize_texts(tokenizer, ch.texts, ch.pairs, max_length=cfg.max_length, attention_mask=False)
                rows = [{k: enc[k][i] for k in enc} for i in range(len(ch.texts))]
                del enc
                # one window per chunk, longest first: the first batch sizes the allocator's buffers
                window = math.ceil(len(rows) / cfg.batch_size)
                ch.batches = list(
                    length_batches(
                        rows,
                        [r["length"] for r in rows],
                        cfg.batch_size,
                        collate,
                        window_batches=window,
                        longest_first=True,
                    )
                )
            ch.texts, ch.pairs = [], None
            while not stop.is_set():
                try:
                    out.put(ch, timeout=0.5)
                    return
                except queue.Full:
                    continue

        index = 0
        ch: _Chunk | None = None
        C = cfg.chunk_rows
        for src in sources:
            for line, payload in iter_records(src, columns.required()):
                if stop.is_set():
                    return
                c = index // C
                if ch is not None and ch.index != c:
                    finish(ch)
                    ch = None
                if c in todo:
                    if ch is None:
                        ch = _Chunk(c, [], [], [], [], [], [] if cfg.text_pair_column else None, [])
                    ch.n_input += 1
                    try:
                        row = check_row(decode_record(payload), columns, labels, domains)
                    except Reject as rej:
                        if cfg.strict:
                            raise ScoreError(rej.at(f"{src.path}, line {line}") + " (`strict`)") from None
                        ch.rejects.append({"file": src.path, "line": line, "row": index, "reason": rej.reason})
                    else:
                        ch.rows.append(index)
                        ch.ids.append(str(index) if row.id is None else row.id)
                        ch.labels.append(row.label)
                        ch.domains.append(row.domain)
                        ch.texts.append(row.text)
                        if ch.pairs is not None:
                            ch.pairs.append(row.text_pair)
                index += 1
        if ch is not None:
            finish(ch)
        if math.ceil(index / C) != n_chunks:
            raise ScoreError(f"the inputs changed while scoring: {index} rows now, {n_chunks} chunks before")
        out.put(None)
    except BaseException as err:  # noqa: BLE001 - handed to the main thread
        out.put(err)


def _encode(cfg, sources, labels, domains, todo, n_chunks, dist, model, tokenizer, cache, total_rows) -> None:
    """Pass one: encode the chunks in ``todo`` into the cache."""
    q: queue.Queue = queue.Queue(maxsize=2)
    stop = threading.Event()
    th = threading.Thread(
        target=_reader,
        args=(cfg, sources, labels, domains, todo, n_chunks, tokenizer, q, stop),
        daemon=True,
        name="fastmft-score-reader",
    )
    th.start()
    dim = model.config.hidden_size
    bar = None
    if cfg.progress and dist.rank == 0:
        from tqdm.auto import tqdm

        share = sum(min(cfg.chunk_rows, total_rows - c * cfg.chunk_rows) for c in todo)
        bar = tqdm(
            total=share,
            desc="scoring: encoding" + (f" (rank 0 of {dist.world})" if dist.world > 1 else ""),
            unit="row",
            smoothing=0.1,
            dynamic_ncols=True,
        )

    def on_batch(rows: int) -> None:
        if bar is not None:
            bar.update(rows)
        fault_point("batch")

    try:
        while True:
            ch = q.get()
            if ch is None:
                break
            if isinstance(ch, BaseException):
                raise ch
            emb = torch.zeros(len(ch.rows), dim, dtype=torch.float32)
            embed_batches(model, ch.batches, emb, dist.device, on_batch, precision=cfg.precision)
            ch.batches = []
            check_finite(emb.numpy(), ch.ids, "the encoder's embedding")
            meta = dict(
                rows=np.array(ch.rows, dtype=np.int64),
                ids=np.array(ch.ids, dtype=str),
                labels=np.array(ch.labels, dtype=np.int32),
                domains=np.array(ch.domains, dtype=np.int32),
                n_input=np.int64(ch.n_input),
                rejects=np.array([json.dumps(r) for r in ch.rejects], dtype=str),
            )
            chunks.write_chunk(cache, ch.index, emb.numpy(), meta)
            if bar is not None:
                bar.update(len(ch.rejects))
    finally:
        stop.set()
        if bar is not None:
            bar.close()
        while th.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                th.join(0.1)


# ----------------------------------------------------------------------------------------------
# Stage: prototypes


def _prototypes(cfg: ScoreConfig, dist: Dist, cache: Path, mine: list[int], n_chunks: int, M: int, K: int):
    """The prototypes of all cached chunks, computed once and saved in the cache (every rank reads
    them back). Each chunk is summed on the scoring device (the prototype-sum kernel on a GPU,
    which reduces per-chunk partials in a fixed order, or the reference on the CPU) into a float64
    accumulator on the CPU: deterministic either way, so two runs give the same bits."""
    path = cache / "prototypes.pt"
    device = dist.device
    dim = np.load(chunks.emb_path(cache, 0), mmap_mode="r").shape[1] if n_chunks else 1
    if not dist.broadcast_obj(path.exists() if dist.rank == 0 else None):
        if cfg.prototypes == 1:
            cpu = torch.device("cpu")
            acc = accumulate(_cached_parts(cache, mine, device), M, K, dim, cpu)
            if dist.world > 1:
                acc.all_reduce()
            p = acc.result()
            obj = {"centers": p.centers.cpu(), "counts": p.counts.cpu()}
        elif dist.rank == 0:
            mp = cell_prototypes(
                _cell_loader(cache, n_chunks, M), M, K, cfg.prototypes, dim, temperature=cfg.temperature, seed=cfg.seed
            )
            obj = {"centers": mp.centers, "counts": mp.counts, "temperature": mp.temperature}
        if dist.rank == 0:
            atomic_write(path, lambda f: torch.save(obj, f))
        dist.barrier()
    obj = torch.load(path, weights_only=True)
    centers, counts = obj["centers"].to(device), obj["counts"].to(device)
    if cfg.prototypes == 1:
        return Prototypes(centers, counts)
    return MultiPrototypes(centers, counts, float(obj["temperature"]))


def _chunk_tensors(cache: Path, c: int, device, meta: dict | None = None):
    """(embeddings, labels, domains) of chunk ``c`` on ``device``."""
    meta = chunks.load_meta(cache, c) if meta is None else meta
    emb = torch.from_numpy(chunks.load_embeddings(cache, c))
    labels = torch.from_numpy(meta["labels"].astype(np.int64))
    domains = torch.from_numpy(meta["domains"].astype(np.int64))
    return emb.to(device), labels.to(device), domains.to(device)


def _cached_parts(cache: Path, mine: list[int], device):
    for c in mine:
        yield _chunk_tensors(cache, c, device)


def _cell_loader(cache: Path, n_chunks: int, M: int):
    """``cell -> float32 embeddings of the cell's rows`` over all cached chunks (one cell in memory)."""
    cell_of = []
    for c in range(n_chunks):
        meta = chunks.load_meta(cache, c)
        cell_of.append(meta["domains"].astype(np.int64) * M + meta["labels"].astype(np.int64))

    def cell_rows(cell: int):
        parts = [
            chunks.load_embeddings(cache, c, sel)
            for c, cells in enumerate(cell_of)
            if len(sel := np.nonzero(cells == cell)[0])
        ]
        return torch.from_numpy(np.concatenate(parts)) if parts else None

    return cell_rows


# ----------------------------------------------------------------------------------------------
# Stage: score (pass two)


def _score(cfg: ScoreConfig, dist: Dist, cache: Path, mine: list[int], protos) -> None:
    """Typicality of this rank's chunks, from the cache only."""
    for c in mine:
        path = chunks.scores_path(cache, c)
        if path.exists():
            continue
        meta = chunks.load_meta(cache, c)
        emb, labels, domains = _chunk_tensors(cache, c, dist.device, meta)
        t = score_rows(emb, labels, domains, protos, alpha=cfg.alpha, ids=meta["ids"]).numpy()
        atomic_write(path, lambda f, t=t: np.save(f, t))
        fault_point("score")

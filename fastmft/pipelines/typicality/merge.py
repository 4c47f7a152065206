"""The last stage of the streaming pipeline (rank 0): the cached chunks, in input order, into one
Parquet file (``id, domain, label, typicality``: every accepted row once), the rejects file (JSON
lines: ``file, line, row, reason``) and the optional JSON report (its listed rows' texts read
back from the inputs, which the cache does not hold)."""

from __future__ import annotations

import json
import os
import re
import secrets
from pathlib import Path

import numpy as np

from fastmft.data import Source, Vocab, check_row, decode_record, iter_records
from fastmft.runtime.faults import fault_point
from fastmft.runtime.files import atomic_json

from .cache import load_meta, scores_path
from .config import ScoreConfig, ScoreSummary
from .core import ScoreError
from .report import DomainReport, shorten


def merge(
    cfg: ScoreConfig,
    cache: Path,
    n_chunks: int,
    labels: Vocab,
    domains: Vocab,
    total_rows: int,
    sources: list[Source],
) -> ScoreSummary:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    rej_path = cfg.rejects_path()
    rej_path.parent.mkdir(parents=True, exist_ok=True)
    label_arr = pa.array(labels.values)
    domain_arr = pa.array(domains.values)
    id_type = pa.string()
    schema = pa.schema(
        [("id", id_type), ("domain", domain_arr.type), ("label", label_arr.type), ("typicality", pa.float32())]
    )
    summary = ScoreSummary(labels=labels.values, domains=domains.values, output=str(out), rejects=str(rej_path))
    report = DomainReport(len(domains.values), cfg.top_k if cfg.report else 0)
    # Unique temporary names beside the outputs, recorded in the cache before they are created:
    # a rerun after a kill removes exactly those and nothing else.
    record = cache / "merge-temps.json"
    if record.is_file():
        for stale in _own_temporaries(record, (out, rej_path)):
            if not stale.is_dir():
                stale.unlink(missing_ok=True)
    tmp, rtmp = (p.with_name(f".{p.name}.{secrets.token_hex(8)}.tmp") for p in (out, rej_path))
    atomic_json(record, [str(tmp), str(rtmp)])
    with pq.ParquetWriter(tmp, schema) as writer, open(rtmp, "w", encoding="utf-8") as rej:
        for c in range(n_chunks):
            meta = load_meta(cache, c)
            scores = np.load(scores_path(cache, c))
            summary.rows += int(meta["n_input"])
            for r in meta["rejects"]:
                rec = json.loads(str(r))
                summary.reasons[rec["reason"]] = summary.reasons.get(rec["reason"], 0) + 1
                summary.rejected += 1
                rej.write(json.dumps(rec) + "\n")
            n = len(meta["rows"])
            summary.scored += n
            if not n:
                continue
            ids = meta["ids"].tolist()
            table = pa.table(
                {
                    "id": pa.array(ids, type=id_type),
                    "domain": domain_arr.take(pa.array(meta["domains"])),
                    "label": label_arr.take(pa.array(meta["labels"])),
                    "typicality": pa.array(scores, type=pa.float32()),
                },
                schema=schema,
            )
            writer.write_table(table)
            fault_point("merge")
            items = (
                [(i, labels.values[y], row) for i, y, row in zip(ids, meta["labels"].tolist(), meta["rows"].tolist())]
                if report.top_k
                else ()
            )
            report.add(scores, meta["domains"], meta["rows"], items)
        rej.flush()
        os.fsync(rej.fileno())
    if summary.rows != total_rows:
        raise ScoreError(f"internal error: {summary.rows} rows merged, {total_rows} expected")
    if summary.rejected:
        os.replace(rtmp, rej_path)
    else:  # no rejects file for a run without rejects: an old one at this output path would mislead
        rtmp.unlink()
        if rej_path.is_file():
            rej_path.unlink()
    if not summary.scored:
        tmp.unlink()
        record.unlink()
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(summary.reasons.items())) or "no input rows"
        raise ScoreError(
            f"no row was accepted ({summary.rows} rows: {reasons}); the rejected rows are in {rej_path}"
            if summary.rejected
            else "the input has no rows"
        )
    if cfg.report:
        texts = _texts(cfg, sources, labels, domains, _listed_rows(report, len(domains.values)))
        atomic_json(Path(cfg.report), _report_json(cfg, report, domains, texts))
        summary.report = cfg.report
    os.replace(tmp, out)  # the output appears last: its presence means the run is complete
    record.unlink()
    return summary


def _own_temporaries(record: Path, outputs: tuple[Path, ...]) -> list[Path]:
    """The paths listed in ``record`` that are exactly the temporary names merge gives ``outputs``
    (``.<name>.<16 hex digits>.tmp`` in the output's own folder). The cache may be shared and
    written by others: any other entry is ignored, so a crafted list never deletes a stranger's file."""
    try:
        listed = json.loads(record.read_text())
    except (OSError, ValueError):
        return []
    own = []
    for entry in listed if isinstance(listed, list) else []:
        path = Path(entry) if isinstance(entry, str) else None
        for out in outputs:
            if (
                path is not None
                and re.fullmatch(rf"\.{re.escape(out.name)}\.[0-9a-f]{{16}}\.tmp", path.name)
                and path.parent.resolve() == out.parent.resolve()
            ):
                own.append(out.parent / path.name)
    return own


def _listed_rows(report: DomainReport, num_domains: int) -> set[int]:
    return {item[2] for d in range(num_domains) for _, item in report.most_typical(d) + report.least_typical(d)}


def _texts(cfg: ScoreConfig, sources: list[Source], labels: Vocab, domains: Vocab, rows: set[int]) -> dict[int, str]:
    """The text of each of ``rows`` (global row numbers, as pass one numbered them), in one read of
    the inputs that decodes only those rows."""
    columns, texts, index = cfg.columns(), {}, 0
    for src in sources:
        for _, payload in iter_records(src, columns.required()):
            if index in rows:
                texts[index] = check_row(decode_record(payload), columns, labels, domains).text
            index += 1
    if len(texts) != len(rows):
        raise ScoreError(f"the inputs changed while scoring: {len(rows) - len(texts)} listed rows are gone")
    return texts


def _report_json(cfg: ScoreConfig, report: DomainReport, domains: Vocab, texts: dict[int, str]) -> dict:
    def listed(entries):
        return [{"id": i, "label": lab, "typicality": s, "text": shorten(texts[row])} for s, (i, lab, row) in entries]

    out = {"alpha": cfg.alpha, "prototypes": cfg.prototypes, "domains": {}}
    for d, name in enumerate(domains.values):
        out["domains"][str(name)] = {
            "rows": report.rows(d),
            "mean_typicality": report.mean(d),
            "most_typical": listed(report.most_typical(d)),
            "least_typical": listed(report.least_typical(d)),
        }
    return out

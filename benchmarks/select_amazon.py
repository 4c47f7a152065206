"""Issue 7's experiment: does meta-learned task selection beat simple schedules on Amazon reviews?

Sources: masked LM over every text plus the sentiment tasks of three domains (train split);
target: the fourth domain's dev split (downstream-aware). Each schedule trains the same number of
batches (episodes x N) from the same MiniLM start:
- selected: fastmft.selection.TaskSelector (utility-scored, epsilon-greedy);
- round-robin: the sources in turn, N batches each episode;
- random: a uniformly random source each episode.
Then the model is fine-tuned on the target domain's train split and evaluated on its test split.

Each (schedule, seed) cell is saved as JSON under benchmarks/results/select_amazon/ as soon as it
finishes (accuracy, wall time split into scoring and training, device, versions, date), and a
rerun skips finished cells, so the table can fill across sessions. ``--table`` prints mean and
std per schedule with pending cells marked. The data are read from ../shared/data/amazon (never
copied into the repository).

    python -m benchmarks.select_amazon --seeds 0 1 2            # run the missing cells
    python -m benchmarks.select_amazon --table                  # print the table

The committed CPU cells (one pinned thread each) ran with ``--max-length 64 --episodes 20``
(160 schedule batches of 16 reviews) to fit 9 cells into one session; each cell stores its
settings, and a GPU run can use the defaults (128 tokens, 30 episodes) in a new results folder.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import platform
import random
import statistics
import time
from pathlib import Path

import torch

SCHEDULES = ("selected", "round-robin", "random")
DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "amazon"
RESULTS = Path(__file__).resolve().parent / "results" / "select_amazon"


def _cell_path(results: Path, schedule: str, seed: int, target: str) -> Path:
    return results / f"{target}-{schedule}-seed{seed}.json"


def run_cell(schedule: str, seed: int, args) -> dict:
    from fastmft.backbone import load_backbone
    from fastmft.data import Columns, prepare
    from fastmft.selection import ClassificationTask, MultiTaskModel, TaskSelector, build_tasks, pad_ids

    torch.manual_seed(seed)
    encoder, tok = load_backbone(args.backbone)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    data = prepare(sorted(str(p) for p in Path(args.data).glob("*.jsonl")), tok, Columns(), max_length=args.max_length)
    target = data.domain_vocab.encode(args.target)
    sources, targets = build_tasks(data.dataset, tok, data.domain_vocab, len(data.label_vocab), target_domain=target,
                                   sources=["mlm", "domains"], batch_size=args.batch_size, split_column="split")
    ds = data.dataset
    split, domains = ds["split"], ds["domains"]
    rows = {s: [i for i in range(len(ds)) if domains[i] == target and split[i] == s] for s in ("train", "test")}
    finetune = ClassificationTask("finetune", [ds[i]["input_ids"] for i in rows["train"]], [ds[i]["labels"] for i in rows["train"]],
                                  len(data.label_vocab), head="label", batch_size=args.batch_size, pad_id=tok.pad_token_id)
    model = MultiTaskModel(encoder, [*sources, *targets, finetune]).to(device)
    selector = TaskSelector(model, sources, targets, inner_lr=args.inner_lr, lr=args.lr, m=args.m, n=args.n,
                            epsilon=args.epsilon, seed=seed)
    start = time.perf_counter()
    picks, scoring_s = [], 0.0
    order = random.Random(seed)
    for episode in range(args.episodes):
        if schedule == "selected":
            ep = selector.episode()
            picks.append(ep.chosen)
            scoring_s += ep.scoring_s
        else:
            task = sources[episode % len(sources)] if schedule == "round-robin" else order.choice(sources)
            selector.train_batches(task, args.n)
            picks.append(task.name)
    schedule_s = time.perf_counter() - start
    steps_per_epoch = max(1, len(rows["train"]) // args.batch_size)
    selector.train_batches(finetune, args.finetune_epochs * steps_per_epoch)
    model.eval()
    correct = 0
    with torch.inference_mode():
        for s in range(0, len(rows["test"]), 64):
            chunk = rows["test"][s : s + 64]
            ids, mask = pad_ids([ds[i]["input_ids"] for i in chunk], tok.pad_token_id)
            hidden = model.encoder(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
            pred = model.heads["label"](hidden[:, 0]).argmax(1).cpu()
            correct += int((pred == torch.tensor([ds[i]["labels"] for i in chunk])).sum())
    return {
        "schedule": schedule, "seed": seed, "target": args.target, "test_accuracy": correct / len(rows["test"]),
        "test_rows": len(rows["test"]), "episodes": args.episodes, "n": args.n, "m": args.m, "picks": picks,
        "schedule_wall_s": schedule_s, "scoring_s": scoring_s, "total_wall_s": time.perf_counter() - start,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__, "date": datetime.date.today().isoformat(),
        "hyper": {k: getattr(args, k) for k in ("inner_lr", "lr", "epsilon", "batch_size", "max_length", "finetune_epochs")},
    }


def table(results: Path, target: str) -> str:
    lines = [f"| schedule | test accuracy on {target} % (mean ± std) | seeds | scoring s | schedule s (scoring + training) | cell s | picks (all seeds) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    settings = set()
    for schedule in SCHEDULES:
        cells = [json.loads(p.read_text()) for p in sorted(results.glob(f"{target}-{schedule}-seed*.json"))]
        if not cells:
            lines.append(f"| {schedule} | pending | 0 | – | – | – | – |")
            continue
        acc = [100 * c["test_accuracy"] for c in cells]
        std = statistics.stdev(acc) if len(acc) > 1 else 0.0
        picks = collections.Counter(p for c in cells for p in c["picks"])
        mean = lambda key: statistics.mean(c[key] for c in cells)  # noqa: E731
        lines.append(f"| {schedule} | {statistics.mean(acc):.1f} ± {std:.1f} | {len(cells)} | {mean('scoring_s'):.0f} | "
                     f"{mean('schedule_wall_s'):.0f} | {mean('total_wall_s'):.0f} | "
                     + ", ".join(f"{k} {v}" for k, v in sorted(picks.items())) + " |")
        settings |= {json.dumps({"episodes": c["episodes"], "n": c["n"], "m": c["m"], **c["hyper"], "device": c["device"]},
                                sort_keys=True) for c in cells}
    lines += ["", "Settings of the cells above (seconds are wall time on their device):"]
    lines += [f"- `{s}`" for s in sorted(settings)]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--target", default="kitchen")
    p.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=SCHEDULES)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--episodes", type=int, default=30)
    p.add_argument("--m", type=int, default=2)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--epsilon", type=float, default=0.1)
    p.add_argument("--inner-lr", type=float, default=1e-3)
    p.add_argument("--lr", type=float, default=5e-5, help="AdamW lr (2e-5 of BERT-base, scaled up for the smaller MiniLM)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--finetune-epochs", type=int, default=2)
    p.add_argument("--backbone")
    p.add_argument("--device")
    p.add_argument("--results-dir", type=Path, default=RESULTS)
    p.add_argument("--table", action="store_true", help="print the table of finished cells and exit")
    args = p.parse_args()
    if not args.table:
        args.results_dir.mkdir(parents=True, exist_ok=True)
        for seed in args.seeds:
            for schedule in args.schedules:
                path = _cell_path(args.results_dir, schedule, seed, args.target)
                if path.exists():
                    continue
                cell = run_cell(schedule, seed, args)
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(cell, indent=1))
                tmp.replace(path)
                print(f"{schedule} seed {seed}: accuracy {cell['test_accuracy']:.3f} in {cell['total_wall_s']:.0f} s")
    text = table(args.results_dir, args.target)
    if args.results_dir.is_dir():
        (args.results_dir / "TABLE.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()

"""Task selection on the Amazon reviews (issue 16's rebuild): can meta-learned selection avoid a
harmful source and help a few-shot target?

Sources, from TRAINING rows only: masked LM over every domain's training texts, the sentiment
tasks of books, dvd and electronics, and a harmful one: the same three domains' training rows with
their labels permuted at random (``cls:shuffled``). Target: kitchen, few-shot (``--fraction`` of its
training rows, stratified by label, drawn from the seed); the selector scores on those rows.

Arms for one seed (paired: every consumer draws from its own seeded stream, so the arms differ
only in which task each episode trains; the fine-tune is the same in every arm):
- ``selected-sgd``: utility with the plain inner step (alpha = ``--inner-lr``);
- ``selected-adam``: utility with the look-ahead of the real AdamW step (its lr and preconditioning);
- ``round-robin``, ``random``: the same number of training batches without scoring;
- ``round-robin-time``: round-robin given the wall time the selected arm of that seed spent
  (scoring included), i.e. more batches: the compute-matched control;
- ``none``: no schedule (fine-tune only).
After the schedule: the target's dev loss and accuracy (kitchen dev, 200 rows; never trained on)
with the shared label head; then a fresh AdamW with warmup and linear decay fine-tunes on the
few-shot rows, and kitchen dev and test accuracy are recorded with per-row predictions. The inner
step used as the headline is the one with the lower mean target dev loss after the schedule
(decided on dev, before test is read).

Each cell is one JSON file under benchmarks/experiments/results/select_amazon_v2/<device kind>/ (settings,
device, versions, commit, per-episode utilities and their per-batch terms, compute split into
scoring / training / fine-tuning, predictions). The earlier cells (benchmarks/experiments/results/select_amazon)
stay as they were: they ran before the fixes of issue 16 (MLM over all splits, shared RNG).

    python -m benchmarks.experiments.select_amazon run --seeds 0 1 2 --threads 1
    python -m benchmarks.experiments.select_amazon run --device cuda --seeds 0 1 2 3 4 --m 8 --time-limit 300
    python -m benchmarks.experiments.select_amazon table
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "amazon"
RESULTS = Path(__file__).resolve().parent / "results" / "select_amazon_v2"
ARMS = ("selected-sgd", "selected-adam", "round-robin", "random", "round-robin-time", "none")


def _evaluate(model, rows_ids, labels, device, pad_id) -> dict:
    import torch
    import torch.nn.functional as F

    from fastmft.data.batching import pad_ids

    model.eval()
    preds, loss = [], 0.0
    with torch.inference_mode():
        for s in range(0, len(rows_ids), 64):
            ids, mask = pad_ids(rows_ids[s : s + 64], pad_id)
            hidden = model.encoder(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
            logits = model.heads["label"](hidden[:, 0]).float().cpu()
            y = torch.tensor(labels[s : s + 64])
            loss += float(F.cross_entropy(logits, y, reduction="sum"))
            preds += logits.argmax(1).tolist()
    return {
        "loss": loss / len(labels),
        "accuracy": sum(p == y for p, y in zip(preds, labels)) / len(labels),
        "pred": preds,
    }


def _setup(seed: int, args, cache: dict, *, inner: str):
    """The sources, the few-shot target and a fresh model with its selector for one seed (the same in
    every arm of that seed): returns (device, data, sources, shot, few, rows, model, selector)."""
    import torch

    from fastmft.data import Columns, prepare
    from fastmft.pipelines.selection import ClassificationTask, MultiTaskModel, TaskSelector, build_tasks
    from fastmft.pipelines.trainer.inputs import few_shot_rows
    from fastmft.runtime.backbone import load_backbone

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if "data" not in cache:
        cache["backbone"] = load_backbone(args.backbone)
        tok = cache["backbone"][1]
        cache["data"] = prepare(
            sorted(str(p) for p in Path(args.data).glob("*.jsonl")), tok, Columns(id="id"), max_length=args.max_length
        )
    _, tok = cache["backbone"]
    encoder = load_backbone(args.backbone)[0]  # a fresh copy of the pre-trained weights per cell
    data = cache["data"]
    ds, pad = data.dataset, tok.pad_token_id or 0
    target = data.domain_vocab.encode(args.target)
    sources, _ = build_tasks(
        ds,
        tok,
        data.domain_vocab,
        len(data.label_vocab),
        target_domain=target,
        sources=["mlm", "domains"],
        batch_size=args.batch_size,
        split_column="split",
    )
    split, domains, labels, ids = ds["split"], ds["domains"], ds["labels"], ds["input_ids"]
    src_rows = [i for i in range(len(ds)) if split[i] == "train" and domains[i] != target]
    perm = random.Random(0).sample([labels[i] for i in src_rows], len(src_rows))  # the same harm in every cell
    sources.append(
        ClassificationTask(
            "cls:shuffled",
            [ids[i] for i in src_rows],
            perm,
            len(data.label_vocab),
            head="label",
            batch_size=args.batch_size,
            pad_id=pad,
        )
    )
    rows = {s: [i for i in range(len(ds)) if domains[i] == target and split[i] == s] for s in ("train", "dev", "test")}
    target_labels = [labels[i] for i in rows["train"]]
    few = [rows["train"][j] for j in few_shot_rows(target_labels, [0] * len(target_labels), args.fraction, seed)]
    shot = ClassificationTask(
        "target",
        [ids[i] for i in few],
        [labels[i] for i in few],
        len(data.label_vocab),
        head="label",
        batch_size=args.batch_size,
        pad_id=pad,
    )
    torch.manual_seed(seed)  # the heads' initialisation: the same in every arm
    model = MultiTaskModel(encoder, [*sources, shot]).to(device)
    selector = TaskSelector(
        model,
        sources,
        [shot],
        inner_lr=args.inner_lr,
        lr=args.lr,
        m=args.m,
        n=args.n,
        epsilon=args.epsilon,
        seed=seed,
        inner=inner,
    )
    return device, data, sources, shot, few, rows, model, selector


def run_cell(arm: str, seed: int, args, cache: dict) -> dict:
    import torch

    from benchmarks.harness import device_name

    inner = "adam" if arm == "selected-adam" else "sgd"
    device, data, sources, shot, few, rows, model, selector = _setup(seed, args, cache, inner=inner)
    ds, pad = data.dataset, cache["backbone"][1].pad_token_id or 0
    labels, ids = ds["labels"], ds["input_ids"]
    order = random.Random(seed)
    episodes, t0, scoring_s = [], time.perf_counter(), 0.0
    budget = None
    if arm == "round-robin-time":
        ref = cell_path(args.results_dir, device.type, f"selected-{args.time_matched_to}", seed)
        if not ref.is_file():
            raise RuntimeError(f"round-robin-time needs {ref} first")
        budget = json.loads(ref.read_text())["schedule_s"]
    step = 0
    while arm != "none":
        if budget is None and step >= args.episodes:
            break
        if budget is not None and time.perf_counter() - t0 >= budget:
            break
        if arm.startswith("selected"):
            ep = selector.episode()
            scoring_s += ep.scoring_s
            episodes.append(
                {
                    "chosen": ep.chosen,
                    "explored": ep.explored,
                    "utilities": ep.utilities,
                    "batch_scores": ep.batch_scores,
                }
            )
        else:
            task = sources[step % len(sources)] if arm.startswith("round-robin") else order.choice(sources)
            selector.train_batches(task, args.n)
            episodes.append({"chosen": task.name})
        step += 1
    schedule_s = time.perf_counter() - t0
    after = _evaluate(model, [ids[i] for i in rows["dev"]], [labels[i] for i in rows["dev"]], device, pad)
    # fine-tune: a fresh optimizer with warmup and linear decay, its own batch stream and dropout seed
    t1 = time.perf_counter()
    steps = args.finetune_epochs * max(1, len(few) // args.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    warm = max(1, round(0.1 * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else max(0.0, (steps - s) / max(1, steps - warm))
    )
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed + 1)
    model.train()
    for _ in range(steps):
        loss = model(shot.sample(g))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    finetune_s = time.perf_counter() - t1
    dev = _evaluate(model, [ids[i] for i in rows["dev"]], [labels[i] for i in rows["dev"]], device, pad)
    test = _evaluate(model, [ids[i] for i in rows["test"]], [labels[i] for i in rows["test"]], device, pad)
    return {
        "arm": arm,
        "seed": seed,
        "target": args.target,
        "inner": inner if arm.startswith("selected") else None,
        "episodes_run": len(episodes),
        "episodes": episodes,
        "picks": [e["chosen"] for e in episodes],
        "after_schedule_dev": {"loss": after["loss"], "accuracy": after["accuracy"]},
        "dev": {
            "accuracy": dev["accuracy"],
            "loss": dev["loss"],
            "ids": [ds[i]["id"] for i in rows["dev"]],
            "gold": [labels[i] for i in rows["dev"]],
            "pred": dev["pred"],
        },
        "test": {
            "accuracy": test["accuracy"],
            "ids": [ds[i]["id"] for i in rows["test"]],
            "gold": [labels[i] for i in rows["test"]],
            "pred": test["pred"],
        },
        "compute_s": {
            "schedule": schedule_s,
            "scoring": scoring_s,
            "training": schedule_s - scoring_s,
            "finetune": finetune_s,
        },
        "schedule_s": schedule_s,
        "few_shot_rows": len(few),
        "finetune_steps": steps,
        "settings": {
            k: getattr(args, k)
            for k in (
                "episodes",
                "m",
                "n",
                "epsilon",
                "inner_lr",
                "lr",
                "batch_size",
                "max_length",
                "fraction",
                "finetune_epochs",
                "time_matched_to",
            )
        },
        "device": device.type,
        "device_name": device_name(device),
        "torch_threads": torch.get_num_threads(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": cache["versions"],
    }


PILOT_SEED = 100  # not one of the reported seeds


def run_pilot(args, cache: dict, save) -> dict:
    """Signal and noise of u for each M of ``args.pilot_m`` and each inner step, over
    ``args.pilot_episodes`` episodes of the selected arm at PILOT_SEED: reads training rows only
    (no dev, no test), so M can be chosen before any cell runs. ``save`` gets the record after
    each run, so a stopped pilot keeps what it measured."""
    import torch

    from benchmarks.harness import device_name

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = {
        "seed": PILOT_SEED,
        "episodes": args.pilot_episodes,
        "runs": [],
        "device": device.type,
        "device_name": device_name(device),
        "torch_threads": torch.get_num_threads(),
        "versions": cache["versions"],
    }
    for m in args.pilot_m:
        for inner in ("sgd", "adam"):
            args.m = m
            *_, selector = _setup(PILOT_SEED, args, cache, inner=inner)
            t0 = time.perf_counter()
            eps = [{"batch_scores": selector.episode().batch_scores} for _ in range(args.pilot_episodes)]
            sn = signal_noise({"episodes": eps})
            out["runs"].append(
                {
                    "m": m,
                    "inner": inner,
                    "signal": sn[0] if sn else None,
                    "noise": sn[1] if sn else None,
                    "s_per_episode": (time.perf_counter() - t0) / args.pilot_episodes,
                    "episodes": eps,
                }
            )
            out["date"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
            save(out)
            print(
                f"pilot m {m} {inner}: signal/noise {sn}, {out['runs'][-1]['s_per_episode']:.1f} s/episode", flush=True
            )
    return out


def cell_path(results: Path, kind: str, arm: str, seed: int) -> Path:
    return results / kind / f"{arm}_seed{seed}.json"


def signal_noise(cell: dict) -> tuple[float, float] | None:
    """Median over episodes of (spread of the sources' mean per-batch score, standard error of a
    source's mean over its M batches): u separates sources when the first exceeds the second."""
    sig, noise = [], []
    for e in cell["episodes"]:
        scores = e.get("batch_scores")
        if not scores or min(len(v) for v in scores.values()) < 2:
            continue
        means = [statistics.fmean(v) for v in scores.values()]
        sig.append(statistics.stdev(means))
        noise.append(statistics.fmean(statistics.variance(v) / len(v) for v in scores.values()) ** 0.5)
    return (statistics.median(sig), statistics.median(noise)) if sig else None


def _settings(cell: dict) -> dict:
    """A cell's settings as the table shows them: cells written before the option's rename call
    `time_matched_to` `headline`, which it is not (the headline inner step is chosen on dev)."""
    shown = {("time_matched_to" if k == "headline" else k): v for k, v in cell["settings"].items()}
    return {**shown, "device": cell["device_name"]}


def render(results: Path) -> str:
    import numpy as np

    from benchmarks.experiments.stats import bootstrap, mcnemar, mean_std

    lines = [
        "# Task selection on the Amazon reviews (kitchen target, few-shot), rebuilt for issue 16",
        "",
        "Per arm: mean over seeds (± std); after-schedule = kitchen dev with the shared label head right after the "
        "schedule; test = kitchen test after the same few-shot fine-tune. Paired: arm − round-robin on test "
        "rows, over the seeds both finished: mean difference with its two-level bootstrap 95 % interval (seeds, then rows), summed discordant "
        "rows and exact McNemar over the pooled seeds' rows. Signal / noise: median over "
        "episodes of the spread of the sources' mean utility term against the standard error of one source's mean "
        "over its M batches.",
        "",
    ]
    for kind_dir in sorted(p for p in results.glob("*") if p.is_dir()):
        cells = {f.stem: json.loads(f.read_text()) for f in kind_dir.glob("*.json")}
        lines += [
            f"## Device: {kind_dir.name}",
            "",
            "| arm | seeds | after-schedule dev loss | after-schedule dev acc | test acc | test − round-robin (paired) | "
            "signal / noise | picks | cls:shuffled picks (explored) | scoring s | training s | fine-tune s |",
            "|---|" + "---|" * 11,
        ]
        pairs: dict[str, str] = {}
        for arm in ARMS:
            got = sorted((c for c in cells.values() if c["arm"] == arm), key=lambda c: c["seed"])
            if not got:
                lines.append(f"| {arm} | 0 | pending |" + " - |" * 9)
                continue

            pair = ""
            both = [(c, cells[f"round-robin_seed{c['seed']}"]) for c in got if f"round-robin_seed{c['seed']}" in cells]
            if arm != "round-robin" and both:  # over the seeds both arms finished
                a = np.array([np.equal(c["test"]["pred"], c["test"]["gold"]) for c, _ in both], dtype=int)
                b = np.array([np.equal(r["test"]["pred"], r["test"]["gold"]) for _, r in both], dtype=int)
                n01, n10, p = mcnemar(a.ravel(), b.ravel())
                mean, lo, hi = bootstrap(a - b, blocks=1)
                pair = pairs[arm] = (
                    f"{100 * mean:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] pts ({n01}/{n10}, p {p:.2f}; {len(both)} seeds)"
                )
            sn = [x for x in (signal_noise(c) for c in got) if x]
            sn_text = (
                f"{statistics.fmean(s for s, _ in sn):.2e} / {statistics.fmean(n for _, n in sn):.2e}" if sn else "-"
            )
            picks: dict[str, int] = {}
            for c in got:
                for p_ in c["picks"]:
                    picks[p_] = picks.get(p_, 0) + 1
            harmful = [e for c in got for e in c["episodes"] if e["chosen"] == "cls:shuffled"]
            explored = sum(bool(e.get("explored")) for e in harmful) if arm.startswith("selected") else "-"
            comp = lambda k: f"{statistics.fmean(c['compute_s'][k] for c in got):.0f}"  # noqa: E731
            lines.append(
                f"| {arm} | {len(got)} | {mean_std([c['after_schedule_dev']['loss'] for c in got], 3)} | "
                f"{mean_std([100 * c['after_schedule_dev']['accuracy'] for c in got], 1)} | "
                f"{mean_std([100 * c['test']['accuracy'] for c in got], 1)} | {pair or '-'} | {sn_text} | "
                + ", ".join(f"{k} {v}" for k, v in sorted(picks.items()))
                + f" | {len(harmful)} ({explored}) | {comp('scoring')} | {comp('training')} | {comp('finetune')} |"
            )
        losses = {
            k: [c["after_schedule_dev"]["loss"] for c in cells.values() if c["arm"] == f"selected-{k}"]
            for k in ("sgd", "adam")
        }
        if all(losses.values()):
            best = min(losses, key=lambda k: statistics.fmean(losses[k]))
            lines += [
                "",
                f"Inner step chosen on dev (lower mean after-schedule dev loss): **{best}** "
                f"(sgd {statistics.fmean(losses['sgd']):.4f}, adam {statistics.fmean(losses['adam']):.4f}).",
                "",
                f"**Primary (pre-registered): selected-{best} − round-robin on kitchen test, "
                f"{pairs.get(f'selected-{best}', 'pending')}.**",
            ]
        pilot = kind_dir / "pilot" / "pilot.json"
        if pilot.is_file():
            pilot = json.loads(pilot.read_text())
            lines += [
                "",
                f"Pilot (seed {pilot['seed']}, {pilot['episodes']} episodes, training rows only; chooses M):",
                "",
                "| M | inner step | signal | noise | signal / noise | s per episode |",
                "|---|---|---|---|---|---|",
            ]
            for r in pilot["runs"]:
                ratio = f"{r['signal'] / r['noise']:.2f}" if r["signal"] is not None and r["noise"] else "-"
                lines.append(
                    f"| {r['m']} | {r['inner']} | {r['signal']:.2e} | {r['noise']:.2e} | {ratio} | {r['s_per_episode']:.1f} |"
                )
        settings = sorted({json.dumps(_settings(c), sort_keys=True) for c in cells.values()})
        lines += ["", "Settings:"] + [f"- `{s}`" for s in settings] + [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.experiments.select_amazon",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    setting = argparse.ArgumentParser(add_help=False)  # what one seed's setup reads: run and pilot
    setting.add_argument("--data", default=str(DEFAULT_DATA))
    setting.add_argument("--target", default="kitchen")
    setting.add_argument("--n", type=int, default=4, help="training batches per episode")
    setting.add_argument("--epsilon", type=float, default=0.1)
    setting.add_argument("--inner-lr", type=float, default=1e-3, help="alpha of the plain (sgd) inner step")
    setting.add_argument("--lr", type=float, default=5e-5)
    setting.add_argument("--batch-size", type=int, default=16)
    setting.add_argument("--max-length", type=int, default=64)
    setting.add_argument("--fraction", type=float, default=0.1, help="few-shot share of kitchen's training rows")
    setting.add_argument("--backbone")
    setting.add_argument("--device")
    setting.add_argument("--threads", type=int)
    setting.add_argument("--results-dir", type=Path, default=RESULTS)
    p = sub.add_parser("run", parents=[setting], help="run (or skip when done) the cells of --seeds x --arms")
    p.add_argument("--arms", default=",".join(ARMS), help="comma-separated, run in this order per seed")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--episodes", type=int, default=20)
    p.add_argument("--m", type=int, default=4, help="batches per task for scoring")
    p.add_argument(
        "--time-matched-to",
        choices=("sgd", "adam"),
        default="adam",
        help="the selected arm whose wall time round-robin-time gets",
    )
    p.add_argument("--finetune-epochs", type=int, default=5)
    p.add_argument("--time-limit", type=float, help="wall seconds: no cell starts after")
    pilot = sub.add_parser(
        "pilot", parents=[setting], help="signal and noise of u per M, on training rows only (to choose M)"
    )
    pilot.add_argument("--pilot-m", type=int, nargs="+", default=[4, 8])
    pilot.add_argument("--pilot-episodes", type=int, default=4)
    t = sub.add_parser("table")
    t.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.command in ("run", "pilot"):
        import torch

        from benchmarks.harness import versions

        if args.threads:
            torch.set_num_threads(args.threads)
        kind = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu")).type
        cache, start = {"versions": versions()}, time.perf_counter()
        if args.command == "pilot":
            path = args.results_dir / kind / "pilot" / "pilot.json"
            if path.exists():
                raise SystemExit(f"{path} exists: the pilot runs once (move it away to run it again)")
            path.parent.mkdir(parents=True, exist_ok=True)

            def save(record: dict) -> None:
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(record) + "\n")
                tmp.replace(path)

            run_pilot(args, cache, save)
            return 0
        for seed in args.seeds:
            for arm in args.arms.split(","):
                path = cell_path(args.results_dir, kind, arm, seed)
                if path.exists():
                    continue
                if args.time_limit is not None and time.perf_counter() - start >= args.time_limit:
                    print("time limit spent; run again to continue", flush=True)
                    break
                cell = run_cell(arm, seed, args, cache)
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(cell) + "\n")
                tmp.replace(path)
                print(
                    f"{arm} seed {seed}: after-schedule dev loss {cell['after_schedule_dev']['loss']:.3f}, "
                    f"schedule {cell['schedule_s']:.0f} s (scoring {cell['compute_s']['scoring']:.0f} s)",
                    flush=True,
                )
    text = render(args.results_dir)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / "TABLE.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Meta-learned task selection: the known-answer case, agnostic mode, repeatability, utilities
against the deepcopy computation (benchmarks/baselines/clone_utility.py), resume, and the
self-supervised tasks' batches."""

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from benchmarks.baselines.clone_utility import clone_task_utility
from fastmft.data.synthetic import synthetic_corpus
from fastmft.pipelines.selection import (
    ClassificationTask,
    MaskedLMTask,
    MultiTaskModel,
    TaskSelector,
    TokenShuffleTask,
)
from tests.helpers import flip_tensor_bit, tiny_bert


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rows = synthetic_corpus(48, domains=2, seed=0, atypical_fraction=0.0)
    words = " ".join(r["text"] for r in rows).replace(".", " ").replace(",", " ").split()
    folder = tiny_bert(tmp_path_factory.mktemp("bert"), words, layers=2, hidden=32)
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    return rows, folder, tok


def build(corpus, seed, *, sources=("A", "B"), targets=("target",), **kwargs):
    rows, folder, tok = corpus
    torch.manual_seed(seed)
    encoder = AutoModel.from_pretrained(folder, local_files_only=True)
    train = [r for r in rows if r["split"] == "train"]
    dev = [r for r in rows if r["split"] != "train"]
    ids = lambda rs: tok([r["text"] for r in rs], truncation=True, max_length=32)["input_ids"]  # noqa: E731
    labels = lambda rs: [int(r["label"] == "positive") for r in rs]  # noqa: E731
    g = torch.Generator().manual_seed(seed)
    tasks = {
        "A": ClassificationTask("A", ids(train), labels(train), 2, head="sentiment", batch_size=32),
        "B": ClassificationTask(
            "B",
            ids(train),
            torch.randint(0, 2, (len(train),), generator=g).tolist(),
            2,
            head="sentiment",
            batch_size=32,
        ),
        "target": ClassificationTask("target", ids(dev), labels(dev), 2, head="sentiment", batch_size=32),
        "T": ClassificationTask("T", ids(dev), labels(dev), 2, head="sentiment", batch_size=32),  # the target's rows
        "mlm": MaskedLMTask(
            "mlm",
            ids(rows),
            mask_id=tok.mask_token_id,
            vocab_size=len(tok),
            special_ids=tok.all_special_ids,
            batch_size=8,
        ),
        "shuffle": TokenShuffleTask("shuffle", ids(rows), special_ids=tok.all_special_ids, batch_size=8),
    }
    model = MultiTaskModel(encoder, list(tasks.values()))
    selector = TaskSelector(
        model, [tasks[s] for s in sources], [tasks[t] for t in targets] if targets else None, seed=seed, **kwargs
    )
    return selector, tasks


def test_selector_picks_the_target_task_itself(corpus, rng):
    """Source T is the target task itself (its own rows and labels); source B has random labels.
    After a warm-up on T (so that the encoder carries the signal), T must win >= 90 % of episodes.
    (A source that is only *like* the target, its training rows, lost to the random-label source
    for some seeds: a random-label step can lower the loss of an overconfident model.)"""
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))
    selector, tasks = build(corpus, seed, sources=("T", "B"), inner_lr=3e-3, lr=1e-3, m=2, n=2, epsilon=0.0)
    selector.train_batches(tasks["T"], 100)
    history = selector.run(10, progress=False)
    picks = [e.chosen for e in history]
    assert picks.count("T") >= 9, picks


def test_agnostic_mode_and_logs(corpus, tmp_path):
    selector, _ = build(corpus, 1, sources=("A", "mlm", "shuffle"), targets=None, inner_lr=1e-3, m=1, n=1, epsilon=0.5)
    assert selector.mode == "agnostic"
    history = selector.run(3, log=tmp_path / "log.jsonl", progress=False)
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 3
    for ep in history:
        assert set(ep.utilities) == {"A", "mlm", "shuffle"}
        assert all(torch.isfinite(torch.tensor(u)) for u in ep.utilities.values())
        assert ep.chosen in ep.utilities and ep.scoring_s > 0 and ep.training_s > 0


def test_seeded_run_is_repeatable(corpus):
    runs = []
    for _ in range(2):
        selector, _ = build(corpus, 7, sources=("A", "B", "mlm"), inner_lr=1e-3, m=1, n=1, epsilon=0.3)
        runs.append([(e.chosen, e.utilities, e.train_loss) for e in selector.run(3, progress=False)])
    assert runs[0] == runs[1]


def test_utilities_equal_deepcopy_computation(corpus):
    selector, tasks = build(corpus, 3, sources=("A", "B", "mlm", "shuffle"), inner_lr=1e-2, m=2)
    g = torch.Generator().manual_seed(11)
    targets = [tasks["target"].sample(g) for _ in range(2)]
    sources = {name: [tasks[name].sample(g) for _ in range(2)] for name in ("A", "B", "mlm", "shuffle")}
    utilities = selector.utilities(sources, targets)
    selector.model.eval()
    for name, batches in sources.items():
        slow = clone_task_utility(selector.model, lambda m, b: m(b), batches, targets, 1e-2)
        assert utilities[name] == pytest.approx(slow, rel=1e-5, abs=1e-5), name


def test_resume_equals_uninterrupted(corpus, tmp_path):
    straight, _ = build(corpus, 5, sources=("A", "B"), inner_lr=1e-3, m=1, n=2, epsilon=0.5)
    expected = [(e.chosen, e.utilities) for e in straight.run(4, progress=False)]
    first, _ = build(corpus, 5, sources=("A", "B"), inner_lr=1e-3, m=1, n=2, epsilon=0.5)
    got = [(e.chosen, e.utilities) for e in first.run(2, checkpoint=tmp_path / "ckpt", progress=False)]
    resumed, _ = build(corpus, 5, sources=("A", "B"), inner_lr=1e-3, m=1, n=2, epsilon=0.5)
    got += [(e.chosen, e.utilities) for e in resumed.run(4, checkpoint=tmp_path / "ckpt", progress=False)]
    assert got == expected
    for a, b in zip(straight.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["model.safetensors", "state.pt"])
def test_a_changed_value_in_the_only_checkpoint_restarts_with_a_warning(corpus, tmp_path, name):
    """One bit flipped inside tensor data (the file still parses): the checksum rejects the
    checkpoint, the warning says there is no earlier one, and the run starts over to the same end."""
    straight, _ = build(corpus, 5, **SEL)
    expected = [(e.chosen, e.utilities) for e in straight.run(3, progress=False)]
    first, _ = build(corpus, 5, **SEL)
    first.run(1, checkpoint=tmp_path / "ckpt", progress=False)
    [ckpt] = (tmp_path / "ckpt").glob("checkpoint-*")  # one episode: one checkpoint
    flip_tensor_bit(ckpt / name)
    resumed, _ = build(corpus, 5, **SEL)
    with pytest.warns(RuntimeWarning, match=f"{name} does not match .*there is no earlier checkpoint: starting from"):
        got = [(e.chosen, e.utilities) for e in resumed.run(3, checkpoint=tmp_path / "ckpt", progress=False)]
    assert got == expected
    assert all(torch.equal(a, b) for a, b in zip(straight.model.parameters(), resumed.model.parameters()))


def test_self_supervised_batches(corpus):
    _, tasks = build(corpus, 0, sources=("mlm",), targets=None)
    rows, _, tok = corpus
    g = torch.Generator().manual_seed(0)
    batch = tasks["mlm"].sample(g)
    special = torch.isin(batch["labels"].clamp_min(0), torch.tensor(tok.all_special_ids)) & (batch["labels"] != -100)
    assert not special.any()
    assert ((batch["labels"] != -100).sum(1) >= 1).all()
    chosen = batch["labels"] != -100
    assert (batch["input_ids"][chosen] == tok.mask_token_id).float().mean() > 0.5
    batch = tasks["shuffle"].sample(g)
    labels = batch["labels"]
    assert set(labels.unique().tolist()) <= {-100, 0, 1} and (labels == 1).any()
    assert (labels[:, 0] == -100).all()  # [CLS] never takes part
    assert ((labels == 1).sum(1) != 1).all()  # a permutation never moves exactly one token


def test_bad_configuration(corpus):
    with pytest.raises(ValueError, match="`epsilon` must lie in"):
        build(corpus, 0, epsilon=2.0)
    selector, tasks = build(corpus, 0)
    with pytest.raises(ValueError, match="not part of the model"):
        TaskSelector(selector.model, [ClassificationTask("C", [[2, 3]], [0], 2)])


def test_cli_runs_and_resumes(corpus, tmp_path, capsys):
    import json

    from fastmft.cli import main

    rows, folder, _ = corpus
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({k: r[k] for k in ("text", "label", "domain", "split")}) + "\n" for r in rows))
    args = [
        "select",
        "--data",
        str(data),
        "--backbone",
        str(folder),
        "--sources",
        "mlm,shuffle,domains",
        "--episodes",
        "2",
        "--m",
        "1",
        "--n",
        "1",
        "--batch-size",
        "4",
        "--output-dir",
        str(tmp_path / "run"),
        "--no-progress",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "sources ['mlm', 'shuffle', 'cls:books'], targets ['target:electronics']" in out
    assert "checkpoints of about" in out and str(tmp_path / "run" / "checkpoint") in out
    assert main(args[:8] + ["3"] + args[9:]) == 0  # one more episode, resumed from the checkpoint
    assert "episodes run now: 1 (total 3)" in capsys.readouterr().out
    assert len((tmp_path / "run" / "episodes.jsonl").read_text().splitlines()) == 3


# ----------------------------------------------------------------------------------------------
# issue 13: one atomic checkpoint per episode, the log cut back to it, options checked

SEL = dict(sources=("A", "B"), inner_lr=1e-3, m=1, n=2, epsilon=0.5)


def _weights(selector):
    return [p.detach().clone() for p in selector.model.parameters()]


@pytest.mark.parametrize("where", ["before the checkpoint", "inside the checkpoint"])
def test_a_kill_around_the_checkpoint_resumes_exactly_without_duplicate_log_lines(corpus, tmp_path, monkeypatch, where):
    import json

    from fastmft.runtime import files as _atomic

    straight, _ = build(corpus, 5, **SEL)
    expected = [(e.chosen, e.utilities) for e in straight.run(3, progress=False)]
    real_save = _atomic.CheckpointDir.save
    calls = {"n": 0}

    def dying_save(self, write):  # episode 2: its log line is written, its checkpoint is not
        calls["n"] += 1
        if calls["n"] < 2:
            return real_save(self, write)
        if where == "before the checkpoint":
            raise KeyboardInterrupt("killed")

        def half(folder):
            write(folder)
            raise KeyboardInterrupt("killed mid-write")

        return real_save(self, half)

    monkeypatch.setattr(_atomic.CheckpointDir, "save", dying_save)
    log, ckpt = tmp_path / "episodes.jsonl", tmp_path / "ckpt"
    first, _ = build(corpus, 5, **SEL)
    with pytest.raises(KeyboardInterrupt):
        first.run(3, log=log, checkpoint=ckpt, progress=False)
    monkeypatch.setattr(_atomic.CheckpointDir, "save", real_save)
    assert len(log.read_text().splitlines()) == 2
    resumed, _ = build(corpus, 5, **SEL)
    resumed.run(3, log=log, checkpoint=ckpt, progress=False)
    lines = [json.loads(l) for l in log.read_text().splitlines()]
    assert [l["episode"] for l in lines] == [1, 2, 3]
    assert [(l["chosen"], l["utilities"]) for l in lines] == expected
    assert all(torch.equal(a, b) for a, b in zip(_weights(straight), _weights(resumed)))
    # nothing left over: the current checkpoint and the previous one (the fallback)
    assert sorted(p.name for p in ckpt.iterdir()) == ["checkpoint-000002", "checkpoint-000003", "checkpoint.json"]
    (ckpt / "selector.json").write_text("{}")  # an older fastmft's layout: refused, the log kept
    with pytest.raises(ValueError, match="older fastmft"):
        build(corpus, 5, **SEL)[0].run(4, log=log, checkpoint=ckpt, progress=False)
    assert len(log.read_text().splitlines()) == 3


def test_bad_rates_are_named(corpus, tmp_path, capsys):
    from fastmft.cli import main

    with pytest.raises(ValueError, match=r"`inner_lr` must be a finite number > 0"):
        build(corpus, 0, inner_lr=float("nan"))
    with pytest.raises(SystemExit):
        main(["select", "--inner-lr", "nan", "--output-dir", str(tmp_path / "run")])
    assert "argument --inner-lr: must be a finite number > 0, got 'nan'" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert main(["select", "--output-dir", str(tmp_path / "file")]) == 2
    assert "--output-dir" in capsys.readouterr().err and (tmp_path / "file").read_text() == ""


def test_self_supervised_sources_read_training_rows_only(corpus):
    """Bug: mlm/shuffle were built from every row, the target's test split included."""
    import datasets

    from fastmft.data import Columns, prepare
    from fastmft.pipelines.selection import build_tasks

    rows, _, tok = corpus
    data = prepare(
        datasets.Dataset.from_list([{k: r[k] for k in ("text", "label", "domain", "split")} for r in rows]),
        tok,
        Columns(),
        max_length=32,
    )
    ds = data.dataset
    train_ids = [ids for ids, s in zip(ds["input_ids"], ds["split"]) if s == "train"]
    assert 0 < len(train_ids) < len(ds)
    kw = dict(target_domain=0, sources=["mlm", "shuffle", "domains"], batch_size=4, split_column="split")
    sources, _ = build_tasks(ds, tok, data.domain_vocab, len(data.label_vocab), **kw)
    for task in (t for t in sources if t.name in ("mlm", "shuffle")):
        assert task.input_ids == train_ids, task.name
    sources, _ = build_tasks(ds, tok, data.domain_vocab, len(data.label_vocab), unlabeled_splits=None, **kw)
    assert next(t for t in sources if t.name == "mlm").input_ids == list(ds["input_ids"])


def _recording(task):
    """Wrap task.sample to record the batches it returns."""
    seen, sample = [], task.sample
    task.sample = lambda g: seen.append(sample(g)) or seen[-1]
    return seen


def test_arms_with_one_seed_train_on_the_same_batches(corpus):
    """Bug: scoring and training shared one generator, so a scored episode shifted every later
    training batch. Now the k-th training batch of a task is the same whatever ran before it."""
    scored, tasks1 = build(corpus, 4, sources=("A", "B", "mlm"), m=2, n=2, epsilon=0.0)
    plain, tasks2 = build(corpus, 4, sources=("A", "B", "mlm"), m=2, n=2, epsilon=0.0)
    ep = scored.episode()
    chosen = ep.chosen
    seen1 = _recording(tasks1[chosen])
    seen2 = _recording(tasks2[chosen])
    plain.train_batches(tasks2["B" if chosen != "B" else "A"], 3)  # another arm trains another task first
    scored.train_batches(tasks1[chosen], 2)
    plain.train_batches(tasks2[chosen], 4)
    # the scored arm already trained `chosen` n=2 times in the episode: its next two are the plain arm's 3rd and 4th
    for a, b in zip(seen1, seen2[2:]):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    assert len(seen1) == 2 and len(seen2) == 4


def test_adam_look_ahead_matches_float64_reference(corpus):
    """inner="adam": theta' = theta - lr * g / (sqrt(v / (1 - beta2^t)) + eps) with AdamW's
    state (sign(g) where it has none), the target loss summed at theta': against a float64
    deepcopy written from that formula."""
    import copy

    selector, tasks = build(corpus, 9, sources=("A", "mlm"), lr=1e-3, m=1, inner="adam")
    selector.train_batches(tasks["A"], 3)
    g = torch.Generator().manual_seed(3)
    targets = [tasks["target"].sample(g)]
    sources = {name: [tasks[name].sample(g)] for name in ("A", "mlm")}
    got = selector.utilities(sources, targets)
    opt = selector.optimizer
    beta2, eps, lr = opt.param_groups[0]["betas"][1], opt.param_groups[0]["eps"], opt.param_groups[0]["lr"]
    for name, batches in sources.items():
        model = copy.deepcopy(selector.model).double().eval()
        originals = dict(selector.model.named_parameters())
        params = dict(model.named_parameters())
        loss = model(batches[0])
        names = [n for n, q in params.items() if q.requires_grad]
        grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
        with torch.no_grad():
            for n, gr in zip(names, grads):
                if gr is None:
                    continue
                state = opt.state.get(originals[n])
                if state:
                    step = gr / ((state["exp_avg_sq"].double() / (1 - beta2 ** float(state["step"]))).sqrt() + eps)
                else:
                    step = gr.sign()
                params[n].sub_(lr * step)
            expected = -sum(float(model(b)) for b in targets)
        assert got[name] == pytest.approx(expected, rel=1e-4), name
        selector.inner, selector.scorer.precondition, selector.scorer.lr = "sgd", None, lr
        assert selector.utilities({name: batches}, targets)[name] != pytest.approx(expected, rel=1e-4)
        selector.inner, selector.scorer.precondition = "adam", selector.adam_precondition

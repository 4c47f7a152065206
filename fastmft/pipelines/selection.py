"""Meta-learned task selection for (pre)training (Luo et al.; docs/design.md section 2).

Each episode samples M batches of every target task, scores every source task s by
u(s) = sum over M of its batches tau of -(sum of the target losses at theta'),
theta' = theta - alpha * grad L_tau(theta) (one functional inner step, no graph kept: see
:class:`fastmft.pipelines.utility.TaskUtilityScorer`), picks argmax u (a random task with probability
epsilon), and trains N batches of it with the real optimizer. With no targets given the mode is
downstream-agnostic (T = S).

Tasks are small objects: how to sample a batch, the head they need, and the loss given the
encoder's last hidden state. Tasks that name the same ``head`` share it (a target task and the
source task that is its training set, for example).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from fastmft.pipelines.utility import TaskUtilityScorer
from fastmft.runtime.files import CheckpointDir, trim_lines


def pad_ids(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """input_ids and attention_mask [B, longest] of token-id lists, right-padded with pad_id."""
    longest = max(len(r) for r in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.as_tensor(list(r), dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


class Task:
    """Base task over tokenised examples (lists of token ids with [CLS] ... [SEP])."""

    def __init__(
        self,
        name: str,
        input_ids: Sequence[Sequence[int]],
        *,
        batch_size: int = 16,
        head: str | None = None,
        pad_id: int = 0,
    ):
        if not input_ids:
            raise ValueError(f"task {name!r} has no examples")
        if batch_size < 1:
            raise ValueError(f"task {name!r}: batch_size must be >= 1, got {batch_size}")
        self.name, self.input_ids, self.batch_size = name, list(input_ids), batch_size
        self.head = head or name
        self.pad_id = pad_id

    def _rows(self, generator: torch.Generator) -> list[int]:
        return torch.randint(len(self.input_ids), (self.batch_size,), generator=generator).tolist()

    def sample(self, generator: torch.Generator) -> dict:
        """A batch drawn with replacement: {"task": name, input_ids, attention_mask, ...}."""
        raise NotImplementedError

    def make_head(self, hidden_size: int, vocab_size: int) -> nn.Module:
        raise NotImplementedError

    def loss(self, model: "MultiTaskModel", hidden: Tensor, batch: dict) -> Tensor:
        raise NotImplementedError


class ClassificationTask(Task):
    """Sequence classification on the [CLS] state (any labelled dataset: an MFT domain, say)."""

    def __init__(self, name: str, input_ids, labels: Sequence[int], num_labels: int, **kwargs):
        super().__init__(name, input_ids, **kwargs)
        self.labels = torch.as_tensor(list(labels), dtype=torch.long)
        if len(self.labels) != len(self.input_ids):
            raise ValueError(f"task {name!r}: {len(self.labels)} labels for {len(self.input_ids)} examples")
        if self.labels.numel() and (int(self.labels.min()) < 0 or int(self.labels.max()) >= num_labels):
            raise ValueError(f"task {name!r}: labels must lie in [0, {num_labels})")
        self.num_labels = num_labels

    def sample(self, generator):
        rows = self._rows(generator)
        ids, mask = pad_ids([self.input_ids[i] for i in rows], self.pad_id)
        return {"task": self.name, "input_ids": ids, "attention_mask": mask, "labels": self.labels[rows]}

    def make_head(self, hidden_size, vocab_size):
        return nn.Linear(hidden_size, self.num_labels)

    def loss(self, model, hidden, batch):
        return F.cross_entropy(model.heads[self.head](hidden[:, 0]).float(), batch["labels"])


class MaskedLMTask(Task):
    """Masked language modelling: 15 % of the non-special tokens are chosen (at least one per
    row); of those 80 % become [MASK], 10 % a random token, 10 % stay. The decoder is tied to the
    encoder's input embeddings."""

    def __init__(
        self,
        name: str,
        input_ids,
        *,
        mask_id: int,
        vocab_size: int,
        special_ids: Sequence[int],
        probability: float = 0.15,
        **kwargs,
    ):
        super().__init__(name, input_ids, **kwargs)
        self.mask_id, self.vocab_size, self.probability = mask_id, vocab_size, probability
        self.special = torch.as_tensor(sorted(set(special_ids) | {self.pad_id}), dtype=torch.long)

    def sample(self, generator):
        ids, mask = pad_ids([self.input_ids[i] for i in self._rows(generator)], self.pad_id)
        eligible = ~torch.isin(ids, self.special)
        scores = torch.rand(ids.shape, generator=generator)
        chosen = eligible & (scores < self.probability)
        # At least one prediction per row that has an eligible token: its lowest-scoring one.
        first = torch.where(eligible, scores, 2.0).argmin(1)
        rows = eligible.any(1)
        chosen[rows.nonzero()[:, 0], first[rows]] = True
        labels = torch.where(chosen, ids, -100)
        action = torch.rand(ids.shape, generator=generator)
        random_tokens = torch.randint(self.vocab_size, ids.shape, generator=generator)
        ids = torch.where(chosen & (action < 0.8), self.mask_id, ids)
        ids = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_tokens, ids)
        return {"task": self.name, "input_ids": ids, "attention_mask": mask, "labels": labels}

    def make_head(self, hidden_size, vocab_size):
        return nn.ModuleDict(
            {
                "transform": nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.GELU(), nn.LayerNorm(hidden_size)),
                "bias": _Bias(vocab_size),
            }
        )

    def loss(self, model, hidden, batch):
        head = model.heads[self.head]
        picked = batch["labels"] != -100
        h = head["transform"](hidden[picked])
        logits = F.linear(h, model.encoder.get_input_embeddings().weight, head["bias"].bias)
        return F.cross_entropy(logits.float(), batch["labels"][picked])


class _Bias(nn.Module):
    def __init__(self, size: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(size))


class TokenShuffleTask(Task):
    """Token-shuffle detection (a self-supervised objective in the spirit of ERNIE 2.0's
    structure-aware tasks): 15 % of each row's non-special positions (at least two) swap their
    tokens by a random permutation; a per-token binary head predicts which tokens moved."""

    def __init__(self, name: str, input_ids, *, special_ids: Sequence[int], probability: float = 0.15, **kwargs):
        super().__init__(name, input_ids, **kwargs)
        self.special = set(special_ids) | {self.pad_id}
        self.probability = probability

    def sample(self, generator):
        rows = [list(self.input_ids[i]) for i in self._rows(generator)]
        ids, mask = pad_ids(rows, self.pad_id)
        labels = torch.full(ids.shape, -100, dtype=torch.long)
        for r, row in enumerate(rows):
            positions = [p for p, t in enumerate(row) if t not in self.special]
            labels[r, positions] = 0
            if len(positions) < 2:
                continue
            k = max(2, round(self.probability * len(positions)))
            pick = torch.as_tensor(positions)[torch.randperm(len(positions), generator=generator)[:k]]
            ids[r, pick] = ids[r, pick[torch.randperm(k, generator=generator)]]
            labels[r, pick] = (ids[r, pick] != torch.as_tensor(row)[pick]).long()
        return {"task": self.name, "input_ids": ids, "attention_mask": mask, "labels": labels}

    def make_head(self, hidden_size, vocab_size):
        return nn.Linear(hidden_size, 2)

    def loss(self, model, hidden, batch):
        picked = batch["labels"] != -100
        return F.cross_entropy(model.heads[self.head](hidden[picked]).float(), batch["labels"][picked])


class MultiTaskModel(nn.Module):
    """A shared encoder plus one head per distinct ``task.head``; ``forward(batch)`` is the loss of
    the batch's task (so one module call covers every task, as the functional scorer needs)."""

    def __init__(self, encoder: nn.Module, tasks: Sequence[Task]):
        super().__init__()
        self.encoder = encoder
        hidden, vocab = encoder.config.hidden_size, encoder.config.vocab_size
        self.heads = nn.ModuleDict()
        self.tasks: dict[str, Task] = {}
        for task in tasks:
            if task.name in self.tasks and self.tasks[task.name] is not task:
                raise ValueError(f"two different tasks are named {task.name!r}")
            self.tasks[task.name] = task
            if task.head not in self.heads:
                self.heads[task.head] = task.make_head(hidden, vocab)

    def forward(self, batch: dict) -> Tensor:
        task = self.tasks[batch["task"]]
        device = next(self.encoder.parameters()).device
        hidden = self.encoder(
            input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
        ).last_hidden_state
        return task.loss(self, hidden, {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()})


@dataclass
class Episode:
    episode: int
    utilities: dict[str, float]
    chosen: str
    explored: bool
    train_loss: float
    scoring_s: float
    training_s: float
    batch_scores: dict[str, list[float]] | None = None  # the M terms of each u(s): its noise


class TaskSelector:
    """Runs the selection algorithm over ``model`` (a :class:`MultiTaskModel` holding every task).

    ``targets=None`` is downstream-agnostic (T = S). ``inner_lr`` is alpha of the inner step,
    ``inner``: "sgd" (theta' = theta - inner_lr * g) or "adam" (the look-ahead of the real optimizer:
    alpha = its current lr, g scaled as AdamW would, :meth:`adam_precondition`; inner_lr unused);
    ``lr`` the optimizer's learning rate (AdamW), ``m`` the batches per task for scoring,
    ``n`` the training batches per episode, ``epsilon`` the exploration rate.

    Randomness: every consumer draws from its own stream seeded from ``seed`` and its name
    (:meth:`stream`): each source's scoring batches, each target's batches, each task's training
    batches, and the exploration. So two runs with one seed that pick different tasks still see
    the same k-th training batch of every task, and scoring never shifts the training batches:
    paired arms differ only in which task they train."""

    def __init__(
        self,
        model: MultiTaskModel,
        sources: Sequence[Task],
        targets: Sequence[Task] | None = None,
        *,
        inner_lr: float = 1e-3,
        lr: float = 2e-5,
        m: int = 2,
        n: int = 4,
        epsilon: float = 0.1,
        seed: int = 0,
        max_grad_norm: float = 1.0,
        inner: str = "sgd",
    ):
        if not sources:
            raise ValueError("at least one source task is needed")
        missing = [t.name for t in [*sources, *(targets or [])] if model.tasks.get(t.name) is not t]
        if missing:
            raise ValueError(f"tasks {missing} are not part of the model: build MultiTaskModel with every task")
        if m < 1 or n < 1:
            raise ValueError(f"m and n must be >= 1 (--m, --n), got m={m}, n={n}")
        if inner not in ("sgd", "adam"):
            raise ValueError(f"inner must be 'sgd' or 'adam' (--inner), got {inner!r}")
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError(f"epsilon must lie in [0, 1] (--epsilon), got {epsilon}")
        for name, value in (("inner_lr", inner_lr), ("lr", lr)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} (--{name.replace('_', '-')}) must be a finite number > 0, got {value!r}")
        if not (math.isfinite(max_grad_norm) and max_grad_norm >= 0):
            raise ValueError(f"max_grad_norm must be a finite number >= 0, got {max_grad_norm!r}")
        self.model, self.sources, self.targets = model, list(sources), list(targets) if targets else None
        self.m, self.n, self.epsilon, self.max_grad_norm = m, n, epsilon, max_grad_norm
        self.inner = inner
        self.scorer = TaskUtilityScorer(
            model,
            lambda mod, batch: mod(batch),
            inner_lr,
            precondition=self.adam_precondition if inner == "adam" else None,
        )
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
        named = dict(model.named_parameters())
        self._scored = [named[n] for n in self.scorer.names]
        self._group = {id(q): g for g in self.optimizer.param_groups for q in g["params"]}
        self.seed = seed
        self.streams: dict[str, torch.Generator] = {}
        self.explore = random.Random(seed)
        self.episodes_done = 0
        self.log_lines = 0  # lines of the episode log this checkpointed progress accounts for
        self.on_scored = None  # called with each source's name once its utility is known (progress)

    def stream(self, name: str) -> torch.Generator:
        """The generator of one consumer (e.g. ``"train:mlm"``), created on first use from the seed."""
        if name not in self.streams:
            digest = hashlib.sha256(f"{self.seed}:{name}".encode()).digest()
            self.streams[name] = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        return self.streams[name]

    def adam_precondition(self, i: int, grad: Tensor) -> Tensor:
        """``grad`` scaled as AdamW scales its step now: g / (sqrt(v / (1 - beta2^t)) + eps) with
        the optimizer's second moment v of that parameter after t steps, or sign(g) (Adam's first
        step) where it holds no state yet. With alpha = the current lr this is the step AdamW would
        take on this batch alone (its momentum and weight decay left out)."""
        param = self._scored[i]
        state = self.optimizer.state.get(param)
        sparse = grad.is_sparse
        if sparse:
            grad = grad.coalesce()
            values, rows = grad.values(), grad.indices()[0]
        else:
            values = grad
        if not state:
            scaled = values.sign()
        else:
            group = self._group[id(param)]
            beta2, eps = group["betas"][1], group["eps"]
            denom = (state["exp_avg_sq"] / (1 - beta2 ** float(state["step"]))).sqrt() + eps
            scaled = values / (denom.index_select(0, rows) if sparse else denom)
        return (
            torch.sparse_coo_tensor(grad.indices(), scaled, grad.shape, check_invariants=False, is_coalesced=True)
            if sparse
            else scaled
        )

    @property
    def mode(self) -> str:
        return "agnostic" if self.targets is None else "aware"

    def utilities(self, source_batches: dict[str, list[dict]], target_batches: list[dict]) -> dict[str, float]:
        """u(s) for every source from given batches (scoring runs with the model in eval mode)."""
        was_training = self.model.training
        self.model.eval()
        if self.inner == "adam":
            self.scorer.lr = self.optimizer.param_groups[0]["lr"]
        try:
            self.last_scores = {}
            for name, batches in source_batches.items():
                self.last_scores[name] = [self.scorer.score(b, target_batches) for b in batches]
                if self.on_scored is not None:
                    self.on_scored(name)
            return {name: sum(v, 0.0) for name, v in self.last_scores.items()}
        finally:
            self.model.train(was_training)

    def episode(self) -> Episode:
        start = time.perf_counter()
        target_batches = [
            t.sample(self.stream(f"target:{t.name}")) for t in (self.targets or self.sources) for _ in range(self.m)
        ]
        source_batches = {
            s.name: [s.sample(self.stream(f"score:{s.name}")) for _ in range(self.m)] for s in self.sources
        }
        utilities = self.utilities(source_batches, target_batches)
        explored = self.explore.random() < self.epsilon
        chosen = self.explore.choice(self.sources).name if explored else max(utilities, key=utilities.get)
        scored = time.perf_counter()
        train_loss = self.train_batches(self.model.tasks[chosen], self.n)
        self.episodes_done += 1
        return Episode(
            self.episodes_done,
            utilities,
            chosen,
            explored,
            train_loss,
            scored - start,
            time.perf_counter() - scored,
            self.last_scores,
        )

    def train_batches(self, task: Task, count: int) -> float:
        """``count`` optimizer steps on batches of ``task``; returns their mean loss."""
        self.model.train()
        total = 0.0
        for _ in range(count):
            loss = self.model(task.sample(self.stream(f"train:{task.name}")))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
            self.optimizer.step()
            total += loss.item()
        return total / max(count, 1)

    def run(
        self,
        episodes: int,
        *,
        log: str | Path | None = None,
        checkpoint: str | Path | None = None,
        progress: bool = True,
    ) -> list[Episode]:
        """Run until ``episodes`` episodes are done in total (resuming from ``checkpoint`` when it
        holds one), appending one JSON line per episode to ``log``, then checkpointing. On resume
        the log is cut back to the lines the checkpoint accounts for, so no episode appears twice."""
        if episodes < 0:
            raise ValueError(f"episodes (--episodes) must be >= 0, got {episodes}")
        if checkpoint is not None:
            resumed = self.load(checkpoint)
            if log is not None:  # a log beside the checkpoint is the run's own
                trim_lines(Path(log), self.log_lines if resumed else 0)
        history = []
        per_episode = len(self.sources) + 1  # each source scored, then the training
        with tqdm(
            total=episodes * per_episode,
            initial=self.episodes_done * per_episode,
            desc=f"task selection ({self.mode})",
            unit="step",
            disable=not progress,
        ) as bar:
            self.on_scored = lambda name: (bar.set_postfix(scored=name), bar.update(1))
            try:
                while self.episodes_done < episodes:
                    ep = self.episode()
                    history.append(ep)
                    if log is not None:
                        with open(log, "a", encoding="utf-8") as f:
                            f.write(json.dumps(asdict(ep)) + "\n")
                        self.log_lines += 1
                    if checkpoint is not None:
                        self.save(checkpoint)
                    bar.set_postfix(episode=ep.episode, chosen=ep.chosen)
                    bar.update(1)
            finally:
                self.on_scored = None
        return history

    def save(self, folder: str | Path) -> Path:
        """One atomic checkpoint in ``folder`` (:class:`fastmft.runtime.files.CheckpointDir`): model weights
        (safetensors), optimizer and RNG states (tensors only), progress (JSON). Returns its folder."""
        from safetensors.torch import save_model

        def write(ckpt: Path) -> None:
            save_model(self.model, str(ckpt / "model.safetensors"))
            torch.save(
                {
                    "optimizer": self.optimizer.state_dict(),
                    "streams": {k: g.get_state() for k, g in self.streams.items()},
                    "torch": torch.get_rng_state(),
                },
                ckpt / "state.pt",
            )
            (ckpt / "selector.json").write_text(
                json.dumps(
                    {
                        "episodes_done": self.episodes_done,
                        "log_lines": self.log_lines,
                        "explore": _encode_random(self.explore),
                    }
                )
            )

        return CheckpointDir(Path(folder)).save(write)

    def load(self, folder: str | Path) -> bool:
        """Resume from the newest readable checkpoint in ``folder``; False when there is none."""
        from safetensors import safe_open
        from safetensors.torch import load_model

        def read(ckpt: Path):  # the small parts, and the weights' header: a damaged checkpoint changes nothing
            with safe_open(str(ckpt / "model.safetensors"), "pt"):
                pass
            return (
                ckpt,
                torch.load(ckpt / "state.pt", weights_only=True),
                json.loads((ckpt / "selector.json").read_text()),
            )

        if Path(folder, "selector.json").is_file():  # the layout before checkpoints were one unit
            raise ValueError(
                f"{folder} holds a checkpoint of an older fastmft; resume it with that version or use another --output-dir"
            )
        found = CheckpointDir(Path(folder)).load(read)
        if found is None:
            return False
        ckpt, state, meta = found
        load_model(self.model, str(ckpt / "model.safetensors"))
        self.optimizer.load_state_dict(state["optimizer"])
        for name, st in state["streams"].items():
            self.stream(name).set_state(st)
        torch.set_rng_state(state["torch"])
        self.episodes_done, self.log_lines = meta["episodes_done"], meta["log_lines"]
        self.explore.setstate(_decode_random(meta["explore"]))
        return True


def _encode_random(r: random.Random) -> list:
    version, internal, gauss = r.getstate()
    return [version, list(internal), gauss]


def _decode_random(state: list) -> tuple:
    return (state[0], tuple(state[1]), state[2])


def build_tasks(
    ds,
    tokenizer,
    domain_vocab,
    num_labels: int,
    *,
    target_domain: int | None,
    sources: Sequence[str],
    batch_size: int,
    split_column: str | None,
    unlabeled_splits: Sequence[str] | None = ("train",),
) -> tuple[list[Task], list[Task] | None]:
    """Source and target tasks from a prepared multi-domain dataset (fastmft.data.prepare):
    "mlm" and "shuffle" over the texts of the ``unlabeled_splits`` (default: training rows only, so
    that no dev or test text is trained on; None: every row, an explicit choice; without a split
    column: every row), and "domains": one sentiment-style classification task
    per domain (all sharing the head "label"). The target task is the target domain's rows of
    the dev split when ``split_column`` exists, else all its rows; its domain is left out of the
    source classification tasks. ``target_domain=None`` is downstream-agnostic."""
    special, pad = tokenizer.all_special_ids, tokenizer.pad_token_id or 0
    ids, labels, domains = ds["input_ids"], ds["labels"], ds["domains"]
    splits = ds[split_column] if split_column and split_column in ds.column_names else None
    out: list[Task] = []
    unlabeled = (
        ids
        if splits is None or unlabeled_splits is None
        else [x for x, s in zip(ids, splits) if s in set(unlabeled_splits)]
    )
    if ({"mlm", "shuffle"} & set(sources)) and not unlabeled:
        raise ValueError(f"no row of the split(s) {list(unlabeled_splits)} for the self-supervised sources")
    unknown = set(sources) - {"mlm", "shuffle", "domains"}
    if unknown:
        raise ValueError(f"unknown source kinds {sorted(unknown)}; choose from mlm, shuffle, domains")
    if "mlm" in sources:
        out.append(
            MaskedLMTask(
                "mlm",
                unlabeled,
                mask_id=tokenizer.mask_token_id,
                vocab_size=len(tokenizer),
                special_ids=special,
                batch_size=batch_size,
                pad_id=pad,
            )
        )
    if "shuffle" in sources:
        out.append(TokenShuffleTask("shuffle", unlabeled, special_ids=special, batch_size=batch_size, pad_id=pad))
    if "domains" in sources:
        for k, name in enumerate(domain_vocab.values):
            if k == target_domain:
                continue
            rows = [i for i in range(len(ids)) if domains[i] == k and (splits is None or splits[i] == "train")]
            if rows:
                out.append(
                    ClassificationTask(
                        f"cls:{name}",
                        [ids[i] for i in rows],
                        [labels[i] for i in rows],
                        num_labels,
                        head="label",
                        batch_size=batch_size,
                        pad_id=pad,
                    )
                )
    if not out:
        raise ValueError("no source task: check --sources and the data")
    if target_domain is None:
        return out, None
    rows = [i for i in range(len(ids)) if domains[i] == target_domain and (splits is None or splits[i] == "dev")]
    if not rows:
        raise ValueError(
            f"the target domain {domain_vocab.values[target_domain]!r} has no rows"
            + (" in the dev split" if splits else "")
        )
    target = ClassificationTask(
        f"target:{domain_vocab.values[target_domain]}",
        [ids[i] for i in rows],
        [labels[i] for i in rows],
        num_labels,
        head="label",
        batch_size=batch_size,
        pad_id=pad,
    )
    return out, [target]

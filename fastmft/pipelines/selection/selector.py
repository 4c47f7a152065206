"""The task selector of meta-learned task selection (Luo et al.; docs/design.md section 2).

Each episode samples M batches of every target task, scores every source task s by
u(s) = sum over M of its batches tau of -(sum of the target losses at theta'),
theta' = theta - alpha * grad L_tau(theta) (one functional inner step, no graph kept: see
:class:`fastmft.pipelines.selection.utility.TaskUtilityScorer`), picks argmax u (a random task with
probability epsilon), and trains N batches of it with the real optimizer. With no targets given the
mode is downstream-agnostic (T = S). :meth:`TaskSelector.run` logs one JSON line per episode and
checkpoints after each, so that a resumed run ends as an uninterrupted one.
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
from torch import Tensor
from tqdm.auto import tqdm

from fastmft.runtime.files import CheckpointDir, trim_lines

from .config import SelectConfig
from .tasks import MultiTaskModel, Task
from .utility import TaskUtilityScorer


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
        inner_lr: float = SelectConfig.inner_lr,
        lr: float = SelectConfig.lr,
        m: int = SelectConfig.m,
        n: int = SelectConfig.n,
        epsilon: float = SelectConfig.epsilon,
        seed: int = SelectConfig.seed,
        max_grad_norm: float = 1.0,
        inner: str = SelectConfig.inner,
    ):
        if not sources:
            raise ValueError("at least one source task is needed")
        missing = [t.name for t in [*sources, *(targets or [])] if model.tasks.get(t.name) is not t]
        if missing:
            raise ValueError(f"tasks {missing} are not part of the model: build MultiTaskModel with every task")
        if m < 1 or n < 1:
            raise ValueError(f"`m` and `n` must be >= 1, got m={m}, n={n}")
        if inner not in ("sgd", "adam"):
            raise ValueError(f"`inner` must be 'sgd' or 'adam', got {inner!r}")
        if not 0.0 <= epsilon <= 1.0:
            raise ValueError(f"`epsilon` must lie in [0, 1], got {epsilon}")
        for name, value in (("inner_lr", inner_lr), ("lr", lr)):
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"`{name}` must be a finite number > 0, got {value!r}")
        if not (math.isfinite(max_grad_norm) and max_grad_norm >= 0):
            raise ValueError(f"max_grad_norm must be a finite number >= 0, got {max_grad_norm!r}")
        check_scoring_memory(list(sources), list(targets or sources), m)
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
            raise ValueError(f"`episodes` must be >= 0, got {episodes}")
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
                f"{folder} holds a checkpoint of an older fastmft; resume it with that version or use another `output_dir`"
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


# Bytes per token of a held batch: input ids, attention mask and labels (int64 each).
_BATCH_TOKEN_BYTES = 24


def check_scoring_memory(sources: list[Task], targets: list[Task], m: int) -> None:
    """An episode holds m batches of every source and every target task at once: refuse, before
    any work, an m or batch size whose batches (padded to each task's longest row) would take more
    than half the memory available now."""
    need = sum(
        m * t.batch_size * max(len(ids) for ids in t.input_ids) * _BATCH_TOKEN_BYTES for t in [*sources, *targets]
    )
    available = _available_memory()
    if available is not None and need > available / 2:
        raise ValueError(
            f"`m`={m} batches of `batch_size`={max(t.batch_size for t in [*sources, *targets])} rows per task "
            f"would hold about {need / 2**30:.1f} GiB of scoring batches per episode, more "
            f"than half the {available / 2**30:.1f} GiB of memory available: lower `m` or `batch_size`"
        )


def _available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _encode_random(r: random.Random) -> list:
    version, internal, gauss = r.getstate()
    return [version, list(internal), gauss]


def _decode_random(state: list) -> tuple:
    return (state[0], tuple(state[1]), state[2])

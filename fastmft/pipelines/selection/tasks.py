"""The tasks of meta-learned task selection (docs/design.md section 2) and the model that holds them.

Tasks are small objects: how to sample a batch, the head they need, and the loss given the
encoder's last hidden state. Tasks that name the same ``head`` share it (a target task and the
source task that is its training set, for example). :class:`MultiTaskModel` is the shared encoder
with one head per distinct ``head``; :func:`build_tasks` makes the source and target tasks of a
prepared multi-domain dataset.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastmft.data.batching import pad_ids


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

    def domain_rows(domain: int, split: str) -> list[int]:
        return [i for i in range(len(ids)) if domains[i] == domain and (splits is None or splits[i] == split)]

    def label_task(name: str, rows: list[int]) -> ClassificationTask:
        rows_ids, rows_labels = [ids[i] for i in rows], [labels[i] for i in rows]
        return ClassificationTask(
            name, rows_ids, rows_labels, num_labels, head="label", batch_size=batch_size, pad_id=pad
        )

    if "domains" in sources:
        for k, name in enumerate(domain_vocab.values):
            rows = domain_rows(k, "train") if k != target_domain else []
            if rows:
                out.append(label_task(f"cls:{name}", rows))
    if not out:
        raise ValueError("no source task: check `sources` and the data")
    if target_domain is None:
        return out, None
    rows = domain_rows(target_domain, "dev")
    if not rows:
        raise ValueError(
            f"the target domain {domain_vocab.values[target_domain]!r} has no rows"
            + (" in the dev split" if splits else "")
        )
    return out, [label_task(f"target:{domain_vocab.values[target_domain]}", rows)]

"""MFT in ``transformers.Trainer``: the MFT loss over an encoder's hidden states, as a model and a
Trainer subclass that keeps everything else of the Trainer (gradient accumulation, mixed
precision, its checkpoints and resume, ``torchrun``).

    from transformers import AutoModel, DataCollatorWithPadding, TrainingArguments
    from fastmft.integrations.transformers import MFTModel, MFTTrainer

    model = MFTModel(AutoModel.from_pretrained(path), num_labels=2, num_domains=4)
    trainer = MFTTrainer(model=model, args=TrainingArguments("runs/mft"), train_dataset=ds,
                         data_collator=DataCollatorWithPadding(tokenizer))
    trainer.train()
    encoder = model.encoder  # the MFT phase is done: drop the heads, fine-tune a copy per domain

The dataset's columns: ``input_ids``, ``attention_mask`` (``token_type_ids`` if the encoder has
them), ``labels`` and ``domains`` (integers), and optionally ``typicality`` (the per-row weights t,
e.g. from ``fastmft.typicality`` or ``fastmft score``; without it every t is 1, MFT(DC)).

The domain corruption of L_SDC is a permutation of the domain labels of the whole *global* batch
(every process's rows of one forward, in rank order), drawn from the Trainer's seed, the step and
the micro-batch: under ``torchrun`` with W processes of B rows each, training is the one-process
run with W x B rows per batch (same rows, same corrupted labels, the same gradients up to float
summation order); the draw depends on nothing else, so a run resumed from the Trainer's checkpoint
draws the same corrupted labels as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import Trainer
from transformers.utils import ModelOutput

from fastmft.ops.functional import shuffle_domains
from fastmft.ops.nn import MFTLoss, skip_layers

__all__ = ["MFTModel", "MFTModelOutput", "MFTTrainer", "global_corrupted_domains"]


@dataclass
class MFTModelOutput(ModelOutput):
    loss: Tensor | None = None  # L_TLC + lam * L_SDC (None without labels)
    logits: Tensor | None = None  # label logits [B, num_labels] on the last layer's [CLS] state


class MFTModel(nn.Module):
    """A Hugging Face encoder (``AutoModel``, e.g. BertModel) and the heads of :class:`fastmft.MFTLoss`:
    one module, so that the Trainer optimises, saves and restores both. ``layers`` default to the
    paper's thirds of the depth (``fastmft.skip_layers``); ``encoder`` stays a plain attribute to
    keep or to save alone after the MFT phase."""

    def __init__(
        self,
        encoder: nn.Module,
        num_labels: int,
        num_domains: int,
        *,
        layers: Sequence[int] | None = None,
        lam: float = 0.1,
    ):
        super().__init__()
        config = encoder.config
        self.encoder = encoder
        self.mft = MFTLoss(
            config.hidden_size,
            num_labels,
            num_domains,
            layers=skip_layers(config.num_hidden_layers) if layers is None else layers,
            lam=lam,
        )

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        labels: Tensor | None = None,
        domains: Tensor | None = None,
        typicality: Tensor | None = None,
        corrupted: Tensor | None = None,
        token_type_ids: Tensor | None = None,
    ) -> MFTModelOutput:
        """With ``labels``: the MFT loss (``domains`` required; ``corrupted``: the SDC targets, drawn
        here from torch's global generator when not given, which is per process). Without: logits only."""
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, **extra)
        if labels is None:
            return MFTModelOutput(logits=self.mft.label_head(out.hidden_states[-1][:, 0]))
        if domains is None:
            raise ValueError("MFTModel needs `domains` (the rows' domain ids) with `labels`: add a domains column")
        res = self.mft(out.hidden_states, attention_mask, labels, domains, typicality=typicality, corrupted=corrupted)
        return MFTModelOutput(loss=res.loss, logits=res.logits)


def global_corrupted_domains(domains: Tensor, generator: torch.Generator) -> Tensor:
    """This process's rows of one permutation of the domain labels of every process's rows (gathered
    in rank order; processes may hold different row counts). One process: ``shuffle_domains``."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return shuffle_domains(domains.cpu(), generator).to(domains.device)
    world, rank = dist.get_world_size(), dist.get_rank()
    local = domains.detach().to(torch.int64)
    count = torch.tensor([local.numel()], dtype=torch.int64, device=local.device)
    counts = [torch.empty_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    padded = F.pad(local, (0, max(sizes) - local.numel()))
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    every = torch.cat([p[:n] for p, n in zip(parts, sizes)]).cpu()
    start = sum(sizes[:rank])
    return shuffle_domains(every, generator)[start : start + sizes[rank]].to(domains.device, domains.dtype)


class MFTTrainer(Trainer):
    """``transformers.Trainer`` whose loss is the model's MFT loss, with the domain corruption drawn
    per global batch (see the module's docstring). Use it with an :class:`MFTModel` (or any module
    whose forward takes ``corrupted`` and returns ``loss`` and ``logits``); ``remove_unused_columns``
    keeps ``domains`` and ``typicality``, which are forward arguments."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._draws: dict[tuple[bool, int], int] = {}

    def _generator(self, training: bool) -> torch.Generator:
        # One stream per (phase, optimizer step, micro-batch): the same on every process, and the
        # same after a resume from the Trainer's checkpoint of that step.
        step = self.state.global_step
        micro = self._draws.get((training, step), 0)
        self._draws = {(training, step): micro + 1, **{k: v for k, v in self._draws.items() if k[0] != training}}
        key = f"{self.args.seed}:{int(training)}:{step}:{micro}".encode()
        return torch.Generator().manual_seed(int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little"))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # num_items_in_batch is not used: the MFT loss is a mean over each micro-batch's rows, which
        # the Trainer divides by the accumulation steps and DDP averages over equal shards.
        if inputs.get("labels") is not None and inputs.get("domains") is not None and "corrupted" not in inputs:
            inputs = {
                **inputs,
                "corrupted": global_corrupted_domains(inputs["domains"], self._generator(model.training)),
            }
        outputs = model(**inputs)
        return (outputs.loss, outputs) if return_outputs else outputs.loss

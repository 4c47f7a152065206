"""The training loop of one method: its phases (MFT epochs, per-domain or pooled fine-tuning),
each phase's epochs and steps, checkpoints and resumption, evaluation.

Every random draw comes from a seed derived from the config seed, the phase and the step, so that
a resumed run and a torch.distributed run take exactly the steps of an uninterrupted
single-process run."""

from __future__ import annotations

import copy
import time
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from fastmft.data import Collator, LengthBucketSampler, stream_seed
from fastmft.ops.functional import shuffle_domains
from fastmft.ops.nn import skip_layers
from fastmft.runtime.dist import Dist
from fastmft.runtime.files import atomic_path

from .checkpoint import RunStore
from .config import METHOD_NAMES, MFT_METHODS, TrainConfig, TrainResult
from .inputs import TrainData, model_rows
from .metrics import accuracy, macro_f1
from .models import Classifier, MFTModel, prepare_encoder


def shuffle_within(values: Tensor, groups: Sequence[int], seed: int) -> Tensor:
    """``values`` permuted at random within each group (the placebo of per-instance weights)."""
    out = values.clone()
    g = torch.Generator().manual_seed(seed)
    groups_t = torch.as_tensor(list(groups))
    for k in groups_t.unique().tolist():
        idx = (groups_t == k).nonzero()[:, 0]
        out[idx] = values[idx[torch.randperm(len(idx), generator=g)]]
    return out


def _step_seed(seed: int, phase: int, step: int) -> int:
    return stream_seed(seed, phase, step)


# Not transformers.get_linear_schedule_with_warmup: its warmup starts at 0 (step / warm), this one at
# lr / (warm + 1) ((step + 1) / (warm + 1)), and runs pooled with earlier ones must keep these rates.
def warmup_linear(total: int, warmup_ratio: float) -> Callable[[int], float]:
    """The learning-rate factor of each step: linear warmup over ``warmup_ratio`` of ``total``
    steps, then linear decay to 0."""
    warm = int(round(total * warmup_ratio))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        return max(0.0, (total - step) / max(1, total - warm))

    return factor


def _global_batches(lengths: Sequence[int], cfg: TrainConfig, seed: int, epoch: int, world: int) -> list[list[int]]:
    sampler = LengthBucketSampler(lengths, cfg.batch_size, seed=seed)
    sampler.set_epoch(epoch)
    # Each rank needs at least one row of every global batch.
    return [b for b in sampler if len(b) >= world]


def _to(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class MethodRun:
    """One run of one method: the phases, resumable, over the same store."""

    def __init__(self, cfg: TrainConfig, encoder, tokenizer, data: TrainData, store: RunStore, dist: Dist):
        self.cfg, self.data, self.store, self.dist = cfg, data, store, dist
        self.tokenizer = tokenizer
        self.collate = Collator(tokenizer.pad_token_id or 0)
        self.base = prepare_encoder(encoder, cfg.dropout).cpu()
        self.num_labels, self.num_domains = len(data.label_vocab), len(data.domain_vocab)
        self.config_dict = cfg.to_dict()
        self.config_dict.update(
            num_labels=self.num_labels,
            num_domains=self.num_domains,
            train_rows=len(data.train),
            eval_rows=len(data.eval),
        )
        self.precision = cfg.precision or ("bf16" if dist.device.type == "cuda" and cfg.bf16 else "fp32")
        self.autocast = self.precision == "bf16"
        self.typicality: Tensor | None = None  # per training row, for the MFT epochs of tw and full
        self.meta: nn.Module | None = None  # the meta-learned encoder of this call's MFT epochs
        self.stopped = False
        self.t0 = time.perf_counter()

    def autocast_context(self):
        return torch.autocast(self.dist.device.type, torch.bfloat16, enabled=self.autocast)

    def out_of_budget(self) -> bool:
        """Whether stop_after_steps or stop_after_seconds says to checkpoint and return now."""
        cfg = self.cfg
        return (cfg.stop_after_steps is not None and self.store.state["global_step"] >= cfg.stop_after_steps) or (
            cfg.stop_after_seconds is not None and time.perf_counter() - self.t0 >= cfg.stop_after_seconds
        )

    # -- phases ----------------------------------------------------------------------------
    def phases(self) -> list[str]:
        m = self.cfg.method
        domains = [f"domain:{d}" for d in range(self.num_domains)]
        if m in MFT_METHODS:
            return ["mft", *domains]
        if m == "s":
            return domains
        return ["joint"]

    def run(self) -> TrainResult:
        t0 = time.perf_counter()
        store = self.store
        store.load(self.config_dict)
        wall_before = store.state.get("wall_time_s", 0.0)
        if self.cfg.method in MFT_METHODS and self.cfg.mft_epochs > 0 and store.state["phase"] == 0:
            self.typicality = self._typicality() if self.cfg.method != "dc" else None
        phases = self.phases()
        meta = None
        while store.state["phase"] < len(phases) and not self.stopped:
            idx = store.state["phase"]
            name = phases[idx]
            if name == "mft":
                self._phase_mft(idx)
            else:
                if meta is None and self.cfg.method in MFT_METHODS:
                    meta = self._meta_encoder()
                self._phase_classifier(idx, name, meta)
            if not self.stopped:
                store.state.update(phase=idx + 1, epoch=0, batch=0)
                store.state["wall_time_s"] = wall_before + time.perf_counter() - t0
                store.save(self.config_dict)  # without the phase's model: its checkpoint is spent
                self.dist.barrier()
        wall = wall_before + time.perf_counter() - t0
        store.state["wall_time_s"] = wall
        store.save(self.config_dict)
        return self._result(wall)

    def meta_learn(self) -> nn.Module:
        """Steps 1-3 alone (typicality, MFT epochs, heads dropped): the meta-learned encoder."""
        self.store.load(self.config_dict)
        self.typicality = self._typicality() if self.cfg.method != "dc" else None
        if self.store.state["phase"] == 0:
            self._phase_mft(0)
            if self.stopped:
                raise RuntimeError("stop_after_steps cut meta-training short")
        return self._meta_encoder()

    def _result(self, wall: float) -> TrainResult:
        per_domain, dev_per_domain = {}, {}
        for k, name in enumerate(self.data.domain_vocab.values):
            r = self.store.state["results"].get(str(k))
            if r is not None:
                per_domain[str(name)] = r
            r = self.store.state.get("dev_results", {}).get(str(k))
            if r is not None:
                dev_per_domain[str(name)] = r
        done = not self.stopped and len(per_domain) == self.num_domains
        acc = sum(r["accuracy"] for r in per_domain.values()) / max(1, len(per_domain))
        f1 = sum(r["macro_f1"] for r in per_domain.values()) / max(1, len(per_domain))
        result = TrainResult(
            self.cfg.method,
            per_domain,
            acc,
            f1,
            wall,
            done,
            self.config_dict,
            str(self.dist.device),
            self.store.state["global_step"],
            dev_per_domain,
            self.precision,
        )
        if done and not self.store.state.get("result_logged"):
            self.store.state["result_logged"] = True
            self.store.log(
                {
                    "event": "result",
                    "method": result.method,
                    "accuracy": result.accuracy,
                    "macro_f1": result.macro_f1,
                    "wall_time_s": result.wall_time_s,
                    "steps": result.steps,
                }
            )
            self.store.save(self.config_dict)
        return result

    # -- typicality and meta-learner -----------------------------------------------------------
    def _typicality(self) -> Tensor:
        from safetensors.torch import load_file, save_file

        from fastmft.pipelines.typicality import score_dataset

        p = self.store.path("typicality.safetensors")
        if p is not None and p.is_file():
            scores = load_file(str(p))["typicality"]
        else:
            encoder = copy.deepcopy(self.base).to(self.dist.device)
            with self.autocast_context():
                scores = score_dataset(
                    encoder,
                    self.data.train,
                    self.num_labels,
                    self.num_domains,
                    alpha=self.cfg.alpha,
                    num_prototypes=self.cfg.num_prototypes,
                    batch_size=max(self.cfg.batch_size, 32),
                    device=self.dist.device,
                    pad_token_id=self.tokenizer.pad_token_id or 0,
                    seed=self.cfg.seed,
                    progress=self.cfg.progress and self.dist.main,
                ).scores
            del encoder
            if p is not None and self.dist.main:
                atomic_path(p, lambda tmp: save_file({"typicality": scores.contiguous()}, tmp))
        if len(scores) != len(self.data.train):
            raise ValueError(f"{p} holds {len(scores)} scores for {len(self.data.train)} training rows")
        return scores.float()

    def _meta_encoder(self):
        from safetensors.torch import load_model

        encoder = copy.deepcopy(self.base)
        p = self.store.path("meta_encoder.safetensors")
        if self.cfg.mft_epochs > 0:
            if self.meta is not None:
                encoder.load_state_dict(self.meta.state_dict())
            else:  # MFT ran in an earlier call: its meta-learner is in the run folder
                load_model(encoder, str(p))
        return encoder

    def _phase_mft(self, idx: int) -> None:
        cfg = self.cfg
        if cfg.mft_epochs == 0:
            return
        rows = model_rows(self.data.train)
        if self.typicality is not None:
            t_rows = self.typicality
            if cfg.placebo:
                t_rows = shuffle_within(t_rows, [r["domains"] for r in rows], cfg.seed)
            for r, t in zip(rows, t_rows.tolist()):
                r["typicality"] = t
        layers = cfg.layers or skip_layers(self.base.config.num_hidden_layers)
        lam = 0.0 if cfg.method == "tw" else cfg.lam
        torch.manual_seed(_step_seed(cfg.seed, idx, -1))
        model = MFTModel(copy.deepcopy(self.base), self.num_labels, self.num_domains, layers, lam)
        self._train(idx, "mft", model, rows, cfg.mft_epochs, cfg.mft_lr or cfg.lr, corrupt=True)
        if self.stopped:
            return
        self.meta = copy.deepcopy(model.encoder).cpu()  # the heads are dropped here
        if self.store.folder is not None and self.dist.main:
            from safetensors.torch import save_model

            atomic_path(self.store.path("meta_encoder.safetensors"), lambda tmp: save_model(self.meta, tmp))
        self.dist.barrier()

    def _phase_classifier(self, idx: int, name: str, meta) -> None:
        cfg = self.cfg
        encoder = copy.deepcopy(meta if meta is not None else self.base)
        rows = model_rows(self.data.train)
        eval_rows = model_rows(self.data.eval)
        torch.manual_seed(_step_seed(cfg.seed, idx, -1))  # the fresh classifier
        if name == "joint":
            model = Classifier(
                encoder,
                self.num_labels,
                num_heads=self.num_domains if cfg.method == "mtl" else 1,
                adv_domains=self.num_domains if cfg.method == "adv" else 0,
                adv_weight=cfg.adv_weight,
            )
            domains = list(range(self.num_domains))
        else:
            k = int(name.split(":")[1])
            model = Classifier(encoder, self.num_labels)
            rows = [r for r in rows if r["domains"] == k]
            domains = [k]
        self._train(idx, name, model, rows, cfg.epochs, cfg.lr)
        if self.stopped:
            return
        dev_rows = model_rows(self.data.dev) if self.data.dev is not None else None
        for k in domains:
            self.store.state["results"][str(k)] = self._evaluate(model, [r for r in eval_rows if r["domains"] == k], k)
            if dev_rows is not None:
                self.store.state.setdefault("dev_results", {})[str(k)] = self._evaluate(
                    model, [r for r in dev_rows if r["domains"] == k], k, split="dev"
                )
        if cfg.save_models and self.store.folder is not None and self.dist.main:
            self._save_model(name, model)

    def _save_model(self, name: str, model: nn.Module) -> None:
        from safetensors.torch import save_model

        (self.store.folder / "models").mkdir(exist_ok=True)
        atomic_path(
            self.store.folder / "models" / f"{name.replace(':', '_')}.safetensors",
            lambda tmp: save_model(model, tmp),
        )

    def _train(
        self, idx: int, name: str, model: nn.Module, rows: list[dict], epochs: int, lr: float, corrupt: bool = False
    ) -> None:
        if not _PhaseTraining(self, idx, name, model, rows, epochs, lr, corrupt).train():
            self.stopped = True

    def phase_label(self, name: str) -> str:
        """'MFT(Full) books' for the phase 'domain:0' of full, 'BERT(Mix) joint', ..."""
        shown = name if not name.startswith("domain:") else self.data.domain_vocab.values[int(name[7:])]
        return f"{METHOD_NAMES[self.cfg.method]} {shown}"

    @torch.no_grad()
    def _evaluate(self, model: Classifier, rows: list[dict], k: int, split: str = "eval") -> dict:
        model.eval()
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
        preds = [0] * len(rows)
        bs = max(self.cfg.batch_size, 32)
        for s in range(0, len(order), bs):
            chunk = order[s : s + bs]
            batch = _to(self.collate([rows[i] for i in chunk]), self.dist.device)
            with self.autocast_context():
                logits, _ = model.logits(batch)
            for i, p in zip(chunk, logits.argmax(-1).tolist()):
                preds[i] = p
        gold = [r["labels"] for r in rows]
        result = {"accuracy": accuracy(gold, preds), "macro_f1": macro_f1(gold, preds), "n": len(rows)}
        self.store.log({"event": "eval", "split": split, "domain": str(self.data.domain_vocab.values[k]), **result})
        return {**result, "predictions": preds}  # per row, for paired tests (McNemar, bootstrap)


class _PhaseTraining:
    """The optimisation of one phase: AdamW and its schedule (restored when the phase was
    interrupted), the epochs and steps over global batches, metric lines, checkpoints, the progress
    bar, and the watch for a non-finite loss."""

    def __init__(
        self,
        run: MethodRun,
        idx: int,
        name: str,
        model: nn.Module,
        rows: list[dict],
        epochs: int,
        lr: float,
        corrupt: bool,
    ):
        self.run, self.cfg, self.dist, self.store = run, run.cfg, run.dist, run.store
        self.idx, self.name, self.model, self.rows, self.epochs, self.corrupt = idx, name, model, rows, epochs, corrupt
        cfg, dist, store = self.cfg, self.dist, self.store
        model.to(dist.device)
        self.lengths = [len(r["input_ids"]) for r in rows]
        self.seed = cfg.seed * 7919 + idx
        self.per_epoch = len(self._batches(0))
        self.total = self.per_epoch * epochs
        # Weight decay on matrices only (not on biases and LayerNorm weights), as BERT does.
        decay = [p for p in model.parameters() if p.ndim >= 2]
        rest = [p for p in model.parameters() if p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}], lr=lr
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_linear(max(1, self.total), cfg.warmup_ratio)
        )
        state = store.state
        if state["phase"] == idx and (state["epoch"] > 0 or state["batch"] > 0):
            store.load_training(model, self.optimizer, self.scheduler)
        self.wrapped = model
        if dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.wrapped = DistributedDataParallel(
                model, device_ids=[dist.device.index] if dist.device.type == "cuda" else None
            )
        from tqdm.auto import tqdm

        self.label = run.phase_label(name)
        self.bar = tqdm(
            total=self.total,
            initial=state["epoch"] * self.per_epoch + state["batch"],
            desc=self.label,
            unit="step",
            disable=not (cfg.progress and dist.main),
            dynamic_ncols=True,
        )
        self.phase_step = state["epoch"] * self.per_epoch + state["batch"]
        self.first_bad = torch.full((), -1, dtype=torch.long, device=dist.device)  # first step with a non-finite loss

    def _batches(self, epoch: int) -> list[list[int]]:
        return _global_batches(self.lengths, self.cfg, self.seed, epoch, self.dist.world)

    def train(self) -> bool:
        """The phase's remaining epochs; False when stopped early at a checkpoint (resume later)."""
        state = self.store.state
        for epoch in range(state["epoch"], self.epochs):
            if not self._epoch(epoch):
                return False
            state.update(epoch=epoch + 1, batch=0)
            self._check_finite()
            if epoch + 1 < self.epochs:
                self._checkpoint()
        self.bar.close()
        return True

    def _epoch(self, epoch: int) -> bool:
        state = self.store.state
        batches = self._batches(epoch)
        self.model.train()
        for b in range(state["batch"] if epoch == state["epoch"] else 0, len(batches)):
            if self.run.out_of_budget():
                state.update(epoch=epoch, batch=b)
                self._check_finite()
                self._checkpoint()
                self.dist.barrier()
                self.bar.close()
                return False
            self._step(epoch, b, [self.rows[i] for i in batches[b]])
            if (
                self.cfg.checkpoint_every
                and state["global_step"] % self.cfg.checkpoint_every == 0
                and b + 1 < len(batches)
            ):
                self._check_finite()
                self._checkpoint()
        return True

    def _step(self, epoch: int, b: int, global_rows: list[dict]) -> None:
        cfg, dist, state = self.cfg, self.dist, self.store.state
        step_seed = _step_seed(cfg.seed, self.idx, self.phase_step)
        torch.manual_seed(step_seed)
        n_global = len(global_rows)
        batch = self.run.collate(global_rows[dist.rank :: dist.world])
        if self.corrupt:
            domains = torch.tensor([r["domains"] for r in global_rows])
            g = torch.Generator().manual_seed(step_seed)
            batch["corrupted"] = shuffle_domains(domains, g)[dist.rank :: dist.world]
        batch = _to(batch, dist.device)
        n_local = batch["input_ids"].shape[0]
        with self.run.autocast_context():
            out = self.wrapped(batch)
        # Remembered on the device (no host read per step) and checked where the loop reads
        # the host anyway: before every log line and checkpoint, so none holds a NaN step.
        self.first_bad = torch.where(
            ~torch.isfinite(out["loss"].detach()) & (self.first_bad < 0), self.phase_step + 1, self.first_bad
        )
        # Every loss here is a mean over this rank's rows: rescale so that DDP's average of
        # the ranks' gradients is the gradient of the mean over the global batch.
        scale = n_local * dist.world / n_global
        (out["loss"] * scale).backward()
        grad_norm = (
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
            if cfg.max_grad_norm > 0
            else None
        )
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.phase_step += 1
        state["global_step"] += 1
        state.update(epoch=epoch, batch=b + 1)
        if cfg.log_every and (self.phase_step % cfg.log_every == 0 or self.phase_step == self.total):
            self._log(epoch, out, n_local, n_global, grad_norm)
        self.bar.update(1)

    def _log(self, epoch: int, out: dict, n_local: int, n_global: int, grad_norm: Tensor | None) -> None:
        """One metric line: the losses averaged over the global batch (this rank has n_local of its rows)."""
        self._check_finite()
        logs = {k: self.dist.sum(v.detach().float() * n_local / n_global).item() for k, v in out.items()}
        record = {
            "event": "step",
            "phase": self.name,
            "epoch": epoch,
            "step": self.phase_step,
            "global_step": self.store.state["global_step"],
            "lr": self.scheduler.get_last_lr()[0],
            **logs,
        }
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        self.store.log(record)
        self.bar.set_postfix(loss=f"{logs['loss']:.4f}")

    def _check_finite(self) -> None:
        if self.dist.sum((self.first_bad >= 0).float()).item():  # every rank calls this at the same points
            step = int(self.first_bad.item())
            raise FloatingPointError(
                f"{self.label}: the loss is not finite at step {step if step > 0 else '(on another rank)'} of this phase; "
                "the last checkpoint is left as it was. Lower `lr` / `mft_lr` or check the data and options"
            )

    def _checkpoint(self) -> None:
        self.store.save(self.run.config_dict, self.model, self.optimizer, self.scheduler)

"""Drop-in: transformers.Trainer trains a tiny BERT whose loss is fastmft's MFTLoss, with every
fused op running through the Triton backend (here in the interpreter)."""

import dataclasses

import pytest
import torch

import fastmft
from fastmft.ops import triton as triton_ops
from tests.helpers import DEVICE, assert_close
from tests.oracles import mft_loss64

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers.Trainer needs it


class TinyMFTModel(torch.nn.Module):
    """A tiny BertModel plus MFTLoss's heads: one module, so the Trainer optimises both."""

    def __init__(self, num_labels=3, num_domains=2):
        super().__init__()
        config = transformers.BertConfig(
            vocab_size=64,
            hidden_size=24,
            num_hidden_layers=3,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=32,
        )
        self.encoder = transformers.BertModel(config, add_pooling_layer=False)
        self.mft = fastmft.MFTLoss(24, num_labels, num_domains, layers=fastmft.skip_layers(3), lam=0.1)

    def forward(self, input_ids, attention_mask, labels=None, domains=None, typicality=None):
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        return self.mft(out.hidden_states, attention_mask, labels, domains, typicality=typicality)


class MFTTrainer(transformers.Trainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with fastmft.use_backend("triton"):
            out = model(**inputs)
        return (out.loss, {"logits": out.logits}) if return_outputs else out.loss


class ToyData(torch.utils.data.Dataset):
    def __init__(self, n=16, seq=12, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, 64, (n, seq), generator=g)
        lengths = torch.randint(3, seq + 1, (n,), generator=g)
        self.mask = (torch.arange(seq)[None] < lengths[:, None]).long()
        self.labels = torch.randint(0, 3, (n,), generator=g)
        self.domains = torch.randint(0, 2, (n,), generator=g)
        self.typicality = torch.rand(n, generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {
            "input_ids": self.ids[i],
            "attention_mask": self.mask[i],
            "labels": self.labels[i],
            "domains": self.domains[i],
            "typicality": self.typicality[i],
        }


def test_trainer_trains_tiny_bert_with_mft_loss_through_triton(tmp_path, monkeypatch):
    calls = {"masked_mean_pool": 0, "multi_head_cross_entropy": 0}
    registry = fastmft.ops.dispatch._registry
    for name in calls:
        original = getattr(triton_ops, name)

        def spy(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setitem(registry, (name, "triton"), dataclasses.replace(registry[(name, "triton")], fn=spy))

    torch.manual_seed(0)
    model = TinyMFTModel()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        use_cpu=DEVICE.type == "cpu",
        report_to=[],
        max_steps=3,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = MFTTrainer(model=model, args=args, train_dataset=ToyData())
    result = trainer.train()
    assert result.global_step == 3
    assert torch.isfinite(torch.tensor(result.training_loss))
    # 3 steps: one pooling launch and two cross-entropy calls (label + domain loss) per step.
    assert calls == {"masked_mean_pool": 3, "multi_head_cross_entropy": 6}
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n].to(p.device))}
    for head in (
        "mft.label_head.weight",
        "mft.domain_heads.0.weight",
        "mft.domain_embedding.weight",
        "encoder.encoder.layer.0.attention.self.query.weight",
    ):
        assert head in changed, f"{head} did not train"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mft_loss_triton_matches_torch(dtype):
    """MFTLoss through the Triton kernels gives the oracle's loss, and the reference's loss and gradients."""

    g = torch.Generator().manual_seed(int.from_bytes(__import__("os").urandom(4), "little"))
    B, T, D = 5, 11, 24
    hidden = [torch.randn(B, T, D, generator=g).to(DEVICE, dtype).requires_grad_() for _ in range(4)]
    mask = (torch.arange(T)[None] < torch.randint(2, T + 1, (B,), generator=g)[:, None]).long().to(DEVICE)
    labels = torch.randint(0, 3, (B,), generator=g)
    domains = torch.randint(0, 2, (B,), generator=g)
    corrupted = fastmft.shuffle_domains(domains, g).to(DEVICE)
    labels, domains = labels.to(DEVICE), domains.to(DEVICE)
    typ = torch.rand(B, generator=g).to(DEVICE)
    loss_fn = fastmft.MFTLoss(D, 3, 2, layers=(1, 2, 3)).to(DEVICE, dtype)
    results = {}
    for name in ("torch", "triton"):
        for h in hidden:
            h.grad = None
        loss_fn.zero_grad()
        with fastmft.use_backend(name):
            out = loss_fn(tuple(hidden), mask, labels, domains, typicality=typ, corrupted=corrupted)
        out.loss.backward()
        results[name] = (
            out.loss.detach(),
            [h.grad.clone() for h in hidden[1:]],
            loss_fn.label_head.weight.grad.clone(),
        )
    (l0, g0, w0), (l1, g1, w1) = results["torch"], results["triton"]
    assert_close(l1, mft_loss64(loss_fn, hidden, mask, labels, domains, typ, corrupted)[0], dtype)
    assert_close(l1, l0, dtype)
    assert_close(w1, w0, dtype)
    for a, b in zip(g1, g0):
        assert_close(a, b, dtype)

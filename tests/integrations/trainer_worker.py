"""One MFTTrainer run over a tiny BERT and toy rows (CPU); the first process saves the trained
parameters. Run by tests/integrations/test_transformers.py, alone or under torchrun:

    python -m tests.integrations.trainer_worker OUT.safetensors ROWS_PER_PROCESS [--local-corruption]

``--local-corruption`` uses the plain transformers.Trainer, whose MFTModel draws each process's
corruption from that process's rows only (the control that shows what the global draw changes).
"""

import argparse
import os

import torch
import transformers
from safetensors.torch import save_file

from fastmft.integrations.transformers import MFTModel, MFTTrainer

VOCAB, SEQ, ROWS = 64, 12, 48


def tiny_model(num_labels: int = 3, num_domains: int = 2) -> MFTModel:
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=24,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,  # dropout draws per process: off, so that W processes can equal one
        attention_probs_dropout_prob=0.0,
    )
    return MFTModel(transformers.BertModel(config, add_pooling_layer=False), num_labels, num_domains)


class ToyRows(torch.utils.data.Dataset):
    """Random token rows of random lengths with labels, domains and typicality columns."""

    def __init__(self, n: int = ROWS, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, VOCAB, (n, SEQ), generator=g)
        lengths = torch.randint(3, SEQ + 1, (n,), generator=g)
        self.mask = (torch.arange(SEQ)[None] < lengths[:, None]).long()
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("rows_per_process", type=int)
    parser.add_argument("--local-corruption", action="store_true")
    args = parser.parse_args()
    transformers.set_seed(0)
    model = tiny_model()
    training = transformers.TrainingArguments(
        output_dir=os.path.join(os.path.dirname(args.out), "trainer"),
        use_cpu=True,
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        report_to=[],
        max_steps=4,
        per_device_train_batch_size=args.rows_per_process,
        optim="sgd",  # not Adam: its g / sqrt(v) would amplify float-order noise in near-zero gradients
        learning_rate=0.5,
        lr_scheduler_type="constant",
        seed=0,
        save_strategy="no",
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer_class = transformers.Trainer if args.local_corruption else MFTTrainer
    trainer_class(model=model, args=training, train_dataset=ToyRows()).train()
    if int(os.environ.get("RANK", "0")) == 0:
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, args.out)
    # The Trainer leaves the process group it made alive; exiting with it alive lets gloo's worker
    # threads outlive the interpreter, which aborted 1 run in 40 on a loaded 2-core machine
    # ("terminate called without an active exception", SIGABRT after training).
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()

"""Shared test helpers: the per-dtype tolerance table, the comparison against float64, and the
device the kernel tests run on."""

import os

import torch

# The kernel tests run on "cpu" through the Triton interpreter (CI), or on a GPU with
# FASTMFT_TEST_DEVICE=cuda (see the README). Inputs are drawn on the CPU from seeded
# generators and then moved, so a case is the same data on either device.
DEVICE = torch.device(os.environ.get("FASTMFT_TEST_DEVICE", "cpu"))

# Tolerances of fastmft results against float64 references written from the formulas, per dtype
# of the inputs: (rtol, atol).
TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-6, 1e-6),
    torch.float16: (1e-2, 1e-3),
    torch.bfloat16: (2e-2, 1e-2),
}


# Fused kernels sum in another order than the references: float32 gets 1e-5 relative there.
KERNEL_TOLERANCES = {**TOLERANCES, torch.float32: (1e-5, 1e-6)}


def assert_close(actual, expected, dtype, table=TOLERANCES):
    rtol, atol = table[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol)


def assert_kernel_close(actual, expected, dtype):
    assert_close(actual, expected, dtype, KERNEL_TOLERANCES)


def emulate_tf32_tensor_cores(monkeypatch):
    """In the Triton interpreter, give tl.dot(..., input_precision="tf32") float32 operands the
    precision of the tensor cores: 10 mantissa bits, the low 13 bits dropped (the interpreter
    otherwise multiplies in full float32 and would hide a missing correction term). No-op on a GPU."""
    if DEVICE.type != "cpu":
        return
    import numpy as np
    from triton._C.libtriton import ir
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    real_dot = builder.create_dot

    def truncated(h):
        if h.data.dtype != np.float32:
            return h
        return interpreter.TensorHandle((h.data.view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32), h.dtype)

    def create_dot(a, b, d, input_precision, max_num_imprecise_acc):
        if input_precision == ir.INPUT_PRECISION.TF32:
            a, b = truncated(a), truncated(b)
        return real_dot(a, b, d, input_precision, max_num_imprecise_acc)

    monkeypatch.setattr(builder, "create_dot", create_dot)


def assert_flag_contract(device):
    """fastmft._C's op returns the non-finite flag as a 0-d bool tensor on the params' device, both
    parts alike (csrc/inner_step.h): from the kernels (a contiguous tensor) and from the ATen path
    (a non-contiguous one), set only when check_finite and a result is inf or NaN."""
    inf = float("inf")
    for p in (torch.tensor([1.0, inf]), torch.tensor([[1.0, inf], [1.0, 1.0]]).t()):
        p = p.to(device)  # .to keeps the transposed strides: the second one stays non-contiguous
        for check in (True, False):
            flag = torch.ops.fastmft_C.inner_step_(
                [p], [torch.ones_like(p)], [torch.empty_like(p)], 0.1, check, [1, 1, 3, 3]
            )
            assert flag.dtype == torch.bool and flag.dim() == 0 and flag.device == p.device
            assert bool(flag) == check


def tiny_bert(folder, words=(), *, layers=2, hidden=16, seed=0):
    """Save a tiny randomly initialised BERT and a WordPiece tokenizer over ``words`` to
    ``folder`` (offline, milliseconds) and return the folder."""
    from pathlib import Path

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted({w.lower() for w in words})]
    # Built with the tokenizers library directly: BertTokenizerFast's constructor differs across
    # transformers versions.
    wordpiece = Tokenizer(models.WordPiece({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wordpiece.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    PreTrainedTokenizerFast(
        tokenizer_object=wordpiece,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    ).save_pretrained(folder)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=128,  # the commands' default --max-length
    )
    BertModel(config).save_pretrained(folder)
    return folder


# Two processes of a fastmft command under torchrun (gloo on CPU): the arguments after "-m".
def two_process_command(command: str) -> list[str]:
    return ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "fastmft", command]


def tiny_bert_corpus(root, n, *, domains=2, seed=0):
    """A synthetic corpus of ``n`` rows written to ``root/rows.jsonl`` and a tiny BERT whose
    vocabulary covers its words (``root/bert``): returns (bert folder, data file, rows)."""
    import json
    from pathlib import Path

    from fastmft.data.synthetic import synthetic_corpus

    root = Path(root)
    rows = synthetic_corpus(n, domains=domains, seed=seed)
    words = " ".join(r["text"] for r in rows).replace(".", " ").replace(",", " ").split()
    bert = tiny_bert(root / "bert", words, layers=2, hidden=16)
    data = root / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return bert, data, rows


def current_checkpoint(root):
    """The folder the checkpoint pointer ``root/checkpoint.json`` names (the previous one is kept
    beside it)."""
    import json
    from pathlib import Path

    return Path(root) / json.loads((Path(root) / "checkpoint.json").read_text())["folder"]


def flip_tensor_bit(path):
    """Flip the lowest bit of one non-zero float32 inside the tensor data of a checkpoint file, a
    safetensors file or a torch.save archive, leaving its structure (header, zip directory, sizes)
    intact: the file still parses, only a value changed. Returns the byte offset changed."""
    import json
    import struct
    import zipfile
    from pathlib import Path

    import numpy as np

    path = Path(path)
    data = bytearray(path.read_bytes())
    if path.suffix == ".safetensors":
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + n])
        regions = [
            (8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1])
            for k, v in sorted(header.items())
            if k != "__metadata__" and v["dtype"] == "F32"
        ]
    else:  # a zip archive of stored (uncompressed) members, one per tensor storage
        with zipfile.ZipFile(path) as z:
            regions = []
            for info in z.infolist():
                if "/data/" in info.filename:
                    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
                    start = info.header_offset + 30 + name_len + extra_len
                    regions.append((start, start + info.file_size))
    for start, end in sorted(regions, key=lambda r: r[0] - r[1]):  # the largest region first
        values = np.frombuffer(bytes(data[start:end]), dtype="<f4", count=(end - start) // 4)
        nonzero = np.flatnonzero(values)
        if len(nonzero):
            offset = start + 4 * int(nonzero[len(nonzero) // 2])
            data[offset] ^= 1
            path.chmod(0o644)
            path.write_bytes(bytes(data))
            return offset
    raise AssertionError(f"{path} has no non-zero float32 tensor data")

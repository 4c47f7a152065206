"""The typicality pipeline in memory (score_dataset): equals typicality computed from embeddings of
single, unpadded forward passes (so bucketing, padding and pooling cannot skew the scores), and the
streaming mode (score_files, through the chunk cache) gives the same scores for the same rows."""

import json

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from fastmft.data import Columns, prepare
from fastmft.data.synthetic import synthetic_corpus
from fastmft.pipelines.typicality import ScoreConfig, ScoreError, score_dataset, score_files
from tests.helpers import assert_close, tiny_bert
from tests.oracles import prototypes64, typicality64


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    rows = synthetic_corpus(12, domains=3, seed=1)
    words = " ".join(r["text"] for r in rows).replace(".", " ").replace(",", " ").split()
    folder = tiny_bert(tmp_path_factory.mktemp("bert"), words)
    return (
        rows,
        AutoModel.from_pretrained(folder, local_files_only=True),
        AutoTokenizer.from_pretrained(folder, local_files_only=True),
    )


@pytest.mark.parametrize("batch_size", [1, 5])
def test_scores_equal_unpadded_reference(tiny, batch_size):
    rows, model, tok = tiny
    data = prepare(datasets.Dataset.from_list(rows), tok, Columns(), max_length=24)
    result = score_dataset(model, data.dataset, 2, 3, alpha=0.4, batch_size=batch_size, progress=False)
    with torch.no_grad():
        emb = torch.stack(
            [
                model(input_ids=torch.tensor([ids])).last_hidden_state[0].double().mean(0)
                for ids in data.dataset["input_ids"]
            ]
        )
    assert_close(result.embeddings, emb, torch.float32)
    labels, domains = torch.tensor(data.dataset["labels"]), torch.tensor(data.dataset["domains"])
    centers, counts = prototypes64(emb, labels, domains, 2, 3)
    assert_close(result.scores, typicality64(emb, labels, domains, centers, counts, 0.4), torch.float32)


def test_multi_prototype_scores(tiny):
    rows, model, tok = tiny
    data = prepare(datasets.Dataset.from_list(rows), tok, Columns(), max_length=24)
    result = score_dataset(model, data.dataset, 2, 3, num_prototypes=2, batch_size=4, progress=False)
    assert result.prototypes.centers.shape[2] == 2 and torch.isfinite(result.scores).all()
    assert result.scores.shape == (len(rows),)


@pytest.mark.parametrize("num_prototypes", [1, 2])
def test_in_memory_and_streaming_give_the_same_scores(tiny, tmp_path, num_prototypes):
    """One pipeline: the same prototypes (J = 2: the same k-means seeds per cell) and typicality
    whether the rows come as a dataset or as a file through the chunk cache (other chunks and
    batches: equal up to float rounding)."""
    rows, model, tok = tiny
    data = prepare(datasets.Dataset.from_list(rows), tok, Columns(id="id"), max_length=24)
    kw = dict(alpha=0.4, num_prototypes=num_prototypes, batch_size=5, seed=3)
    mem = score_dataset(model, data.dataset, 2, 3, progress=False, **kw)
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = ScoreConfig(
        [str(path)],
        str(tmp_path / "out.parquet"),
        max_length=24,
        batch_size=5,
        chunk_rows=7,
        alpha=0.4,
        prototypes=num_prototypes,
        seed=3,
        device="cpu",
        threads=1,
        progress=False,
        precision="fp32",  # as score_dataset's default (the command's follows the CPU)
    )
    assert score_files(cfg, model=model, tokenizer=tok).scored == len(rows)
    out = pq.read_table(cfg.output).to_pydict()
    assert out["id"] == data.dataset["id"]
    np.testing.assert_allclose(out["typicality"], mem.scores.numpy(), rtol=0, atol=1e-5)


def test_non_finite_embeddings_are_an_error(tiny):
    rows, model, tok = tiny
    data = prepare(datasets.Dataset.from_list(rows), tok, Columns(), max_length=24)
    broken = AutoModel.from_config(model.config)
    with torch.no_grad():
        broken.encoder.layer[-1].output.LayerNorm.weight.fill_(float("nan"))
    with pytest.raises(ScoreError, match=f"the encoder's embedding is not finite for {len(rows)} row"):
        score_dataset(broken, data.dataset, 2, 3, progress=False)

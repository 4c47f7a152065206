"""Typicality scoring of a dataset: equals typicality computed from embeddings of single,
unpadded forward passes (so bucketing, padding and pooling cannot skew the scores)."""

import datasets
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from fastmft.data import Columns, prepare
from fastmft.data.synthetic import synthetic_corpus
from fastmft.pipelines.typicality import score_dataset
from tests.helpers import assert_close, tiny_bert
from tests.test_typicality import prototypes64, typicality64


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

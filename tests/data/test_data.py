"""Data layer: loading with user-named columns, vocabularies, tokenisation, collate, sampler,
and the synthetic corpus."""

import dataclasses
import json
import re

import datasets
import pytest
import torch

from fastmft.data import (
    Collator,
    Columns,
    DataError,
    LengthBucketSampler,
    Reject,
    Vocab,
    check_row,
    column_names,
    count_rows,
    decode_record,
    encode_labels,
    iter_records,
    load_table,
    prepare,
    resolve_inputs,
    tokenize_texts,
)
from fastmft.data.synthetic import synthetic_corpus
from tests.helpers import tiny_bert

ROWS = [
    {"review": "good pan", "second": "yes", "stars": "pos", "shop": "kitchen", "split": "train"},
    {"review": "bad book", "second": "no", "stars": "neg", "shop": "books", "split": "train"},
    {"review": "fine pan really good", "second": "ok", "stars": "pos", "shop": "kitchen", "split": "test"},
]
COLUMNS = Columns(text="review", label="stars", domain="shop", text_pair="second")


def write(path, rows, kind):
    ds = datasets.Dataset.from_list(rows)
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "csv":
        ds.to_csv(str(path), index=False)
    elif kind == "parquet":
        ds.to_parquet(str(path))
    else:
        ds.save_to_disk(str(path))
    return path


@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet", "saved"])
def test_load_table_formats(kind, tmp_path):
    path = write(tmp_path / (f"rows.{kind}" if kind != "saved" else "saved"), ROWS, kind)
    ds = load_table(path)
    assert ds["review"] == [r["review"] for r in ROWS]
    assert load_table(path, split="test")["review"] == ["fine pan really good"]


def test_load_table_glob_of_shards(tmp_path):
    write(tmp_path / "a.jsonl", ROWS[:2], "jsonl")
    write(tmp_path / "b.jsonl", ROWS[2:], "jsonl")
    assert len(load_table(str(tmp_path / "*.jsonl"))) == 3
    with pytest.raises(FileNotFoundError, match="no file matches"):
        load_table(str(tmp_path / "*.csv"))
    with pytest.raises(ValueError, match="cannot tell the format"):
        load_table(write(tmp_path / "rows.txt", ROWS, "jsonl"))
    with pytest.raises(DataError, match="one file format"):
        load_table([str(tmp_path / "a.jsonl"), str(write(tmp_path / "c.csv", ROWS, "csv"))])


@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet", "saved"])
def test_streaming_readers_agree_with_load_table(kind, tmp_path):
    """One resolution of paths for both readers; the streaming one yields the same rows, one at a
    time, numbered by line (the CSV header is line 1) or by row."""
    path = write(tmp_path / (f"rows.{kind}" if kind != "saved" else "saved"), ROWS, kind)
    (src,) = resolve_inputs(str(path))
    assert src.kind == {"jsonl": "json", "saved": "dataset"}.get(kind, kind)
    records = list(iter_records(src, ["review", "stars"]))
    rows = [decode_record(payload) for _, payload in records]
    assert [r["review"] for r in rows] == load_table(path)["review"]
    assert [line for line, _ in records] == ([2, 3, 4] if kind == "csv" else [1, 2, 3])
    assert count_rows(src) == 3 and {"review", "stars", "shop"} <= column_names(src)
    assert [s.path for s in resolve_inputs([str(tmp_path / "*"), str(path)])] == [str(path)] * 2


def test_decode_record_rejects_with_a_reason():
    assert decode_record(b'{"a": 1}') == {"a": 1}
    for payload, reason in ((b'{"a": \xff', "undecodable line"), (b"[1, 2]", "not a JSON object")):
        with pytest.raises(Reject) as err:
            decode_record(payload)
        assert err.value.reason == reason


def test_vocab_and_label_encoding():
    ds, labels, domains = encode_labels(datasets.Dataset.from_list(ROWS), COLUMNS)
    assert labels.values == ["neg", "pos"] and domains.values == ["books", "kitchen"]
    assert ds["labels"] == [1, 0, 1] and ds["domains"] == [1, 0, 1]
    assert Vocab.from_values([3, 1, 2, 1]).values == [1, 2, 3]
    assert Vocab.from_json(labels.to_json()) == labels
    by_string = Vocab([1, 2.5, "x"], "label")  # command-line values are strings: 1 and "1" are one key
    assert [by_string.get(v) for v in ("1", "2.5", "x", 1, "3", ["unhashable"])] == [0, 1, 2, 0, None, None]
    assert by_string.encode("2.5") == 1 and labels.get("pos") == 1 and labels.get(["neg"]) is None
    with pytest.raises(ValueError, match="unknown label '3' in row 7"):
        by_string.encode("3", row=7)
    with pytest.raises(ValueError, match="duplicate"):
        Vocab([1, "1"], "label")
    assert Vocab.from_values([1, 1.0, "", None, [2], 0]).values == [0, 1]


BAD_ROWS = [
    ({1: {"stars": "meh"}}, "row 1: unknown label 'meh'; known: ['neg', 'pos']"),
    ({2: {"shop": "garden"}}, "row 2: unknown domain 'garden'"),
    ({0: {"review": "  "}}, "row 0: missing text ('review')"),
    ({1: {"second": None}}, "row 1: missing text pair ('second')"),
    ({2: {"stars": None}}, "row 2: missing label ('stars')"),
    ({0: {"shop": ""}}, "row 0: missing domain ('shop')"),
]


@pytest.mark.parametrize("change, match", BAD_ROWS)
def test_bad_rows_are_named(change, match):
    rows = [dict(r, **change.get(i, {})) for i, r in enumerate(ROWS)]
    with pytest.raises(DataError, match=re.escape(match)):
        encode_labels(
            datasets.Dataset.from_list(rows),
            COLUMNS,
            Vocab(["neg", "pos"], "label"),
            Vocab(["books", "kitchen"], "domain"),
        )


@pytest.mark.parametrize(
    "change, match", BAD_ROWS + [({1: {"stars": ["pos"]}}, "row 1: label ('stars') is a JSON list, not a value")]
)
def test_check_row_gives_the_same_reasons(change, match):
    """The streaming scorer's rejects and encode_labels' errors come from one check."""
    ((row, values),) = change.items()
    labels, domains = Vocab(["neg", "pos"], "label"), Vocab(["books", "kitchen"], "domain")
    with pytest.raises(Reject) as err:
        check_row(dict(ROWS[row], **values), COLUMNS, labels, domains)
    assert err.value.at(f"row {row}") == match or err.value.at(f"row {row}").startswith(match + ";")
    ok = check_row(dict(ROWS[0], id=7.0), dataclasses.replace(COLUMNS, id="id"), labels, domains)
    assert (ok.text, ok.text_pair, ok.label, ok.domain, ok.id) == ("good pan", "yes", 1, 1, "7")
    with pytest.raises(Reject, match=re.escape("missing id ('id')")):
        check_row(ROWS[0], dataclasses.replace(COLUMNS, id="id"), labels, domains)


def test_missing_column_is_named():
    with pytest.raises(ValueError, match="no column 'rating'"):
        encode_labels(datasets.Dataset.from_list(ROWS), Columns(text="review", label="rating", domain="shop"))


def test_tokenize_pairs_and_collate(tmp_path):
    from transformers import AutoTokenizer

    folder = tiny_bert(tmp_path / "bert", " ".join(r["review"] + " " + r["second"] for r in ROWS).split())
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    data = prepare(datasets.Dataset.from_list(ROWS), tok, COLUMNS, max_length=6)
    ds = data.dataset
    assert ds["length"] == [len(x) for x in ds["input_ids"]] and max(ds["length"]) == 6  # truncated
    assert ds[0]["input_ids"] == tok("good pan", "yes")["input_ids"]
    batch = Collator(tok.pad_token_id)([ds[0], ds[2]])
    assert batch["input_ids"].shape == (2, 6) and batch["attention_mask"].sum(1).tolist() == [ds[0]["length"], 6]
    assert batch["input_ids"][0, ds[0]["length"] :].eq(tok.pad_token_id).all()
    assert batch["labels"].tolist() == [1, 1] and batch["domains"].dtype == torch.long
    # rows without an attention mask (the streaming scorer's) get it from their lengths
    texts, pairs = [r["review"] for r in ROWS], [r["second"] for r in ROWS]
    enc = tokenize_texts(tok, texts, pairs, max_length=6, attention_mask=False)
    assert "attention_mask" not in enc and enc["input_ids"] == ds["input_ids"] and enc["length"] == ds["length"]
    bare = Collator(tok.pad_token_id)([{k: enc[k][i] for k in enc} for i in (0, 2)])
    assert {k: v.tolist() for k, v in bare.items()} == {k: v.tolist() for k, v in batch.items() if k in bare}


def test_length_bucket_sampler():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 200, (1000,), generator=g).tolist()
    sampler = LengthBucketSampler(lengths, 16, window_batches=8, seed=3)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert list(LengthBucketSampler(lengths, 16, window_batches=8, seed=3)) == batches
    sampler.set_epoch(1)
    assert list(sampler) != batches
    # Bucketing pays: padded tokens per batch are far below random batching's.
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    assert padded < 0.7 * sum(
        len(b) * max(lengths[i] for i in b) for b in torch.arange(1000).split(16) for b in [b.tolist()]
    )
    longest = list(LengthBucketSampler(lengths[:100], 16, window_batches=7, shuffle=False, longest_first=True))
    assert [i for b in longest for i in b] == sorted(range(100), key=lambda i: (-lengths[i], i))
    ranks = [list(LengthBucketSampler(lengths, 16, seed=3, num_replicas=3, rank=r)) for r in range(3)]
    assert len({len(r) for r in ranks}) == 1
    assert set(i for r in ranks for b in r for i in b) == set(range(1000))


def test_synthetic_corpus_is_deterministic_and_balanced():
    rows = synthetic_corpus(40, domains=3, seed=7)
    assert rows == synthetic_corpus(40, domains=3, seed=7)
    assert rows != synthetic_corpus(40, domains=3, seed=8)
    assert len(rows) == 120 and len({r["id"] for r in rows}) == 120
    for d in ("books", "electronics", "kitchen"):
        for label in ("negative", "positive"):
            cell = [r for r in rows if r["domain"] == d and r["label"] == label]
            assert len(cell) == 20 and sum(r["atypical"] for r in cell) == round(20 * 0.125)
            assert {r["split"] for r in cell} == {"train", "dev", "test"}
    with pytest.raises(ValueError, match="domains must be in"):
        synthetic_corpus(10, domains=9)

"""Data: loading, split by document, tokenization and packing with document boundaries."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import ByT5Tokenizer

from vkt_hf import data

BOOKS = Path(__file__).parent / "fixtures" / "books"


def synthetic_docs(lengths: list[int]) -> list[list[int]]:
    """Document ``d`` holds only ids ``1000 * (d + 1) + k``, so every token names its document."""
    return [[1000 * (d + 1) + k for k in range(n)] for d, n in enumerate(lengths)]


def doc_of(token: int) -> int:
    return token // 1000 - 1


def test_byte_tokenizer_matches_byt5_and_round_trips():
    tok = data.get_tokenizer("byte")
    assert isinstance(tok, ByT5Tokenizer) and len(tok) == 259 and data.is_byte_tokenizer(tok)
    text = "Café — “quoted” naïve\nline"
    ids = data.encode(tok, text)
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert data.encode(tok, text, add_eos=True)[-1] == tok.eos_token_id


def test_load_documents_folder_file_glob():
    docs = data.load_documents(str(BOOKS))
    assert sorted(docs["name"]) == ["emma", "genesis", "hamlet", "pride_and_prejudice", "sonnets"]
    assert all(len(t) > 1000 for t in docs["text"])
    one = data.load_documents(str(BOOKS / "emma.txt"), max_chars=100)
    assert list(one["name"]) == ["emma"] and len(one["text"][0]) == 100
    assert list(data.load_documents(str(BOOKS / "[gs]*.txt"))["name"]) == ["genesis", "sonnets"]


def test_load_documents_manifest(tmp_path):
    (tmp_path / "a.txt").write_text("first book")
    (tmp_path / "b.txt").write_text("second book")
    (tmp_path / "manifest.json").write_text(
        '[{"name": "book_b", "path": "b.txt"}, {"name": "book_a", "path": "a.txt"}]'
    )
    docs = data.load_documents(str(tmp_path))
    assert list(docs["name"]) == ["book_b", "book_a"] and list(docs["text"]) == ["second book", "first book"]


def test_load_documents_hub_code_path(monkeypatch):
    calls = {}

    def fake_load_dataset(name, subset, split, streaming):
        calls.update(name=name, subset=subset, split=split, streaming=streaming)
        return Dataset.from_dict({"text": ["a long book", "another"], "short_book_title": ["A", "B"]})

    monkeypatch.setattr(data, "load_dataset", fake_load_dataset)
    docs = data.load_documents("emozilla/pg19", split="validation", name_column="short_book_title", max_documents=1)
    assert calls == {"name": "emozilla/pg19", "subset": None, "split": "validation", "streaming": False}
    assert list(docs["name"]) == ["A"] and list(docs["text"]) == ["a long book"]


def test_split_by_document():
    docs = data.load_documents(str(BOOKS))
    train, val = data.split_documents(docs, val_fraction=0.4, seed=1)
    assert set(train["name"]).isdisjoint(val["name"])
    assert sorted([*train["name"], *val["name"]]) == sorted(docs["name"]) and len(val) == 2
    assert list(data.split_documents(docs, val_fraction=0.4, seed=1)[1]["name"]) == list(val["name"])  # seeded
    train, val = data.split_documents(docs, val_documents=["hamlet"])
    assert list(val["name"]) == ["hamlet"] and "hamlet" not in train["name"]
    with pytest.raises(ValueError, match="not found"):
        data.split_documents(docs, val_documents=["ulysses"])


@pytest.mark.parametrize("seq_len", [4, 16, 50])
def test_packing_never_crosses_documents(seq_len):
    docs = synthetic_docs([37, 5, 64, 1, 100])
    packed = data.pack_documents(docs, seq_len, doc_boundaries=True, pad_token_id=0)
    ids, mask, labels = packed["input_ids"], packed["attention_mask"], packed["labels"]
    assert ids.shape[1] == seq_len
    for row, m, d in zip(ids, mask, packed["doc_index"]):
        real = row[m.bool()].tolist()
        assert {doc_of(t) for t in real} == {int(d)}  # one document per sequence
        assert m.tolist() == sorted(m.tolist(), reverse=True)  # right padding only
    assert (labels[mask == 0] == data.IGNORE_INDEX).all() and (labels[mask == 1] == ids[mask == 1]).all()
    # nothing is lost but 1-token remainders: each document is its rows, in order
    for d, doc in enumerate(docs):
        rows = [r[m.bool()].tolist() for r, m, i in zip(ids, mask, packed["doc_index"]) if i == d]
        got = sum(rows, [])
        assert got == (doc if len(doc) % seq_len != 1 else doc[:-1])


def test_packing_drop_remainder_and_without_boundaries():
    docs = synthetic_docs([37, 5, 64])
    dropped = data.pack_documents(docs, 16, remainder="drop")
    assert bool(dropped["attention_mask"].all()) and len(dropped["input_ids"]) == 2 + 0 + 4
    mixed = data.pack_documents(docs, 16, doc_boundaries=False)
    stream = torch.tensor(sum(docs, []))
    assert torch.equal(mixed["input_ids"].flatten(), stream[: len(mixed["input_ids"]) * 16])
    crossing = [int(d) for d in mixed["doc_index"]]
    assert -1 in crossing  # documents leak into each other's context without boundaries
    for row, d in zip(mixed["input_ids"], crossing):
        assert (len({doc_of(t) for t in row.tolist()}) > 1) == (d == -1)


def test_prepare_data_end_to_end():
    out = data.prepare_data(str(BOOKS), "byte", 128, val_documents=["sonnets"])
    assert list(out["val_docs"]["name"]) == ["sonnets"]
    val_text = out["val_docs"]["text"][0].encode()
    assert len(out["val"]) == -(-len(out["val_tokens"][0]) // 128)
    item = out["train"][0]
    assert set(item) == {"input_ids", "labels", "attention_mask"} and item["input_ids"].shape == (128,)
    # the validation book's bytes never appear in a training row
    probe = torch.tensor(list(val_text[200:264])) + data.BYTE_OFFSET
    rows = out["train"].packed["input_ids"]
    windows = rows.unfold(1, len(probe), 1)
    assert not (windows == probe).all(-1).any()
    assert 0.99 < out["bytes_per_token"] <= 1.0
    assert data.bits_per_byte(torch.log(torch.tensor(2.0)).item(), 1.0) == pytest.approx(1.0)

"""Streaming a corpus too large to load (PG-19 from the Hub): a local dataset read in ``datasets`` streaming
mode, packed on the fly exactly as the in-memory path packs it, split across processes, and resumed at the
row where a run stopped."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from datasets import Dataset, load_dataset

from vkt_hf import data, training

ROOT = Path(__file__).resolve().parent.parent
BOOKS = ROOT / "tests" / "fixtures" / "books"
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A local dataset folder (two parquet shards of 3,000-character documents cut from the fixture books),
    the layout of a Hub dataset such as PG-19."""
    root = tmp_path_factory.mktemp("corpus")
    texts = [path.read_text()[i : i + 3000] for path in sorted(BOOKS.glob("*.txt")) for i in range(0, 12000, 3000)]
    texts = [t for t in texts if len(t) > 500]
    (root / "data").mkdir()
    half = len(texts) // 2
    for shard, part in enumerate((texts[:half], texts[half:])):
        Dataset.from_dict({"text": part}).to_parquet(str(root / "data" / f"train-{shard:05d}-of-00002.parquet"))
    return root


def rows(dataset, count: int) -> list[torch.Tensor]:
    return [row["input_ids"] for row in itertools.islice(iter(dataset), count)]


def one_epoch(dataset) -> set[tuple[int, ...]]:
    """The rows of the stream's first pass."""
    seen = set()
    for row in dataset:
        if dataset.state_dict()["epoch"] > 0:
            return seen
        seen.add(tuple(row["input_ids"].tolist()))
    return seen


def test_streamed_rows_are_the_in_memory_packing(corpus):
    streamed = data.prepare_streaming_data(str(corpus), "byte", 64, val_count=3)
    docs = load_dataset(str(corpus), split="train")  # the same documents, loaded whole
    tok = data.get_tokenizer("byte")
    expected = data.pack_documents(data.tokenize_documents(docs.select(range(3, len(docs))), tok), 64)
    got = rows(streamed["train"], len(expected["input_ids"]))
    assert torch.equal(torch.stack(got), expected["input_ids"])
    assert list(streamed["val_docs"]["text"]) == docs["text"][:3]  # held out: the stream's first documents
    assert len(streamed["val"]) > 0 and streamed["bytes_per_token"] == pytest.approx(1.0, rel=0.01)


def test_stream_resumes_at_the_row_where_it_stopped(corpus):
    whole = rows(data.prepare_streaming_data(str(corpus), "byte", 64, val_count=3)["train"], 400)  # > 1 epoch
    for cut in (1, 57, 300):
        first = data.prepare_streaming_data(str(corpus), "byte", 64, val_count=3)["train"]
        head = rows(first, cut)
        state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
        second = data.prepare_streaming_data(str(corpus), "byte", 64, val_count=3)["train"]
        second.load_state_dict(state)
        assert all(torch.equal(a, b) for a, b in zip(whole, head + rows(second, 400 - cut)))


def test_processes_read_disjoint_parts_of_the_stream(corpus):
    def stream(**kwargs):
        return data.prepare_streaming_data(str(corpus), "byte", 64, val_count=3, **kwargs)["train"]

    everything = one_epoch(stream())
    parts = [one_epoch(stream(rank=r, world_size=2)) for r in (0, 1)]
    assert parts[0] and parts[1] and not parts[0] & parts[1]
    assert parts[0] | parts[1] == everything


def test_streamed_training_resumed_after_a_kill_matches_an_uninterrupted_run(corpus, tmp_path):
    def argv(out: Path, **extra) -> list[str]:
        args = dict(data=str(corpus), streaming="true", val_count=2, seq_len=64, batch_size=2, lr=3e-3)
        args.update(warmup_steps=2, eval_every=0, log_every=1, save_every=2, progress="false", num_threads=1)
        args.update(model_config=json.dumps(TINY), output_dir=str(out), **extra)
        return [item for k, v in args.items() for item in (f"--{k}", str(v))]

    def losses(out: Path) -> list[float]:
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [row["loss"] for row in metrics if "loss" in row]

    full, killed = tmp_path / "full", tmp_path / "killed"
    training.train(training.load_config(argv(full, max_steps=7)))
    assert training.train(training.load_config(argv(killed, max_steps=7, stop_after_steps=5)))["stopped"] == "killed"
    assert (killed / "checkpoints" / "step_000004" / "data_state_0.json").exists()
    run = training.train(training.load_config(argv(killed, max_steps=7)))  # resumes from step 4
    assert losses(killed) == pytest.approx(losses(full), rel=1e-6) and len(losses(full)) == 7
    assert run["data"]["train_documents"] == "streamed"


def test_pg19_recipe_streams():
    cfg = training.load_config(["--config", str(ROOT / "recipes" / "configs" / "pretrain_pg19.yaml")])
    assert cfg.streaming and cfg.data == "emozilla/pg19" and cfg.val_split == "validation"

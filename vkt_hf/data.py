"""Text data for training and evaluation: load documents, tokenize, split by document, pack.

A *document* is one book / one file / one row of a Hub dataset. Everything here keeps
documents apart until the last step:

* :func:`load_documents` gives a ``datasets.Dataset`` with columns ``name`` and ``text``,
  from a Hub dataset name (e.g. ``"emozilla/pg19"``), a ``.txt`` file, a folder of ``.txt``
  files (a ``manifest.json`` as written by ``scripts/fetch_corpus.py`` is used when present)
  or a glob.
* :func:`split_documents` splits train/validation **by document**, so no validation text is
  ever seen in training.
* :func:`pack_documents` cuts the tokenized documents into fixed-length sequences (any
  length: 256 ... 64k tokens). With ``doc_boundaries=True`` (the default) no sequence
  crosses a document boundary: each document is cut on its own and its last, shorter piece
  is right-padded (``attention_mask`` 0, ``labels`` -100) or dropped. With
  ``doc_boundaries=False`` documents are concatenated with an EOS between them and cut
  without regard to boundaries (classic GPT packing, no padding, context leaks across
  documents).

For corpora too large to load (PG-19: 11 GB), :func:`prepare_streaming_data` streams the training
split (``datasets`` streaming) and packs it on the fly (:class:`StreamingPackedDataset`), resumable at
the row where a run stopped.

``get_tokenizer("byte")`` is a byte-level tokenizer (transformers' ``ByT5Tokenizer`` without
extra ids: 256 bytes + pad/eos/unk = 259 ids, no download), handy for tiny fast models;
any other value is a tokenizer directory or Hub name for ``AutoTokenizer``.
"""

from __future__ import annotations

import copy
import glob
import hashlib
import json
import math
import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import Dataset, IterableDataset, load_dataset
from datasets.distributed import split_dataset_by_node
from transformers import AutoTokenizer, ByT5Tokenizer, PreTrainedTokenizerBase

BYTE_TOKENIZER = "byte"
BYTE_OFFSET = 3  # ByT5 ids: 0 pad, 1 eos, 2 unk, then byte b -> b + 3
IGNORE_INDEX = -100


# --- tokenizers -------------------------------------------------------------------------


def get_tokenizer(spec: str | PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """``"byte"`` -> a 259-id byte tokenizer; else ``AutoTokenizer.from_pretrained(spec)``.

    A tokenizer without a pad token gets its EOS as pad (GPT-2 style), so batches can be padded.
    """
    if isinstance(spec, PreTrainedTokenizerBase):
        tokenizer = spec
    elif spec == BYTE_TOKENIZER:
        tokenizer = ByT5Tokenizer(extra_ids=0)
    else:
        tokenizer = AutoTokenizer.from_pretrained(spec)
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def is_byte_tokenizer(tokenizer: PreTrainedTokenizerBase) -> bool:
    return isinstance(tokenizer, ByT5Tokenizer) and len(tokenizer) == 256 + BYTE_OFFSET


def encode(tokenizer: PreTrainedTokenizerBase, text: str, add_eos: bool = False) -> list[int]:
    """Token ids of ``text`` without special tokens (plus EOS at the end if ``add_eos``).

    The byte tokenizer is encoded directly from the UTF-8 bytes (same ids as the
    tokenizer, ~100x faster on books).
    """
    if is_byte_tokenizer(tokenizer):
        ids = (np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64) + BYTE_OFFSET).tolist()
    else:
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    if add_eos and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids


# --- documents ----------------------------------------------------------------------------


def _local_files(source: str) -> list[tuple[str, Path]] | None:
    """``(name, path)`` of the local text files ``source`` names, or ``None`` if it is not local."""
    path = Path(source).expanduser()
    if path.is_file():
        return [(path.stem, path)]
    if path.is_dir():
        manifest = path / "manifest.json"
        if manifest.exists():
            entries = json.loads(manifest.read_text(encoding="utf-8"))
            return [(e["name"], path / e["path"]) for e in entries]
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".md") and p.is_file())
        return [(str(p.relative_to(path).with_suffix("")), p) for p in files]
    matches = sorted(glob.glob(os.path.expanduser(source)))
    if matches:
        return [(Path(m).stem, Path(m)) for m in matches if Path(m).is_file()]
    return None


def load_documents(
    source: str,
    *,
    split: str = "train",
    text_column: str = "text",
    name_column: str | None = None,
    subset: str | None = None,
    max_documents: int | None = None,
    max_chars: int | None = None,
    streaming: bool = False,
) -> Dataset:
    """Load documents as a ``Dataset`` with columns ``name`` and ``text``.

    Args:
        source: a local ``.txt`` file, a folder (its ``manifest.json`` or every ``*.txt``
            under it, one file = one document), a glob, or a Hub dataset name (``split``,
            ``subset`` and ``text_column`` apply; ``streaming=True`` reads only the first
            ``max_documents`` rows, e.g. of PG-19, without downloading it all).
        name_column: the Hub column that names a document (default: its row index).
        max_documents: keep the first this many documents.
        max_chars: truncate each document to this many characters.
    """
    files = _local_files(source)
    names: list[str]
    texts: list[str]
    if files is not None:
        files = files[:max_documents] if max_documents else files
        names = [name for name, _ in files]
        texts = [p.read_text(encoding="utf-8", errors="replace") for _, p in files]
    else:  # a Hub dataset (needs network or the local datasets cache)
        data = load_dataset(source, subset, split=split, streaming=streaming)
        rows = data.take(max_documents) if streaming and max_documents else data
        if not streaming and max_documents:
            rows = data.select(range(min(max_documents, len(data))))
        names, texts = [], []
        for i, row in enumerate(rows):
            names.append(str(row[name_column]) if name_column else f"{source}:{split}:{i}")
            texts.append(row[text_column])
    if max_chars:
        texts = [t[:max_chars] for t in texts]
    return Dataset.from_dict({"name": names, "text": texts})


def split_documents(
    docs: Dataset,
    *,
    val_documents: Sequence[str] | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> tuple[Dataset, Dataset]:
    """Split by document into ``(train, validation)``.

    ``val_documents`` names the validation documents explicitly; otherwise a seeded random
    ``val_fraction`` of the documents (at least one, and at least one left for training).
    """
    n = len(docs)
    if val_documents:
        wanted = set(val_documents)
        missing = wanted - set(docs["name"])
        if missing:
            raise ValueError(f"validation documents not found: {sorted(missing)}")
        val_idx = [i for i, name in enumerate(docs["name"]) if name in wanted]
    else:
        if n < 2:
            raise ValueError("need at least two documents to split by document")
        k = min(n - 1, max(1, round(n * val_fraction)))
        val_idx = sorted(random.Random(seed).sample(range(n), k))
    val_set = set(val_idx)
    train_idx = [i for i in range(n) if i not in val_set]
    return docs.select(train_idx), docs.select(val_idx)


def tokenize_documents(docs: Dataset, tokenizer: PreTrainedTokenizerBase, add_eos: bool = True) -> list[list[int]]:
    """Token ids of each document (EOS-terminated when ``add_eos``)."""
    return [encode(tokenizer, text, add_eos=add_eos) for text in docs["text"]]


# --- packing --------------------------------------------------------------------------------


def pack_documents(
    token_docs: Sequence[Sequence[int]],
    seq_len: int,
    *,
    doc_boundaries: bool = True,
    pad_token_id: int = 0,
    remainder: str = "pad",
    min_remainder: int = 2,
) -> dict[str, torch.Tensor]:
    """Cut token documents into ``seq_len``-token sequences.

    Args:
        token_docs: token ids per document.
        seq_len: tokens per sequence.
        doc_boundaries: ``True`` -> no sequence holds tokens of two documents; ``False`` ->
            documents are concatenated (they should end with EOS) and cut straight through.
        remainder: with ``doc_boundaries``, what happens to a document's last ``< seq_len``
            tokens: ``"pad"`` (right-padded, masked) or ``"drop"``. Without boundaries the
            tail of the stream is always dropped.
        min_remainder: remainders shorter than this are dropped (a 1-token piece has no target).

    Returns:
        ``input_ids``, ``labels`` (``-100`` on padding) and ``attention_mask`` (1 real, 0 pad),
        each ``(num_sequences, seq_len)`` int64, and ``doc_index`` ``(num_sequences,)``: the
        document each sequence comes from (-1 for mixed sequences when boundaries are off).
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    if remainder not in ("pad", "drop"):
        raise ValueError(f"remainder must be 'pad' or 'drop', got {remainder!r}")
    rows: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    doc_index: list[int] = []
    if doc_boundaries:
        for d, tokens in enumerate(token_docs):
            arr = np.asarray(tokens, dtype=np.int64)
            full = len(arr) // seq_len
            if full:
                rows.extend(arr[: full * seq_len].reshape(full, seq_len))
                masks.extend(np.ones((full, seq_len), dtype=np.int64))
                doc_index.extend([d] * full)
            tail = arr[full * seq_len :]
            if remainder == "pad" and len(tail) >= min_remainder:
                row = np.full(seq_len, pad_token_id, dtype=np.int64)
                row[: len(tail)] = tail
                mask = np.zeros(seq_len, dtype=np.int64)
                mask[: len(tail)] = 1
                rows.append(row)
                masks.append(mask)
                doc_index.append(d)
    else:
        stream = np.concatenate([np.asarray(t, dtype=np.int64) for t in token_docs]) if token_docs else np.zeros(0)
        full = len(stream) // seq_len
        rows.extend(stream[: full * seq_len].reshape(full, seq_len))
        masks.extend(np.ones((full, seq_len), dtype=np.int64))
        bounds = np.cumsum([len(t) for t in token_docs])
        for i in range(full):  # the document of a sequence, or -1 if it spans two
            first, last = np.searchsorted(bounds, [i * seq_len, (i + 1) * seq_len - 1], side="right")
            doc_index.append(int(first) if first == last else -1)
    input_ids = torch.from_numpy(np.stack(rows)) if rows else torch.zeros(0, seq_len, dtype=torch.long)
    attention_mask = torch.from_numpy(np.stack(masks)) if masks else torch.zeros(0, seq_len, dtype=torch.long)
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "doc_index": torch.tensor(doc_index, dtype=torch.long),
    }


class PackedDataset(torch.utils.data.Dataset):
    """Rows of :func:`pack_documents` as ``dict`` items for a ``DataLoader``."""

    def __init__(self, packed: dict[str, torch.Tensor]):
        self.packed = packed

    def __len__(self) -> int:
        return len(self.packed["input_ids"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: self.packed[k][i] for k in ("input_ids", "labels", "attention_mask")}


def bytes_per_token(docs: Dataset, token_docs: Sequence[Sequence[int]]) -> float:
    """UTF-8 bytes per token over the documents (for bits-per-byte from a per-token loss)."""
    n_bytes = sum(len(t.encode("utf-8")) for t in docs["text"])
    n_tokens = sum(len(t) for t in token_docs)
    return n_bytes / max(1, n_tokens)


def bits_per_byte(nll_per_token: float, bytes_per_tok: float) -> float:
    """Bits per UTF-8 byte from the mean NLL (nats) per token."""
    return nll_per_token / math.log(2) / bytes_per_tok


def prepare_data(
    source: str,
    tokenizer: str | PreTrainedTokenizerBase,
    seq_len: int,
    *,
    doc_boundaries: bool = True,
    val_documents: Sequence[str] | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    remainder: str = "pad",
    **load_kwargs: Any,
) -> dict[str, Any]:
    """Load, split by document, tokenize and pack: everything a training run needs.

    Returns a dict with ``tokenizer``, ``train_docs`` / ``val_docs`` (``Dataset``),
    ``train_tokens`` / ``val_tokens`` (ids per document), ``train`` / ``val``
    (:class:`PackedDataset`) and ``bytes_per_token`` (of the validation documents).
    """
    tok = get_tokenizer(tokenizer)
    docs = load_documents(source, **load_kwargs)
    train_docs, val_docs = split_documents(docs, val_documents=val_documents, val_fraction=val_fraction, seed=seed)
    train_tokens = tokenize_documents(train_docs, tok)
    val_tokens = tokenize_documents(val_docs, tok)
    pack = dict(doc_boundaries=doc_boundaries, pad_token_id=tok.pad_token_id or 0, remainder=remainder)
    return {
        "tokenizer": tok,
        "train_docs": train_docs,
        "val_docs": val_docs,
        "train_tokens": train_tokens,
        "val_tokens": val_tokens,
        "train": PackedDataset(pack_documents(train_tokens, seq_len, **pack)),
        "val": PackedDataset(pack_documents(val_tokens, seq_len, **pack)),
        "bytes_per_token": bytes_per_token(val_docs, val_tokens),
    }


# --- streaming: Hub-scale corpora, packed on the fly -------------------------------------------


def stream_documents(source: str, *, split: str = "train", subset: str | None = None) -> IterableDataset:
    """A dataset (Hub name or local dataset folder) read as a stream: rows arrive as training needs them.

    ``datasets`` streaming reads the files shard by shard; nothing is downloaded ahead (PG-19's
    11 GB train split starts at step 1 after one shard, not after the whole split).
    """
    return load_dataset(source, subset, split=split, streaming=True)


class StreamingPackedDataset(torch.utils.data.IterableDataset):
    """Training sequences packed on the fly from a stream of documents, resumable where it stopped.

    Each document is tokenized as it arrives and cut into ``seq_len``-token rows exactly as
    :func:`pack_documents` cuts one document with ``doc_boundaries=True`` (its last piece right-padded or
    dropped); rows are yielded in stream order, and the stream starts over (``set_epoch``) when it ends.

    :meth:`state_dict` is the position after the last row yielded: the epoch, the stream's own state
    (``datasets.IterableDataset.state_dict``) before the current document, and how many of that document's
    rows were yielded. :meth:`load_state_dict` resumes there: the stream skips to that document (by shard
    and offset, without reading what came before) and the rows already trained on are skipped.
    """

    def __init__(
        self,
        documents: IterableDataset,
        tokenizer: PreTrainedTokenizerBase,
        seq_len: int,
        *,
        text_column: str = "text",
        remainder: str = "pad",
    ):
        self.documents, self.tokenizer, self.seq_len = documents, tokenizer, seq_len
        self.text_column, self.remainder = text_column, remainder
        self._state: dict[str, Any] = {"epoch": 0, "documents": None, "rows": 0}

    def state_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self._state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._state = copy.deepcopy(state)

    def _rows(self, text: str) -> list[dict[str, torch.Tensor]]:
        tokens = encode(self.tokenizer, text, add_eos=True)
        pad = self.tokenizer.pad_token_id or 0
        packed = pack_documents([tokens], self.seq_len, pad_token_id=pad, remainder=self.remainder)
        return [
            {k: packed[k][i] for k in ("input_ids", "labels", "attention_mask")}
            for i in range(len(packed["doc_index"]))
        ]

    def __iter__(self):
        while True:  # epochs
            epoch, resume, skip = self._state["epoch"], self._state["documents"], self._state["rows"]
            self.documents.set_epoch(epoch)
            if resume is not None:
                self.documents.load_state_dict(resume)
            stream = iter(self.documents)
            while True:
                before = copy.deepcopy(self.documents.state_dict())
                document = next(stream, None)
                if document is None:
                    break
                for k, row in enumerate(self._rows(document[self.text_column])):
                    if k < skip:
                        continue
                    self._state = {"epoch": epoch, "documents": before, "rows": k + 1}
                    yield row
                skip = 0
            self._state = {"epoch": epoch + 1, "documents": None, "rows": 0}


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def prepare_streaming_data(
    source: str,
    tokenizer: str | PreTrainedTokenizerBase,
    seq_len: int,
    *,
    split: str = "train",
    subset: str | None = None,
    text_column: str = "text",
    val_split: str | None = None,
    val_count: int = 8,
    max_documents: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    remainder: str = "pad",
) -> dict[str, Any]:
    """:func:`prepare_data` for a corpus too large to load: the training split streams, packed on the fly.

    Validation is ``val_count`` documents, held in memory and packed as :func:`prepare_data` packs them:
    the first documents of ``val_split`` (PG-19 has a ``validation`` split), or of ``split``, whose stream
    then leaves them out (by content, so also when processes split it by shard). With several processes each reads its own part of the stream
    (``datasets.distributed.split_dataset_by_node``: whole shards when they divide evenly).

    Returns the keys of :func:`prepare_data`, with ``train`` a :class:`StreamingPackedDataset` and
    ``train_docs`` / ``train_tokens`` ``None`` (the stream is read once, as training goes).
    """
    tok = get_tokenizer(tokenizer)
    stream = stream_documents(source, split=split, subset=subset)
    held_out = stream_documents(source, split=val_split, subset=subset) if val_split else stream
    rows = list(held_out.take(val_count))
    val_docs = Dataset.from_dict(
        {
            "name": [f"{source}:{val_split or split}:{i}" for i in range(len(rows))],
            "text": [r[text_column] for r in rows],
        }
    )
    train = stream
    if not val_split:  # the held-out documents leave the training stream wherever its shards go
        held = {_digest(text) for text in val_docs["text"]}
        train = stream.filter(lambda row: _digest(row[text_column]) not in held)
    if max_documents:
        train = train.take(max_documents)
    if world_size > 1:
        train = split_dataset_by_node(train, rank=rank, world_size=world_size)
    val_tokens = tokenize_documents(val_docs, tok)
    pack = dict(doc_boundaries=True, pad_token_id=tok.pad_token_id or 0, remainder=remainder)
    return {
        "tokenizer": tok,
        "train_docs": None,
        "val_docs": val_docs,
        "train_tokens": None,
        "val_tokens": val_tokens,
        "train": StreamingPackedDataset(train, tok, seq_len, text_column=text_column, remainder=remainder),
        "val": PackedDataset(pack_documents(val_tokens, seq_len, **pack)),
        "bytes_per_token": bytes_per_token(val_docs, val_tokens),
    }

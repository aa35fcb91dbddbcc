"""Packed (padding-free) batches: sequences laid end to end in one row never mix, in native and converted models.

transformers' ``DataCollatorWithFlattening`` packs examples into one row; the boundaries reach the model as
``position_ids`` that restart at 0 (and, for flash attention, as ``cu_seq_lens_q``). Every VKT layer restarts
its state at each sequence start, and softmax layers get transformers' packed-sequence mask, so each packed
sequence gives the logits it gives alone, and training on packed examples equals training on a padded batch.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DataCollatorWithFlattening, Trainer, TrainingArguments

from tests.test_causal_lm import CASES, random_ids
from vkt_hf.layers import vkt_layers


@pytest.fixture(params=list(CASES))
def case(request):
    return CASES[request.param]


def examples(case, lengths=(6, 3, 5), seed=30) -> list[torch.Tensor]:
    return [random_ids(case, 1, n, seed=seed + i)[0] for i, n in enumerate(lengths)]


def test_packed_sequences_give_the_logits_each_gives_alone(case):
    model = case.build()
    parts = examples(case)
    packed = DataCollatorWithFlattening(return_tensors="pt")([{"input_ids": p.tolist()} for p in parts])
    with torch.no_grad():
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits[0]
        start = 0
        for part in parts:
            alone = model(part[None], use_cache=False).logits[0]
            torch.testing.assert_close(logits[start : start + len(part)], alone, atol=1e-5, rtol=0)
            start += len(part)


def test_vkt_layers_also_read_the_boundaries_from_cu_seq_lens(case):
    model = case.build()
    layer = vkt_layers(model)[0]
    parts = [torch.randn(1, n, layer.config.hidden_size, generator=torch.Generator().manual_seed(n)) for n in (5, 4)]
    with torch.no_grad():
        packed, _ = layer(torch.cat(parts, 1), cu_seq_lens_q=torch.tensor([0, 5, 9], dtype=torch.int32))
        alone = torch.cat([layer(p)[0] for p in parts], 1)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=0)


def padded_batch(parts: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same examples right-padded into a (rows, longest) batch, padding masked out of the loss.

    Each row's first label is -100 as in ``DataCollatorWithFlattening``: no token predicts it either way, and
    the Trainer of some transformers releases counts unshifted labels to normalise the loss.
    """
    longest = max(len(p) for p in parts)
    batch = {k: torch.zeros(len(parts), longest, dtype=torch.long) for k in ("input_ids", "attention_mask")}
    batch["labels"] = torch.full((len(parts), longest), -100)
    for r, part in enumerate(parts):
        batch["input_ids"][r, : len(part)] = part
        batch["attention_mask"][r, : len(part)] = 1
        batch["labels"][r, 1 : len(part)] = part[1:]  # as the flattening collator: no label where nothing predicts
    return batch


class PaddingCollator:
    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        return padded_batch([torch.tensor(f["input_ids"]) for f in features])


def trained(case, collator, tmp_path) -> tuple[list[float], torch.nn.Module]:
    model = case.build().train()
    for module in model.modules():  # GPT-2's dropout would draw different masks for different batch shapes
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    data = [{"input_ids": p.tolist()} for p in examples(case, lengths=(7, 4, 6, 5))]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=3,
        learning_rate=0.1,
        optim="sgd",  # Adam's per-element normalisation would magnify float noise in near-zero gradients
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        remove_unused_columns=False,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collator)
    trainer.train()
    return [row["loss"] for row in trainer.state.log_history if "loss" in row], model


def test_trainer_on_flattened_examples_trains_as_on_the_padded_batch(case, tmp_path):
    model = case.build()
    parts = examples(case, lengths=(7, 4, 6, 5))
    flattened = DataCollatorWithFlattening(return_tensors="pt", return_flash_attn_kwargs=True)(
        [{"input_ids": p.tolist()} for p in parts]
    )
    with torch.no_grad():  # the loss of one forward: the same tokens predicted from the same contexts
        torch.testing.assert_close(model(**flattened).loss, model(**padded_batch(parts)).loss, atol=1e-5, rtol=1e-5)
    packed_losses, packed_model = trained(case, DataCollatorWithFlattening(), tmp_path / "packed")
    padded_losses, padded_model = trained(case, PaddingCollator(), tmp_path / "padded")
    assert len(packed_losses) == 3 and packed_losses == pytest.approx(padded_losses, rel=1e-4)
    for a, b in zip(packed_model.parameters(), padded_model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)

"""``scripts/passkey.py``: its prompts put the key beyond the window, and its scoring reads the right logits."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from vkt_hf import data

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import passkey  # noqa: E402


class NextTokenOracle(torch.nn.Module):
    """Logits that put all mass on the token that really follows (what perfect retrieval predicts)."""

    def __init__(self, vocab: int, shift: int = 1):
        super().__init__()
        self.vocab, self.shift = vocab, shift
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the module a device

    def forward(self, input_ids):
        following = torch.roll(input_ids, -self.shift, dims=1)
        return type("Out", (), {"logits": torch.nn.functional.one_hot(following, self.vocab).float()})()


def test_prompts_hide_the_key_far_before_the_question():
    tok = data.get_tokenizer("byte")
    for length in (256, 1024):
        prompts = passkey.passkey_prompts(tok, length, trials=5)
        assert prompts == passkey.passkey_prompts(tok, length, trials=5)  # seeded: every model sees the same
        for ids, key in prompts:
            text = tok.decode(ids)
            digits = tok.decode(key).strip()
            assert len(digits) == 5 and text.count(digits) == 2
            assert abs(len(ids) - length) <= len(passkey.FILLER) + 8
            assert len(text) - text.rindex(digits) >= 0.35 * len(text)  # far beyond a 64-token window


def test_scoring_reads_the_logits_that_predict_the_key():
    tok = data.get_tokenizer("byte")
    vocab = max(tok.get_vocab().values()) + 1
    assert passkey.passkey_accuracy(NextTokenOracle(vocab), tok, [256], trials=3) == {256: 1.0}
    assert passkey.passkey_accuracy(NextTokenOracle(vocab, shift=2), tok, [256], trials=3) == {256: 0.0}

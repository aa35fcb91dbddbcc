"""Reliability: bad inputs get a clear error, nothing non-finite leaks, the numerics hold at the edges.

One section per item of the reliability issue (numbers in the test names): padding is selected
out, never multiplied by 0 (1); a non-finite or overflowing token never reaches the past and
finite inputs give finite means (2); the decimal point near a power of ten (3); chunked = whole in
bfloat16 (4); float64 accumulation (5); edge-case inputs (6); then the recipes and the CLI as a
new user meets them (7-12). The randomised versions of these properties are ``tests/test_fuzz.py``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.helpers import NATIVE_HIDDEN, NATIVE_VOCAB, TINY_VARIANTS, op_inputs, tiny_base, tiny_config, tiny_model
from tests.test_recipes import BOOKS, tiny_args
from vkt_hf import cli, convert_to_vkt, training
from vkt_hf.cache import VKTCache, vkt_state_layer
from vkt_hf.config_loading import run_recipe, write_text_atomic
from vkt_hf.data import get_tokenizer
from vkt_hf.explain import importance_map
from vkt_hf.layers.vkt_attention import Projections, VKTAttention, mix
from vkt_hf.ops import functional as vkt
from vkt_hf.ops import fused, naive

BACKENDS = {"reference": vkt, "fused": fused, "naive": naive}
ROOT = Path(__file__).resolve().parents[1]
train_recipe = SimpleNamespace(**runpy.run_path(str(ROOT / "recipes" / "train.py")))  # the recipes, in-process
eval_recipe = SimpleNamespace(**runpy.run_path(str(ROOT / "recipes" / "eval.py")))


def both_contexts(impl, stream, weights, mask, null, log_decay, window=3, causal=True, state=(None, None)):
    """``K``, its state, ``T`` and its state of one backend."""
    k, k_state = impl.global_context(stream, weights, mask, null, log_decay, causal, state[0])
    t, t_state = impl.local_context(stream, mask, null, window, causal, state[1])
    return k, k_state, t, t_state


# --------------------------------------------------------------------------- 1. padding is not context


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("decay", [False, True], ids=["nodecay", "decay"])
@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf"), 1e30])
def test_1_non_finite_padding_does_not_leak_into_the_contexts(backend, decay, poison):
    stream, weights, mask, null, log_decay, _, _ = op_inputs(2, 2, 12, 3, decay, True, 3, dtype=torch.float64)
    clean = both_contexts(BACKENDS[backend], stream, weights, mask, null, log_decay)
    dirty_stream, dirty_weights = stream.clone(), weights.clone()
    padded = mask == 0  # (B, N)
    dirty_stream[padded[:, None].expand(-1, 2, -1)] = poison
    dirty_weights[padded[:, None].expand(-1, 2, -1)] = poison if poison == poison else 1.0
    dirty = both_contexts(BACKENDS[backend], dirty_stream, dirty_weights, mask, null, log_decay)
    real = ~padded
    for name, c, d in [("K", clean[0], dirty[0]), ("T", clean[2], dirty[2])]:
        assert torch.isfinite(d.transpose(1, 2)[real]).all(), name
        torch.testing.assert_close(d.transpose(1, 2)[real], c.transpose(1, 2)[real], msg=name)
    torch.testing.assert_close(dirty[1], clean[1])  # the global state (the window state keeps the raw rows)


def test_1_non_finite_padding_in_the_carried_window_does_not_leak():
    stream, weights, mask, null, _, _, (history, history_mask) = op_inputs(1, 2, 6, 3, False, False, 4)
    history = history.clone()
    history[:, :, history_mask[0] == 0] = float("nan")  # padded slots of the carried window
    assert (history_mask == 0).any()
    for impl in (vkt, fused):
        t, _ = impl.local_context(stream, mask, null, 4, True, (history, history_mask))
        assert torch.isfinite(t).all()


def test_1_non_finite_padding_does_not_leak_through_the_window_and_sink():
    torch.manual_seed(0)
    b, h, n, d = 1, 2, 10, 4
    q, k, v = torch.randn(b, h, n, d), torch.randn(b, h, n, d), torch.randn(b, h, n, d)
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[:, :3] = False
    rank = vkt.rank_of_real_tokens(mask)
    empty = (torch.zeros(b, h, 2, d), torch.zeros(b, h, 2, d), torch.zeros(b, 2, dtype=torch.bool))

    def run(k, v):
        sink = vkt.fill_sink(k, v, mask, rank, empty)
        return vkt.sliding_window_attention(
            q, k, v, mask & (rank >= 2), 3, None, sink, rank[:, :, None] >= torch.arange(2)
        )[0]

    clean = run(k, v)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, :3], v2[:, :, :3] = float("nan"), float("inf")
    dirty = run(k2, v2)
    torch.testing.assert_close(dirty[:, :, 3:], clean[:, :, 3:])


# ------------------------------------------------------------- 2. nothing reaches the past, no overflow


@pytest.mark.parametrize("poison", [float("inf"), float("nan"), 3e38])
def test_2_a_non_finite_future_value_does_not_reach_the_past_in_decayed_cumsum(poison):
    torch.manual_seed(0)
    x = torch.randn(1, 2, 150, 3)
    log_decay = -torch.rand(1, 2, 150)
    initial = torch.randn(1, 2, 3)
    clean = vkt.decayed_cumsum(x[:, :, :100], log_decay[:, :, :100], initial, chunk_size=8)
    x[:, :, 100] = poison
    x[:, :, 101] = poison  # 3e38 + 3e38 overflows: a sum that is no longer finite
    dirty = vkt.decayed_cumsum(x, log_decay, initial, chunk_size=8)
    torch.testing.assert_close(dirty[:, :, :100], clean)
    assert not torch.isfinite(dirty[:, :, 101]).any()


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("poison", [float("inf"), float("nan")])
def test_2_a_non_finite_future_token_does_not_reach_the_past(backend, poison):
    stream, weights, mask, null, log_decay, _, _ = op_inputs(1, 2, 20, 3, True, False, 3, dtype=torch.float64)
    clean = both_contexts(BACKENDS[backend], stream[:, :, :12], weights[:, :, :12], mask[:, :12], null, log_decay)
    stream, weights = stream.clone(), weights.clone()
    stream[:, :, 12], weights[:, :, 15] = poison, poison
    dirty = both_contexts(BACKENDS[backend], stream, weights, mask, null, log_decay)
    torch.testing.assert_close(dirty[0][:, :, :12], clean[0])
    torch.testing.assert_close(dirty[2][:, :, :12], clean[2])
    assert not torch.isfinite(dirty[0][:, :, 13:]).any()  # what follows it is garbage, and says so


@pytest.mark.parametrize("backend", ["reference", "fused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_2_huge_finite_inputs_give_finite_contexts(backend, dtype):
    """1e30 vectors with 1e30 weights: w R = 1e60 overflows float32, the means must not."""
    impl = BACKENDS[backend]
    stream, weights, mask, null, log_decay, _, _ = op_inputs(2, 2, 40, 3, True, False, 3)
    stream, weights = (stream * 1e30).to(dtype), weights * 1e30
    k, (mean, total), t, _ = both_contexts(impl, stream, weights, mask, null, log_decay)
    assert torch.isfinite(k).all() and torch.isfinite(t).all()
    assert torch.isfinite(mean).all() and torch.isfinite(total).all()
    # the mean of 1e30-sized vectors is 1e30-sized, and equals the float64 mean
    want = vkt.global_context(stream.double(), weights.double(), mask, null.double(), log_decay.double())[0]
    torch.testing.assert_close(k.double(), want, rtol=1e-4, atol=1e26)
    # carried on in chunks: the state stays finite too
    state = None
    for start in range(0, 40, 7):
        end = min(start + 7, 40)
        part, state = impl.global_context(stream[:, :, start:end], weights[:, :, start:end], mask[:, start:end], null,
                                          log_decay, True, state)  # fmt: skip
        torch.testing.assert_close(part.double(), want[:, :, start:end], rtol=1e-4, atol=1e26)


def test_2_huge_contexts_give_a_finite_scalar_attention():
    gen = torch.Generator().manual_seed(0)
    k, t = torch.randn(1, 2, 9, 4, generator=gen) * 1e30, torch.randn(1, 2, 9, 4, generator=gen) * 1e30
    scores = torch.randn(1, 2, 9, generator=gen) * 1e30
    for normalization in ("decimal", "softsign", "sigmoid", "tanh", "none"):
        a = vkt.scalar_attention(scores, k, t, 1e-3, normalization)
        assert torch.isfinite(a).all(), normalization


def test_2_weights_that_underflow_give_the_starting_mean():
    """Every weight 0 (softplus of a very negative score) and a strong decay: the total underflows."""
    stream = torch.randn(1, 1, 400, 2)
    weights = torch.zeros(1, 1, 400)
    null = torch.randn(1, 2)
    k, (mean, total) = vkt.global_context(stream, weights, torch.ones(1, 400), null, torch.tensor([-0.7]))
    assert torch.isfinite(k).all() and torch.isfinite(mean).all()
    torch.testing.assert_close(k[0, 0, -1], null[0])


# --------------------------------------------------------------------- 3. the decimal point, near 10^k


def test_3_decimal_normalize_just_below_a_power_of_ten():
    below_1000 = torch.tensor([999.99994], dtype=torch.float32)
    assert vkt.decimal_normalize(below_1000).item() == pytest.approx(0.99999994, abs=1e-8)
    below_100 = torch.tensor(
        [torch.nextafter(torch.tensor(100.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)).item()],
        dtype=torch.float64,
    )
    assert 0.99 < vkt.decimal_normalize(below_100).item() < 1.0
    for dtype, top in ((torch.float32, 30), (torch.float64, 22)):  # 10^k is exact in float64 up to 10^22
        powers = torch.tensor([10.0**k for k in range(-3, top)], dtype=dtype)
        around = torch.cat(
            [torch.nextafter(powers, torch.zeros_like(powers)), powers, torch.nextafter(powers, powers * 2)]
        )
        out = vkt.decimal_normalize(around).abs()
        big = around >= 1
        assert (out < 1).all() and (out[big] >= 0.1).all(), dtype
        expected = torch.stack([naive.normalize(v, "decimal") for v in around.double()])
        torch.testing.assert_close(out.double(), expected.abs(), rtol=1e-6, atol=0)


# ------------------------------------------------------------------------- the layer, every option on

LAYER_VARIANTS = {
    "paper": dict(preset="paper"),
    "default": dict(preset="default"),
    "options": dict(TINY_VARIANTS["options"]),
    "window": dict(preset="default", local_attention=True, local_attention_window=3, sink_tokens=2),
    "window-add": dict(preset="default", local_attention=True, local_attention_window=4, global_readout="add"),
    "window-paper": dict(preset="paper", local_attention=True, local_attention_window=2, sink_tokens=0),
    "window-only": dict(preset="default", local_attention=True, local_attention_window=3, vkt_terms=False),
    "window-learned-sink": dict(
        preset="default", local_attention=True, local_attention_window=3, sink_tokens=0, learned_sink=True
    ),
    "window-only-both-sinks": dict(
        preset="default", local_attention=True, local_attention_window=2, learned_sink=True, vkt_terms=False
    ),
}


def vkt_layer(variant: str, seed: int = 0, **overrides) -> VKTAttention:
    """A ``VKTAttention`` of :data:`LAYER_VARIANTS` with every VKT parameter random (eval mode)."""
    torch.manual_seed(seed)
    layer = VKTAttention(tiny_config(**{**LAYER_VARIANTS[variant], **overrides})).eval()
    with torch.no_grad():
        for name, param in layer.named_parameters():
            if not name.endswith("_proj.weight") or "importance" in name:
                param.normal_(0.0, 0.5)
    return layer


def mixed(layer: VKTAttention, x: torch.Tensor, mask=None, cache=None) -> torch.Tensor:
    with torch.no_grad():
        return layer(x, attention_mask=mask, cache=cache)[0]


@pytest.mark.parametrize("variant", list(LAYER_VARIANTS))
@pytest.mark.parametrize("poison", [float("nan"), float("inf"), 1e30])
def test_1_layer_padding_holds_anything_without_leaking(variant, poison):
    """Left-padded rows whose padded hidden states are NaN / inf / 1e30 equal the rows alone."""
    layer = vkt_layer(variant)
    x = torch.randn(2, 9, NATIVE_HIDDEN)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :4] = 0
    x[0, :4] = poison
    out = mixed(layer, x, mask)
    alone = mixed(layer, x[:1, 4:])
    torch.testing.assert_close(out[0, 4:], alone[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1], mixed(layer, x[1:])[0], rtol=1e-5, atol=1e-5)
    # and carried in a cache, token by token: the padded slots stay in the state, inert
    cache, steps = VKTCache(["vkt"]), []
    for i in range(9):
        steps.append(mixed(layer, x[:, i : i + 1], mask[:, : i + 1], cache))
    torch.testing.assert_close(torch.cat(steps, 1)[0, 4:], alone[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_1_model_padding_holds_anything_without_leaking(variant, poison):
    """Through the whole model, softmax layers of a hybrid included (their masked weight 0 times NaN)."""
    model = tiny_model(variant)
    embeds = model.get_input_embeddings()(torch.randint(0, NATIVE_VOCAB, (2, 8), generator=torch.Generator()))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, :3] = 0
    dirty = embeds.clone()
    dirty[0, :3] = poison
    with torch.no_grad():
        clean_logits = model(inputs_embeds=embeds, attention_mask=mask).logits
        dirty_logits = model(inputs_embeds=dirty, attention_mask=mask).logits
    torch.testing.assert_close(dirty_logits[0, 3:], clean_logits[0, 3:])
    torch.testing.assert_close(dirty_logits[1], clean_logits[1])


@pytest.mark.parametrize("variant", list(LAYER_VARIANTS))
@pytest.mark.parametrize("poison", [float("nan"), float("inf"), 1e30])
def test_2_layer_a_bad_future_token_does_not_reach_the_past(variant, poison):
    layer = vkt_layer(variant, mixer_chunk_size=4)
    x = torch.randn(1, 12, NATIVE_HIDDEN)
    clean = mixed(layer, x)
    x[0, 7] = poison
    dirty = mixed(layer, x)
    torch.testing.assert_close(dirty[:, :7], clean[:, :7])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", ["paper", "window-paper"])
def test_2_layer_huge_inputs_give_finite_outputs(dtype, variant):
    """1e30 hidden states, where the formula's own terms stay representable (no read-out products)."""
    layer = vkt_layer(variant, mixer_chunk_size=5).to(dtype)
    x = (torch.randn(2, 13, NATIVE_HIDDEN) * 1e30).to(dtype)
    if variant == "window-paper":
        x = x / 1e12  # q . k must stay below float32's maximum
    out = mixed(layer, x)
    assert torch.isfinite(out).all()


# --------------------------------------------------------------------- 4. chunked = whole in bfloat16


_PROJECT_ONCE = VKTAttention.project


def project_per_chunk(self: VKTAttention, x: torch.Tensor, rotary=None) -> Projections:
    """The old way: each chunk's slice of ``x`` projected on its own (the bug of item 4)."""
    step = self.config.mixer_chunk_size
    parts = [
        _PROJECT_ONCE(self, x[:, s : s + step], None if rotary is None else tuple(r[:, s : s + step] for r in rotary))
        for s in range(0, x.shape[1], step)
    ]
    joined = {}
    for f in dataclasses.fields(Projections):
        pieces = [getattr(p, f.name) for p in parts]
        joined[f.name] = None if pieces[0] is None else torch.cat(pieces, -1 if f.name in ("scores", "gates") else -2)
    return Projections(**joined)


@pytest.mark.parametrize("variant", ["paper", "default", "options", "window"])
def test_4_mixer_chunk_size_does_not_change_bfloat16_logits(variant, monkeypatch):
    """Projections are computed once, before chunking: a Linear with a bias on a chunk's strided slice
    was one bf16 ulp off the whole tensor, which the ratio amplified to several ulps of the logits."""

    def logits(chunk: int) -> torch.Tensor:
        model = tiny_model(**{**LAYER_VARIANTS[variant], "attention_bias": True, "mixer_chunk_size": chunk})
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("bias") or any(k in name for k in ("importance", "decay_logit", "null_")):
                    param.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(len(name)))
        model = model.to(torch.bfloat16)
        ids = torch.randint(0, NATIVE_VOCAB, (2, 37), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            return model(ids, use_cache=False).logits.float()

    whole = logits(4096)
    for chunk in (5, 16):
        chunked = logits(chunk)
        assert (chunked - whole).abs().max() <= 2**-8 * whole.abs().max(), chunk  # within one bf16 ulp
    # the check catches the old way
    monkeypatch.setattr(VKTAttention, "project", project_per_chunk)
    assert (logits(5) - whole).abs().max() > 2**-8 * whole.abs().max()


# ------------------------------------------------------------------------- 5. float64 accumulation


def test_5_float64_accumulation_computes_the_decay_in_float64():
    layer = vkt_layer("default", accumulation_dtype="float64")
    log_decay = layer.log_decay()
    assert log_decay.dtype == torch.float64
    assert torch.equal(log_decay, torch.nn.functional.logsigmoid(layer.decay_logit.double()))
    proj = layer.project(torch.randn(1, 5, NATIVE_HIDDEN))
    assert proj.query.dtype == proj.scores.dtype == torch.float64
    _, a, state = mix(proj, torch.ones(1, 5), None, layer)
    assert a.dtype == state.weighted_sum.dtype == state.weight_total.dtype == torch.float64


# --------------------------------------------------------------------------------- 6. edge-case inputs


@pytest.mark.parametrize("variant", list(LAYER_VARIANTS))
def test_6_length_zero_gives_empty_outputs_and_keeps_the_state(variant):
    layer = vkt_layer(variant)
    out, a = layer(torch.randn(2, 0, NATIVE_HIDDEN))
    assert out.shape == (2, 0, NATIVE_HIDDEN) and a.shape == (2, 4, 0)
    cache = VKTCache(["vkt"])
    x = torch.randn(2, 3, NATIVE_HIDDEN)
    first = mixed(layer, x[:, :2], cache=cache)
    state = [t.clone() for t in vkt_state_layer(cache, 0).state.tensors()]
    empty = mixed(layer, x[:, :0], cache=cache)
    assert empty.shape == (2, 0, NATIVE_HIDDEN) and vkt_state_layer(cache, 0).seen_tokens == 2
    assert all(torch.equal(a, b) for a, b in zip(state, vkt_state_layer(cache, 0).state.tensors()))
    torch.testing.assert_close(torch.cat([first, mixed(layer, x[:, 2:], cache=cache)], 1), mixed(layer, x))


def test_6_length_zero_through_the_model():
    model = tiny_model("default")
    assert model(torch.zeros(2, 0, dtype=torch.long)).logits.shape == (2, 0, NATIVE_VOCAB)


@pytest.mark.parametrize(
    "mask, message",
    [
        (torch.tensor([[1, 1, 2, 1]]), "0 for padding"),
        (torch.tensor([[1, -1, 1, 1]]), "0 for padding"),
        (torch.tensor([[0.0, 0.0, -float("inf"), 0.0]]), "additive"),
        (torch.tensor([[0.5, 1.0, 1.0, 1.0]]), "0 for padding"),
        (torch.tensor([[1, 0, 1, 1]]), "between real tokens"),
        (torch.tensor([[1, 1, 1, 1, 1]]), "covers 5 tokens"),
        (torch.tensor([[1, 1, 1]]), "covers 3 tokens"),
        (torch.ones(2, 4), "does not fit"),
        (torch.ones(1, 4, 4), "2-D padding mask"),
    ],
)
def test_6_bad_masks_are_clear_errors(mask, message):
    layer = vkt_layer("window")
    with pytest.raises(ValueError, match=message):
        layer(torch.randn(1, 4, NATIVE_HIDDEN), attention_mask=mask)


def test_6_masks_of_cached_steps_must_cover_the_cache():
    layer = vkt_layer("window")
    cache = VKTCache(["vkt"])
    x = torch.randn(1, 6, NATIVE_HIDDEN)
    layer(x[:, :4], attention_mask=torch.ones(1, 4), cache=cache)
    with pytest.raises(ValueError, match="4 cached"):
        layer(x[:, 4:5], attention_mask=torch.ones(1, 1), cache=cache)  # the new token's mask only
    with pytest.raises(ValueError, match="between real tokens"):  # right padding, then a cached step
        cache = VKTCache(["vkt"])
        layer(x[:, :4], attention_mask=torch.tensor([[1, 1, 0, 0]]), cache=cache)
        layer(x[:, 4:5], attention_mask=torch.tensor([[1, 1, 0, 0, 1]]), cache=cache)


def test_6_right_padding_without_a_cache_and_boolean_masks_are_fine():
    layer = vkt_layer("window")
    x = torch.randn(1, 6, NATIVE_HIDDEN)
    right = mixed(layer, x, torch.tensor([[1, 1, 1, 1, 0, 0]]))
    torch.testing.assert_close(right[:, :4], mixed(layer, x[:, :4]))
    left = torch.tensor([[False, True, True, True, True, True]])
    torch.testing.assert_close(mixed(layer, x, left), mixed(layer, x, left.long()))


@pytest.mark.parametrize(
    "options, field",
    [
        (dict(eps=float("inf")), "eps"),
        (dict(eps=float("nan")), "eps"),
        (dict(eps=0.0), "eps"),
        (dict(eps=True), "eps"),
        (dict(local_window=0), "local_window"),
        (dict(local_attention_window=2.5), "local_attention_window"),
        (dict(mixer_chunk_size=True), "mixer_chunk_size"),
        (dict(sink_tokens=-1), "sink_tokens"),
        (dict(normalization="softmax"), "normalization"),
        (dict(global_readout="both"), "global_readout"),
        (dict(accumulation_dtype="float16"), "accumulation_dtype"),
    ],
)
def test_6_bad_options_are_clear_errors(options, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**options)


# ---------------------------------------------------------------- 7-8. recipe errors: one line, exit 2


def recipe(name: str, *argv: str, cwd=ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "recipes" / name), *argv]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def one_line_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert all(w in lines[0] for w in words), lines[0]


def test_7_recipe_errors_are_one_line_with_exit_code_2(tmp_path):
    (tmp_path / "typo.yaml").write_text("mode: pretrain\nwarmup_step: 3\n")
    one_line_error(recipe("train.py", "--config", str(tmp_path / "typo.yaml")), "warmup_step", "'warmup_steps'")
    one_line_error(
        recipe("eval.py", "--model", str(tmp_path / "missing"), "--data", str(BOOKS)), "missing", "not exist"
    )


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--config", "nowhere.yaml"], ["nowhere.yaml", "does not exist"]),
        (["--data", "no/such/corpus"], ["no/such/corpus", "fetch_corpus"]),
        (["--model_config", "{hiden_size: 32}"], ["hiden_size", "'hidden_size'"]),  # 8: no silent default width
        (["--model_config", "{hidden_size: 30, num_attention_heads: 4}"], ["model_config", "divisible"]),
        (["--mode", "distill"], ["model_name_or_path"]),
        (["--mode", "finetune", "--model_name_or_path", "./no/model"], ["./no/model", "does not exist"]),
    ],
)
def test_7_8_train_config_errors(tmp_path, capsys, argv, words):
    code = run_recipe("train.py", train_recipe.main, [*tiny_args(tmp_path / "run"), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and all(w in err[0] for w in words), err
    assert not (tmp_path / "run" / "model").exists()


def test_7_eval_errors(tmp_path, capsys):
    assert run_recipe("eval.py", eval_recipe.main, ["--run_dir", str(tmp_path)]) == 2
    assert "no run.json" in capsys.readouterr().err
    assert run_recipe("eval.py", eval_recipe.main, ["--model", "nobody/nothing-here", "--data", str(BOOKS)]) == 2
    assert "cannot load a model from 'nobody/nothing-here'" in capsys.readouterr().err


def test_7_ctrl_c_says_where_the_run_stopped_and_how_to_resume(tmp_path, capsys, monkeypatch):
    real_loss, calls = training.training_loss, []

    def loss_then_ctrl_c(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(training, "training_loss", loss_then_ctrl_c)
    argv = tiny_args(tmp_path / "run", max_steps=6)
    assert run_recipe("train.py", train_recipe.main, argv) == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (above it: the progress of the checkpoint saves)
    assert err.startswith("train.py: interrupted at step 3 of 6") and "step_000002" in err, err
    assert "rerun the same command" in err
    monkeypatch.setattr(training, "training_loss", real_loss)
    assert run_recipe("train.py", train_recipe.main, argv) == 0
    assert "resumed from" in capsys.readouterr().out


# ---------------------------------------------------------- 9. a mislabelled checkpoint is refused early


def test_9_mislabelled_checkpoint_is_refused_before_anything_is_built(tmp_path, capsys, monkeypatch):
    tiny_base("gpt2").save_pretrained(tmp_path / "gpt2")  # 4 layers of GPT-2
    config = json.loads((tmp_path / "gpt2" / "config.json").read_text())
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    loaded = []
    monkeypatch.setattr(cli.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: loaded.append(a))
    assert cli.main(["convert", str(tmp_path / "gpt2"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "do not match its config" in err and "model_type 'llama'" in err and "converting layers" not in err
    assert not loaded and not (tmp_path / "out").exists()
    monkeypatch.undo()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps(config))  # the right label converts
    assert cli.main(["convert", str(tmp_path / "gpt2"), str(tmp_path / "out"), "--layers", "0"]) == 0


# ------------------------------------------------------ 10. checkpoints and metrics survive interruption


def test_10_an_incomplete_checkpoint_is_skipped_on_resume(tmp_path, capsys):
    run = tmp_path / "run"
    assert training.train(training.load_config(tiny_args(run, max_steps=6, stop_after_steps=5)))["stopped"]
    (run / "checkpoints" / "step_000004" / "trainer_state.json").write_text("")  # killed while writing it
    with (run / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 5, "lo')  # a row cut short
    summary = training.train(training.load_config(tiny_args(run, max_steps=6)))
    out = capsys.readouterr().out
    assert "skipping incomplete checkpoint" in out and "resumed from" in out and "step_000002" in out
    assert summary["final"]["step"] == 6


def test_10_rerunning_a_finished_run_adds_no_row(tmp_path):
    run = tmp_path / "run"
    training.train(training.load_config(tiny_args(run, max_steps=4, eval_every=3)))  # final eval at step 4
    rows = (run / "metrics.jsonl").read_text()
    assert training.train(training.load_config(tiny_args(run, max_steps=4, eval_every=3)))["final"]["step"] == 4
    assert (run / "metrics.jsonl").read_text() == rows
    assert sum('"val_loss"' in r and '"step": 4' in r for r in rows.splitlines()) == 1


def test_10_atomic_write_keeps_the_old_file_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "trainer_state.json"
    write_text_atomic(path, '{"step": 1}')

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        write_text_atomic(path, '{"step": 2}')
    assert path.read_text() == '{"step": 1}'


# ------------------------------------------------------------------ 11. explain says why a map is grey


def test_11_explain_a_fresh_conversion_says_why_every_a_is_0(tmp_path, capsys):
    tok = get_tokenizer("byte")
    model = convert_to_vkt(tiny_base("llama", vocab_size=len(tok)), layers=[1, 3])
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    out = tmp_path / "page.html"
    assert cli.main(["explain", str(tmp_path / "m"), "It is a truth", "--out", str(out)]) == 0
    assert "importance vector V is 0" in out.read_text() and "importance vector V is 0" in capsys.readouterr().err
    trained = tiny_model("default", vocab_size=len(tok))  # a has values: no note
    assert not importance_map(trained, tok, "It is a truth").notes


# ---------------------------------------------------------- 12. the README's commands leave git clean


def test_12_readme_commands_write_only_where_git_ignores():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout")
    readme = (ROOT / "README.md").read_text()
    code = "\n".join(re.findall(r"```(?:bash|python)\n(.*?)```", readme, re.S))
    written = re.findall(r"--out(?:put_dir|_dir)?[ =]([^\s\\]+)", code) + re.findall(
        r"save_pretrained\(\"([^\"]+)\"", code
    )
    written += re.findall(r"vkt-hf convert \S+ (\S+)", code)
    assert len(written) >= 4, written
    for path in written:
        ignored = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0
        assert ignored, f"the README writes to {path}, which git does not ignore"

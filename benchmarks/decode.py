"""Decode ms/token: a SmolLM2-shaped Llama (``DynamicCache``) vs the same model with every layer converted to VKT.

Both models are SmolLM2-135M's architecture (30 layers, hidden 576, 9 heads, 3 key/value heads) with random
weights from one seed: speed only. For each context length ``L``:

* the first ``--prompt`` tokens (default 1,024) are really prefilled into both caches;
* a longer context is *synthetic*, as in ``benchmarks/model.py``: the original's keys and values are random
  tensors of ``L`` positions per layer (its per-token cost depends on the cache's size alone); the VKT state
  is the one after the real prompt with its token counters set to ``L`` (its size does not depend on ``L``).
  A VKT model can read a 1M-token context only through its fixed-size state, so ``L`` = 1M is shown for VKT.

Decoding steps of the two models are *interleaved* (one original step, one VKT step, ...), so a load that
comes and goes on a shared machine hits both alike, and the ratio of the medians comes from one run.
``--busy N`` starts N busy-loop processes (pure Python) for the whole measurement: decoding under
competition for the cores. VKT decodes with the C++ step (``vkt_hf/ops/cpu_kernels.py``, built on first use)
unless ``--eager``; the JSON's ``args.vkt_step`` says which ran.

Example (the table of ``docs/performance.md``, "Decode")::

    python benchmarks/decode.py --threads 2 --lengths 1024 16384 131072 1048576 --steps 24
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import machine_info, write_json  # noqa: E402

#: SmolLM2-135M's config (the checkpoint's config.json), so no download is needed
SMOLLM2 = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    max_position_embeddings=8192,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    tie_word_embeddings=True,
)


class ProjectionsOnly(nn.Module):
    """An attention module's four projections and nothing else (no RoPE, no cache, no softmax): the floor of
    any attention that keeps these projections."""

    def __init__(self, attention: nn.Module):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
            attention.q_proj,
            attention.k_proj,
            attention.v_proj,
            attention.o_proj,
        )

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        self.k_proj(hidden_states), self.v_proj(hidden_states)
        return self.o_proj(self.q_proj(hidden_states)), None


def build(kind: str, layers: int):
    """The random SmolLM2-shaped model (``original``), its all-layer VKT conversion (``vkt``, ``vkt_eager``) or
    the original with its attention cut to the projections (``floor``), float32, eval."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import vkt_hf

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**SMOLLM2, "num_hidden_layers": layers}, attn_implementation="sdpa"))
    if kind.startswith("vkt"):
        model = vkt_hf.convert_to_vkt(model, layers="all")
    if kind == "floor":
        for layer in model.model.layers:
            layer.self_attn = ProjectionsOnly(layer.self_attn)
    return model.eval()


def new_cache(kind: str, layers: int):
    from transformers import DynamicCache

    import vkt_hf

    return vkt_hf.VKTCache(["vkt"] * layers) if kind.startswith("vkt") else DynamicCache()


def stretch(kind: str, cache, length: int, config) -> None:
    """Make ``cache`` (after the real prompt) stand for a context of ``length`` tokens (see the docstring)."""
    if kind == "floor":  # it keeps no context
        return
    if kind.startswith("vkt"):
        for layer in cache.layers:
            layer.seen_tokens = length
            state = layer.state
            state.tokens_seen.fill_(length)
            layer.state = state
        return
    shape = (1, config.num_key_value_heads, length, config.head_dim)
    for layer in cache.layers:
        layer.keys, layer.values = torch.randn(shape), torch.randn(shape)


def cache_mib(cache) -> float:
    from vkt_hf.cache import layer_nbytes

    return sum(layer_nbytes(layer) for layer in cache.layers) / 2**20


def busy_loop() -> None:  # a competing process: one core's worth of pure-Python work
    while True:
        pass


@torch.no_grad()
def measure(models: dict, length: int, args) -> dict:
    """Median ms/token of each model at ``length``, their steps interleaved."""
    ids = torch.randint(100, SMOLLM2["vocab_size"], (1, args.prompt))
    caches, tokens = {}, {}
    for kind, model in models.items():
        if kind == "original" and length > args.max_original:
            continue
        cache = new_cache(kind, model.config.num_hidden_layers)
        out = None
        for start in range(0, args.prompt, args.chunk):
            out = model(ids[:, start : start + args.chunk], cache=cache, use_cache=True, logits_to_keep=1)
        if length > args.prompt:
            stretch(kind, cache, length, model.config)
        caches[kind], tokens[kind] = cache, out.logits[:, -1:].argmax(-1)
    gc.collect()
    times = {kind: [] for kind in caches}
    for step in range(args.steps + args.warmup):
        for kind in caches:
            if kind == "vkt_eager":  # the same model decoding with the eager step (read on every step)
                os.environ["VKT_CPU_KERNELS"] = "0"
            start = time.perf_counter()
            out = models[kind](tokens[kind], cache=caches[kind], use_cache=True)
            elapsed = time.perf_counter() - start
            if kind == "vkt_eager":
                os.environ["VKT_CPU_KERNELS"] = "0" if args.eager else "1"
            tokens[kind] = out.logits[:, -1:].argmax(-1)
            if step >= args.warmup:
                times[kind].append(elapsed)
    row = {"length": length, "synthetic": length > args.prompt}
    for kind, series in times.items():
        row[f"{kind}_ms"] = statistics.median(series) * 1e3
        row[f"{kind}_cache_mib"] = cache_mib(caches[kind])
    if "original_ms" in row:
        row["ratio"] = row["vkt_ms"] / row["original_ms"]
    for kind in ("vkt_eager", "floor"):
        if f"{kind}_ms" in row and "original_ms" in row:
            row[f"{kind}_ratio"] = row[f"{kind}_ms"] / row["original_ms"]
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 16384, 131072, 1048576])
    parser.add_argument("--prompt", type=int, default=1024, help="tokens really prefilled")
    parser.add_argument("--chunk", type=int, default=1024, help="prefill chunk (tokens per forward)")
    parser.add_argument("--steps", type=int, default=24, help="decoding steps measured per model and length")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--layers", type=int, default=SMOLLM2["num_hidden_layers"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--busy", type=int, default=0, help="competing busy-loop processes during the run")
    parser.add_argument(
        "--max-original", type=int, default=131072, help="longest context for the original (its KV cache grows)"
    )
    parser.add_argument(
        "--eager",
        action="store_true",
        help="decode VKT with the eager step, not the C++ kernel (VKT_CPU_KERNELS=0; vkt_hf/ops/cpu_kernels.py)",
    )
    parser.add_argument(
        "--compare-eager", action="store_true", help="also time a third model, the VKT one with the eager step"
    )
    parser.add_argument(
        "--floor", action="store_true", help="also time the original with its attention cut to its projections"
    )
    parser.add_argument("--out", default=None, help="JSON file for the results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.eager:
        os.environ["VKT_CPU_KERNELS"] = "0"
    from vkt_hf.ops import cpu_kernels

    args.vkt_step = "cpu kernel" if cpu_kernels.kernel() is not None else "eager"  # what the VKT model decodes with
    models = {"original": build("original", args.layers), "vkt": build("vkt", args.layers)}
    if args.compare_eager:
        models["vkt_eager"] = build("vkt_eager", args.layers)
    if args.floor:
        models["floor"] = build("floor", args.layers)
    competitors = [multiprocessing.Process(target=busy_loop, daemon=True) for _ in range(args.busy)]
    for process in competitors:
        process.start()
    rows = []
    try:
        for length in args.lengths:
            row = measure(models, length, args)
            rows.append(row)
            original = f"{row['original_ms']:8.1f}" if "original_ms" in row else "       -"
            ratio = f"{row['ratio']:.2f}x" if "ratio" in row else "-"
            print(
                f"L={length:8d}  original {original} ms/tok ({row.get('original_cache_mib', 0):7.1f} MiB KV)"
                f"  vkt {row['vkt_ms']:7.1f} ms/tok ({row['vkt_cache_mib']:.2f} MiB state)  ratio {ratio}"
                + (f"  eager step {row['vkt_eager_ms']:.1f} ms/tok" if "vkt_eager_ms" in row else "")
                + (f"  floor {row['floor_ms']:.1f} ms/tok" if "floor_ms" in row else ""),
                flush=True,
            )
    finally:
        for process in competitors:
            process.terminate()
    payload = {"benchmark": "decode", "command": " ".join(sys.argv), "args": vars(args), "rows": rows}
    if args.out:
        write_json(args.out, {**payload, "machine": machine_info("cpu")})
    print(json.dumps(payload))


if __name__ == "__main__":
    main()

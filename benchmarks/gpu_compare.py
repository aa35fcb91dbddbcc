"""Pick the GPU kernels by the numbers: VKT's own kernels against fla-core's and torch's ``flex_attention``.

Three comparisons, each timed on the same inputs in one run (median of ``--repeats`` after a warm-up):

* ``global``: the causal decayed weighted mean of a ``(B, H, N, D)`` stream (VKT's global context) --
  the reference ops (what ``auto`` runs on CUDA), the Triton kernels one program per sequence and
  sequence-parallel (``vkt_hf/ops/triton.py``), and fla-core's chunked HGRN scan (``fla.ops.hgrn.chunk_hgrn``,
  ``h_t = exp(g_t) h_{t-1} + x_t`` with ``x = w [v, 1]`` and ``g = log gamma``: the same sums; the shift to the
  tokens before each one and the division are added to its time). Also a copy of the stream: the reference's
  effective bandwidth is reported as a share of the copy's.
* ``window``: the local softmax window (64 keys + 1 sink, grouped-query heads) -- VKT's
  ``sliding_window_attention`` (the ``WindowSoftmax`` Function) against ``flex_attention`` with a
  sliding-window + sink block mask (no read-out slot: flex has none), and causal SDPA, forward and
  forward + backward.
* ``layer``: the converted layer against the SDPA layer of ``benchmarks/layer_train.py``, forward + backward.

A method that fails (fla-core not installed, no compiler for flex) is recorded with its error, not dropped.
``--device cpu`` runs the same code at small sizes (a smoke test; the numbers mean nothing there)::

    python benchmarks/gpu_compare.py --device cuda --out /tmp/out/gpu_compare.json
    python benchmarks/gpu_compare.py --device cpu --lengths 256 --repeats 1 --out /tmp/gpu_compare_cpu.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import machine_info, write_json  # noqa: E402

from vkt_hf.ops import functional as ref  # noqa: E402
from vkt_hf.ops import triton as triton_ops  # noqa: E402


def timed(fn: Callable[[], object], device: str, repeats: int) -> float:
    """Median seconds of ``fn`` after one warm-up call (synchronised on CUDA)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def global_methods(length: int, device: str) -> tuple[dict, int]:
    """The global-mean methods at ``length`` tokens, and the bytes one pass over their input and output moves."""
    heads, dim = 9, 128
    gen = torch.Generator(device=device).manual_seed(0)
    stream = torch.randn(1, heads, length, dim, device=device, generator=gen)
    weights = torch.nn.functional.softplus(torch.randn(1, heads, length, device=device, generator=gen))
    mask = torch.ones(1, length, device=device)
    null = torch.randn(heads, dim, device=device, generator=gen)
    log_decay = torch.log(ref.gamma_init(heads)).to(device)

    def fla_scan():
        from fla.ops.hgrn import chunk_hgrn

        x = torch.cat([stream * weights[..., None], weights[..., None]], -1).flatten(0, 1)  # (B H, N, D + 1)
        gate = log_decay[:, None, None].expand(heads, length, dim + 1).contiguous()
        inclusive, _ = chunk_hgrn(x, gate)
        exclusive = (
            torch.cat([torch.zeros_like(inclusive[:, :1]), inclusive[:, :-1]], 1) * log_decay.exp()[:, None, None]
        )
        return exclusive[..., :dim] / exclusive[..., dim:].clamp(min=1e-30)

    methods = {
        "vkt_reference": lambda: ref.global_context(stream, weights, mask, null, log_decay),
        "vkt_triton_sequential": lambda: triton_ops.global_context(
            stream, weights, mask, null, log_decay, sequence_parallel=False
        ),
        "vkt_triton_parallel": lambda: triton_ops.global_context(
            stream, weights, mask, null, log_decay, sequence_parallel=True
        ),
        "fla_chunk_hgrn": fla_scan,
        "copy": lambda: stream.clone(),
    }
    return methods, 2 * stream.numel() * stream.element_size()


def window_methods(length: int, device: str, backward: bool) -> dict:
    """The softmax-window methods at ``length`` tokens (9 query heads, 3 key/value heads, d = 64, window 64 + 1 sink)."""
    heads, kv_heads, dim, window = 9, 3, 64, 64
    gen = torch.Generator(device=device).manual_seed(1)

    def leaf(*shape):
        return torch.randn(*shape, device=device, generator=gen).requires_grad_(backward)

    q, k, v = leaf(1, heads, length, dim), leaf(1, kv_heads, length, dim), leaf(1, kv_heads, length, dim)
    mask = torch.ones(1, length, dtype=torch.bool, device=device)
    sink = (k[:, :, :1].detach(), v[:, :, :1].detach(), torch.ones(1, 1, dtype=torch.bool, device=device))
    key_mask = mask.clone()
    key_mask[:, 0] = False  # token 0 is the sink

    def run(fn):
        def go():
            out = fn()
            if backward:
                out.sum().backward()
            return out

        return go

    def vkt_window():
        return ref.sliding_window_attention(q, k, v, key_mask, window, sink=sink, custom_backward=True)[0]

    def flex_window():
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def keep(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & ((q_idx - kv_idx < window) | (kv_idx == 0))

        if "flex" not in _COMPILED:
            _COMPILED["flex"] = torch.compile(flex_attention)
        block = create_block_mask(keep, None, None, length, length, device=device)
        return _COMPILED["flex"](q, k, v, block_mask=block, enable_gqa=True)

    def sdpa():
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    return {"vkt_window": run(vkt_window), "flex_window_sink": run(flex_window), "sdpa_causal": run(sdpa)}


_COMPILED: dict = {}


def layer_methods(length: int, device: str) -> dict:
    """The converted VKT layer and the SDPA layer (``layer_train.py``), forward + backward of ``out.sum()``."""
    from layer_train import SDPALayer, converted_vkt_layer

    x = torch.randn(1, length, 576, device=device, requires_grad=True)
    layers = {"vkt_layer": converted_vkt_layer("auto").to(device), "sdpa_layer": SDPALayer().to(device)}

    def step(layer):
        def go():
            out = layer(x)
            (out[0] if isinstance(out, tuple) else out).sum().backward()

        return go

    return {name: step(layer) for name, layer in layers.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    rows = []

    def record(kind: str, length: int, mode: str, methods: dict, nbytes: int | None = None) -> None:
        for name, fn in methods.items():
            row = {"kind": kind, "length": length, "mode": mode, "method": name}
            try:
                row["seconds"] = timed(fn, args.device, args.repeats)
                if nbytes:
                    row["gbytes_per_s"] = nbytes / row["seconds"] / 1e9
            except Exception as error:  # a missing library or an unsupported device: recorded, not fatal
                row["error"] = f"{type(error).__name__}: {error}"[:300]
            rows.append(row)
            print(row, flush=True)

    for length in args.lengths:
        with torch.no_grad():
            methods, nbytes = global_methods(length, args.device)
            record("global", length, "fwd", methods, nbytes)
            record("window", length, "fwd", window_methods(length, args.device, backward=False))
        record("window", length, "fwd+bwd", window_methods(length, args.device, backward=True))
        record("layer", length, "fwd+bwd", layer_methods(length, args.device))
    write_json(
        args.out, {"benchmark": "gpu_compare", "machine": machine_info(args.device), "args": vars(args), "rows": rows}
    )


if __name__ == "__main__":
    main()

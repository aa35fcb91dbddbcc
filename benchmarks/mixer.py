"""Mixer-level benchmark: VKT vs SDPA causal vs eager softmax vs no mixing vs a plain copy.

One attention-sized problem per point: batch 1, ``H`` heads of size ``d`` (SmolLM2-135M:
H=9, d=64, 3 KV heads), sequence length ``N``. Methods:

* ``vkt_layer``: the whole ``VKTAttention`` layer (projections included), default preset.
* ``vkt_core``: the VKT mixing after the projections (importance, both context sums, scalar
  attention, gating and read-out) on given Q, K, V, in chunks of 4096 tokens like the layer:
  the layer's own ``mix`` function; ``vkt_core_ref`` is the same on the reference ops
  (``vkt_hf.ops.functional``) and ``vkt_core_fused`` on the blocked PyTorch path (``vkt_core``
  picks the backend as ``auto`` does: ``fused`` on CPU for long inputs, ``reference`` on CUDA).
* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)``.
* ``eager``: ``softmax(QK^T / sqrt(d) + causal mask) V`` written out (O(N^2) memory).
* ``none``: no mixing (returns V) — the floor; ``copy``: ``clone()`` of Q, K and V (bandwidth).

Time: median of ``--repeats`` calls after one warm-up call (one call, no warm-up, at long
lengths where a call exceeds 5 s). Peak memory: every point runs in its own subprocess
(CPU) and reports the ``getrusage`` RSS high-water mark minus the RSS once inputs exist;
on CUDA ``torch.cuda.max_memory_allocated`` minus the allocation before the call. A method
is stopped at the first length whose predicted time (from the previous point, N^2 for
softmax, N otherwise) exceeds ``--max-seconds`` or whose predicted eager score matrix
exceeds ``--max-eager-gib``; the JSON says so.

Example::

    python benchmarks/mixer.py --out docs/benchmarks/mixer_cpu.json
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import machine_info, median, peak_rss_bytes, rss_bytes, sync, time_call, write_json  # noqa: E402

import vkt_hf  # noqa: E402
from vkt_hf.layers.vkt_attention import Projections, mix  # noqa: E402
from vkt_hf.ops import functional as vkt  # noqa: E402

METHODS = ("vkt_core", "vkt_layer", "vkt_core_ref", "vkt_core_fused", "sdpa", "eager", "none", "copy")
QUADRATIC = ("sdpa", "eager")
CHUNK = 4096


def _layer(heads: int, kv_heads: int, dim: int, device: str) -> vkt_hf.VKTAttention:
    config = vkt_hf.VKTConfig(
        hidden_size=heads * dim, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=dim,
        num_hidden_layers=1, vocab_size=16, mixer_chunk_size=CHUNK,
    )  # fmt: skip
    return vkt_hf.VKTAttention(config).to(device).eval()


def vkt_core(q, k, v, gates, layer, backend: str | None) -> torch.Tensor:
    """The layer's own mixing step (:func:`vkt_hf.layers.vkt_attention.mix`, default preset) on given
    ``q`` ``(B, H, N, d)``, ``k``, ``v``: everything after the projections.

    ``gates`` ``(2, B, H, N)`` are the read-out gates. Chunks of 4096 tokens carry the state,
    exactly as ``VKTAttention.forward`` does. Returns the mixed heads ``(B, H, N, d)``.
    """
    layer.config.vkt_backend = backend or "auto"
    scores = vkt.importance_scores(q, layer.importance)  # s: (B, H, N)
    proj = Projections(query=q, scores=scores, context=k, gated=v, values=v, gates=gates)
    mask = torch.ones(q.shape[0], q.shape[2], device=q.device)
    out = torch.empty_like(q)
    state = None
    for a in range(0, q.shape[2], CHUNK):
        b = min(a + CHUNK, q.shape[2])
        out[:, :, a:b], _, state = mix(proj.chunk(a, b), mask[:, a:b], state, layer)
    return out


def eager_attention(q, k, v) -> torch.Tensor:
    n = q.shape[-2]
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])  # (B, H, N, N)
    scores.masked_fill_(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def run_point(method: str, length: int, mode: str, args) -> dict:
    """Time and memory of one method at one length (in this process)."""
    device, heads, kv_heads, dim = args.device, args.heads, args.kv_heads, args.dim
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    layer = _layer(heads, kv_heads, dim, device).to(dtype if method == "vkt_layer" else torch.float32)
    grad = mode == "fwd+bwd"
    # only the inputs this method reads (a freed input would still count in the RSS high-water mark)
    if method == "vkt_layer":
        hidden = torch.randn(1, length, heads * dim, device=device, dtype=dtype, requires_grad=grad)  # (B, N, H*d)
    else:
        q, k, v = (
            torch.randn(1, heads, length, dim, device=device, dtype=dtype, requires_grad=grad) for _ in range(3)
        )
        gates = torch.rand(2, 1, heads, length, device=device, dtype=dtype)  # (2, B, H, N)
    fns = {
        "vkt_core": lambda: vkt_core(q, k, v, gates, layer, None),
        "vkt_core_ref": lambda: vkt_core(q, k, v, gates, layer, "reference"),
        "vkt_core_fused": lambda: vkt_core(q, k, v, gates, layer, "fused"),
        "vkt_layer": lambda: layer(hidden)[0],
        "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True),
        "eager": lambda: eager_attention(q, k, v),
        "none": lambda: v,
        "copy": lambda: (q.clone(), k.clone(), v.clone()),
    }
    fn = fns[method]
    if not grad:  # inference forward: no autograd graph (the layer's parameters require grad)
        plain = fn

        def fn():  # noqa: F811
            with torch.no_grad():
                return plain()

    if grad:
        inner = fn

        def fn():  # noqa: F811 - forward + backward of a sum of the output
            out = inner()
            out = out[0] if isinstance(out, tuple) else out
            out.float().sum().backward()

    # warm-up on a short input first (allocator, thread pool, kernels), then the timed calls
    gc.collect()
    sync(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_bytes()
    first = time_call(fn, 1, device, warmup=0)[0]
    times = [first]
    if first < 5.0 and args.repeats > 1:
        times = time_call(fn, args.repeats, device, warmup=0)
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = peak_rss_bytes() - base
    return {
        "method": method, "length": length, "mode": mode, "seconds": median(times), "all_seconds": times,
        "peak_bytes": max(peak, 0), "tokens_per_s": length / median(times),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 65536, 262144, 1048576])
    parser.add_argument("--methods", nargs="+", default=[m for m in METHODS if m != "vkt_core_fused"], choices=METHODS)
    parser.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    parser.add_argument("--bwd-max-length", type=int, default=65536, help="longest length timed with backward")
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3, help="KV heads of vkt_layer's projections")
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-seconds", type=float, default=240.0, help="skip points predicted to take longer")
    parser.add_argument("--max-eager-gib", type=float, default=8.0, help="skip eager beyond this score matrix")
    parser.add_argument("--ref-max-length", type=int, default=262144, help="longest length for vkt_core_ref")
    parser.add_argument(
        "--in-process", action="store_true", help="no subprocess per point (CUDA memory is exact anyway)"
    )
    parser.add_argument("--out", default="docs/benchmarks/mixer_cpu.json")
    parser.add_argument("--plot", default=None, help="PNG path (default: --out with .png)")
    parser.add_argument("--point", nargs=3, metavar=("METHOD", "LENGTH", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.point:
        method, length, mode = args.point
        print("RESULT " + json.dumps(run_point(method, int(length), mode, args)), flush=True)
        return

    results, stopped = [], {}
    for mode in args.modes:
        for method in args.methods:
            if mode == "fwd+bwd" and method in ("none", "copy"):
                continue
            last = None
            for length in sorted(args.lengths):
                key = f"{method}/{mode}"
                if mode == "fwd+bwd" and length > args.bwd_max_length:
                    break
                if method == "vkt_core_ref" and length > args.ref_max_length:
                    stopped[key] = f"not run beyond {args.ref_max_length} tokens (--ref-max-length)"
                    break
                if method == "eager" and 2 * args.heads * length**2 * 4 / 2**30 > args.max_eager_gib:
                    stopped[key] = f"stopped before {length} tokens: score matrices > {args.max_eager_gib} GiB"
                    break
                if last is not None:
                    power = 2 if method in QUADRATIC else 1
                    predicted = last["seconds"] * (length / last["length"]) ** power
                    if predicted > args.max_seconds:
                        stopped[key] = (
                            f"stopped before {length} tokens: predicted {predicted:.0f} s per call "
                            f"(> --max-seconds {args.max_seconds:.0f})"
                        )
                        break
                point = _run_isolated(method, length, mode, args)
                if point is None:
                    stopped[key] = f"failed at {length} tokens (out of memory or error)"
                    break
                results.append(point)
                last = point
                print(f"{mode:8s} {method:13s} N={length:8d} {point['seconds'] * 1e3:10.1f} ms "
                      f"peak {point['peak_bytes'] / 2**20:9.1f} MiB", flush=True)  # fmt: skip
                write_json(args.out, _payload(args, results, stopped))
    payload = _payload(args, results, stopped)
    write_json(args.out, payload)
    for line in payload["ratios"]:
        print(line)
    plot(payload, args.plot or str(Path(args.out).with_suffix(".png")))


def _run_isolated(method: str, length: int, mode: str, args) -> dict | None:
    if args.in_process:
        try:
            return run_point(method, length, mode, args)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            return None
    cmd = [sys.executable, __file__, "--point", method, str(length), mode, "--heads", str(args.heads),
           "--kv-heads", str(args.kv_heads), "--dim", str(args.dim), "--dtype", args.dtype, "--device", args.device,
           "--repeats", str(args.repeats)] + (["--threads", str(args.threads)] if args.threads else [])  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    print(proc.stderr[-2000:], file=sys.stderr)
    return None


def _payload(args, results: list[dict], stopped: dict) -> dict:
    def get(method, length, mode="fwd"):
        return next(
            (r["seconds"] for r in results if (r["method"], r["length"], r["mode"]) == (method, length, mode)), None
        )

    ratios = []
    for length in sorted({r["length"] for r in results}):
        for mode in ("fwd", "fwd+bwd"):
            sdpa, core, layer = (
                get("sdpa", length, mode),
                get("vkt_core", length, mode),
                get("vkt_layer", length, mode),
            )
            copy = get("copy", length)
            if sdpa and core:
                ratios.append(f"N={length} {mode}: sdpa / vkt_core = {sdpa / core:.1f}x")
            if sdpa and layer:
                ratios.append(f"N={length} {mode}: sdpa / vkt_layer = {sdpa / layer:.1f}x")
            if mode == "fwd" and copy and core:
                ratios.append(f"N={length} fwd: vkt_core / copy of Q,K,V = {core / copy:.2f}x")
    return {
        "benchmark": "mixer",
        "command": " ".join(sys.argv),
        "machine": machine_info(args.device),
        "config": {
            "heads": args.heads,
            "kv_heads": args.kv_heads,
            "head_dim": args.dim,
            "batch": 1,
            "dtype": args.dtype,
            "vkt_preset": "default",
            "chunk": CHUNK,
            "local_window": 16,
        },  # fmt: skip
        "memory_method": "CUDA max_memory_allocated delta"
        if args.device.startswith("cuda") or args.in_process
        else "getrusage ru_maxrss high-water minus RSS after inputs, one subprocess per point",
        "results": results,
        "stopped": stopped,
        "ratios": ratios,
    }


def plot(payload: dict, path: str) -> None:
    """Time and peak memory vs length, log-log, one line per method and mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(13, 5))
    series: dict[tuple[str, str], list[dict]] = {}
    for r in payload["results"]:
        series.setdefault((r["method"], r["mode"]), []).append(r)
    for (method, mode), rows in sorted(series.items()):
        rows.sort(key=lambda r: r["length"])
        style = "-" if mode == "fwd" else "--"
        xs = [r["length"] for r in rows]
        ax_t.plot(xs, [r["seconds"] for r in rows], style, marker="o", label=f"{method} {mode}")
        ax_m.plot(xs, [max(r["peak_bytes"], 1) / 2**20 for r in rows], style, marker="o", label=f"{method} {mode}")
    machine = payload["machine"]
    title = f"{machine['device_name']} ({machine['cpu_cores']} cores), torch {machine['torch_version']}"
    for ax, label in ((ax_t, "seconds per call"), (ax_m, "peak memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length N (tokens)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=7)
    fig.suptitle(
        f"Mixer, H={payload['config']['heads']}, d={payload['config']['head_dim']}, batch 1 — {title}", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

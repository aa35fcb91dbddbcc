"""Training speed of one attention layer: converted VKT vs SDPA, forward + backward, in one run.

Both layers have SmolLM2-135M's attention shape (hidden 576, 9 heads of 64, 3 KV heads) and the
same projections: ``sdpa`` is q/k/v/o + RoPE + ``F.scaled_dot_product_attention(is_causal=True)``
(grouped-query heads), ``vkt`` is the ``VKTAttention`` a conversion installs (local softmax window
of 64 + 1 sink token, the VKT read-out as one slot of the window, decayed global mean, local mean,
``vkt_backend="auto"``: the hand-written backward passes of ``vkt_hf.ops.autograd``); with
``--vkt-backend auto reference`` also the same layer as autograd over the reference (the state before). Time: median of ``--repeats`` steps of
``loss = out.sum(); loss.backward()`` after one warm-up step, VKT and SDPA alternating at each
length so both see the same machine; every ratio in the JSON comes from this one run.

``--load-length``: also time the forward pass (no gradient) of both layers at that length while
``--busy`` other processes spin a Python busy loop on the machine's cores (a competing job).

Example::

    python benchmarks/layer_train.py --threads 2 --out docs/benchmarks/layer_train_cpu.json
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import machine_info, median, write_json  # noqa: E402

from vkt_hf.convert.common import resolve_vkt_options, vkt_layer_config  # noqa: E402
from vkt_hf.layers.vkt_attention import VKTAttention  # noqa: E402
from vkt_hf.ops import functional as vkt  # noqa: E402

DIMS = dict(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64, attention_bias=False)


class SDPALayer(nn.Module):
    """Llama-style attention with the same projections: q/k/v/o, RoPE, causal SDPA over grouped KV heads."""

    def __init__(self, hidden=576, heads=9, kv_heads=3, dim=64, theta=100000.0):
        super().__init__()
        self.heads, self.kv_heads, self.dim, self.theta = heads, kv_heads, dim, theta
        self.q_proj = nn.Linear(hidden, heads * dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_heads * dim, bias=False)
        self.o_proj = nn.Linear(heads * dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.heads, self.dim).transpose(1, 2)  # (B, H, N, d)
        k = self.k_proj(x).view(batch, length, self.kv_heads, self.dim).transpose(1, 2)  # (B, Hk, N, d)
        v = self.v_proj(x).view(batch, length, self.kv_heads, self.dim).transpose(1, 2)
        positions = torch.arange(length, device=x.device).expand(batch, length)
        cos, sin = vkt.rotary_cos_sin(positions, self.dim, self.theta)
        q, k = vkt.apply_rotary(q, cos, sin), vkt.apply_rotary(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # (B, H, N, d)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, self.heads * self.dim))


class ReferenceEnv(nn.Module):
    """``inner`` with ``VKT_BACKEND=reference`` set while its forward runs: every VKT op, the softmax
    window included, is then autograd over the reference (the backward follows the forward's choice)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor):
        before = os.environ.get("VKT_BACKEND")
        os.environ["VKT_BACKEND"] = "reference"
        try:
            return self.inner(x)
        finally:
            if before is None:
                del os.environ["VKT_BACKEND"]
            else:
                os.environ["VKT_BACKEND"] = before


def converted_vkt_layer(backend: str) -> nn.Module:
    """The layer a conversion of SmolLM2 installs (default preset, conversion defaults), fresh weights."""
    options = resolve_vkt_options("default", vkt_backend=backend)
    options.pop("preset")
    layer = VKTAttention(vkt_layer_config(DIMS, options))
    return ReferenceEnv(layer) if backend == "reference" else layer


def step(layer: nn.Module, x: torch.Tensor, train: bool) -> None:
    if train:
        out = layer(x)
        out = out[0] if isinstance(out, tuple) else out
        out.sum().backward()
    else:
        with torch.no_grad():
            layer(x)


def page_faults() -> int:
    """Minor page faults of this process so far (fresh pages the allocator had zeroed); 0 where unknown."""
    try:
        import resource
    except ImportError:  # not on Unix
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def timed(layer: nn.Module, x: torch.Tensor, train: bool) -> tuple[float, int]:
    """Seconds of one step, and the minor page faults it took."""
    faults = page_faults()
    start = time.perf_counter()
    step(layer, x, train)
    return time.perf_counter() - start, page_faults() - faults


def compare(layers: dict[str, nn.Module], length: int, train: bool, repeats: int) -> dict:
    """Alternating timed steps of every layer at one length; medians, all times and the ratio sdpa / vkt."""
    torch.manual_seed(0)
    x = torch.randn(1, length, DIMS["hidden_size"], requires_grad=train)
    steps: dict[str, list[tuple[float, int]]] = {name: [] for name in layers}
    for name, layer in layers.items():  # warm-up (allocator, thread pool); skipped for long calls
        if length <= 4096:
            steps[name].append(timed(layer, x, train))
    for _ in range(repeats):
        for name, layer in layers.items():
            steps[name].append(timed(layer, x, train))
    for name in layers:
        if len(steps[name]) > repeats:
            steps[name] = steps[name][1:]  # the warm-up step is not counted
    times = {name: [seconds for seconds, _ in taken] for name, taken in steps.items()}
    medians = {name: median(ts) for name, ts in times.items()}
    row = {"length": length, "mode": "fwd+bwd" if train else "fwd", "seconds": medians, "all_seconds": times}
    row["all_page_faults"] = {name: [faults for _, faults in taken] for name, taken in steps.items()}
    row["ratio_sdpa_over_vkt"] = {n: medians["sdpa"] / s for n, s in medians.items() if n != "sdpa"}
    return row


def busy_processes(count: int) -> list[subprocess.Popen]:
    """``count`` Python processes spinning on the CPU (a competing job), until terminated."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--vkt-backend",
        nargs="+",
        default=["auto"],
        help="VKT layers to time (vkt_backend values), e.g. auto reference",
    )
    parser.add_argument("--load-length", type=int, default=65536, help="forward-only length under load (0: skip)")
    parser.add_argument("--load-repeats", type=int, default=1)
    parser.add_argument("--busy", type=int, default=1, help="competing busy-loop processes during the load test")
    parser.add_argument("--out", default="docs/benchmarks/layer_train_cpu.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    layers: dict[str, nn.Module] = {f"vkt_{b}" if len(args.vkt_backend) > 1 else "vkt": converted_vkt_layer(b)
                                    for b in args.vkt_backend}  # fmt: skip
    layers["sdpa"] = SDPALayer()
    payload = {"machine": machine_info(), "args": vars(args), "env_VKT_BACKEND": os.environ.get("VKT_BACKEND")}
    rows = []
    for length in args.lengths:
        rows.append(compare(layers, length, True, args.repeats))
        print(rows[-1]["mode"], length, rows[-1]["seconds"], rows[-1]["ratio_sdpa_over_vkt"], flush=True)
    if args.load_length:
        busy = busy_processes(args.busy)
        try:
            time.sleep(1.0)
            row = compare(layers, args.load_length, False, args.load_repeats)
        finally:
            for proc in busy:
                proc.terminate()
                proc.wait()
        row["busy_processes"] = args.busy
        row["load_average_after"] = os.getloadavg()
        rows.append(row)
        print("fwd under load", args.load_length, row["seconds"], row["ratio_sdpa_over_vkt"], flush=True)
    payload["results"] = rows
    write_json(args.out, payload)


if __name__ == "__main__":
    main()

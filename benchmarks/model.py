"""Model-level benchmark: SmolLM2-135M original (KV cache) vs all-VKT vs a hybrid, vs context.

For each variant and context length ``L`` (one subprocess per point, so the RSS high-water
mark is that point's own):

* **prefill** (``--prefill``): the ``L`` tokens go through the model in chunks of
  ``--chunk`` tokens carrying the cache (``logits_to_keep=1``), so activations stay bounded;
  tokens/s and peak RSS (``getrusage`` high-water minus RSS after loading the model).
* **decode**: ``--decode-tokens`` greedy steps one token at a time after the context; median
  seconds per token (two warm-up steps first). Where the context was not really prefilled
  (without ``--prefill``, for lengths where a 2-core CPU cannot prefill the original in the time
  given) the cache is *synthetic*: random keys/values of length ``L`` for softmax layers, and
  for VKT layers the (fixed-size) state after a real 4096-token prefill with its token count
  set to ``L``. The per-token cost depends only on the cache's size, which is exact; the
  JSON marks those points ``synthetic_context: true``.
* **cache bytes**: the KV cache of softmax layers (keys + values) and the VKT state of VKT
  layers, measured on the cache object after the context.

Variants: ``original`` (the Llama checkpoint with transformers' ``DynamicCache``), ``vkt``
(every layer converted by ``vkt_hf.convert_to_vkt``), ``hybrid`` (layers 0, 10 and 20 stay
softmax, the other 27 VKT). Conversion weights are untrained here: speed and memory only.

Example::

    python benchmarks/model.py --variants vkt original hybrid --lengths 1024 4096 16384 \\
        --prefill --out docs/benchmarks/model_cpu.json
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import machine_info, median, peak_rss_bytes, rss_bytes, write_json  # noqa: E402

VARIANTS = ("original", "vkt", "hybrid")
DEFAULT_MODEL = ".cache/vkt-hf/smollm2-135m-instruct"


def load(variant: str, path: str):
    """The model of ``variant`` in float32, eval mode."""
    from transformers import AutoModelForCausalLM

    import vkt_hf

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    layers = model.config.num_hidden_layers
    if variant == "vkt":
        model = vkt_hf.convert_to_vkt(model, layers="all")
    elif variant == "hybrid":
        model = vkt_hf.convert_to_vkt(model, layers=[i for i in range(layers) if i % 10 != 0])
    return model.eval()


def cache_bytes(cache) -> dict:
    """Bytes of the KV cache (softmax layers) and of the VKT states, in total and per layer."""
    from vkt_hf.cache import VKTStateLayer, layer_nbytes

    per_layer = [("vkt" if isinstance(layer, VKTStateLayer) else "kv", layer_nbytes(layer)) for layer in cache.layers]
    kv = sum(n for kind, n in per_layer if kind == "kv")
    state = sum(n for kind, n in per_layer if kind == "vkt")
    return {"kv_cache_bytes": kv, "vkt_state_bytes": state, "per_layer": per_layer}


@torch.no_grad()
def run_point(variant: str, length: int, args) -> dict:
    from transformers import DynamicCache

    from vkt_hf.cache import VKTStateLayer
    from vkt_hf.evaluation import new_cache
    from vkt_hf.models.vkt.modeling_vkt import CACHE_FIELD

    torch.manual_seed(0)
    model = load(variant, args.model)
    vocab = model.config.vocab_size
    ids = torch.randint(100, vocab, (1, length))
    gc.collect()
    base = rss_bytes()
    cache = new_cache(model) or DynamicCache()  # a hybrid needs a VKTCache (its length comes from the states)
    result = {"variant": variant, "length": length, "synthetic_context": not args.prefill}
    if args.prefill:
        start = time.perf_counter()
        for a in range(0, length, args.chunk):
            out = model(input_ids=ids[:, a : a + args.chunk], **{CACHE_FIELD: cache}, use_cache=True, logits_to_keep=1)
        result["prefill_seconds"] = time.perf_counter() - start
        result["prefill_tokens_per_s"] = length / result["prefill_seconds"]
    else:  # synthetic context of `length` tokens (see the module docstring)
        warm = min(length, 4096)
        out = model(input_ids=ids[:, :warm], **{CACHE_FIELD: cache}, use_cache=True, logits_to_keep=1)
        cfg = model.config
        kv_heads, dim = cfg.num_key_value_heads, cfg.head_dim
        for layer in cache.layers:
            if isinstance(layer, VKTStateLayer):
                layer.seen_tokens = length
            else:
                layer.keys = torch.randn(1, kv_heads, length, dim)
                layer.values = torch.randn(1, kv_heads, length, dim)
    result.update(cache_bytes(cache))
    token = out.logits[:, -1:].argmax(-1)
    gc.collect()
    before_decode = rss_bytes()  # memory held once the context is in the cache
    result["context_rss_delta_bytes"] = before_decode - base
    steps = []
    for _ in range(args.decode_tokens + 2):
        start = time.perf_counter()
        out = model(input_ids=token, **{CACHE_FIELD: cache}, use_cache=True)
        steps.append(time.perf_counter() - start)
        token = out.logits[:, -1:].argmax(-1)
    result["decode_seconds_per_token"] = median(steps[2:])
    result["decode_all_seconds"] = steps[2:]
    result["peak_rss_delta_bytes"] = max(peak_rss_bytes() - base, 0)
    result["decode_rss_growth_bytes"] = rss_bytes() - before_decode  # what decoding itself added
    result["cache_seq_length"] = cache.get_seq_length()
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="SmolLM2 checkpoint folder (scripts/fetch_smollm2.py)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 65536, 131072])
    parser.add_argument(
        "--prefill", action="store_true", help="really prefill the context (else synthetic, see above)"
    )
    parser.add_argument("--chunk", type=int, default=4096, help="prefill chunk (tokens per forward)")
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--max-seconds", type=float, default=1800.0, help="per point; later lengths are skipped")
    parser.add_argument("--out", default="docs/benchmarks/model_cpu.json")
    parser.add_argument("--append", action="store_true", help="add to the results already in --out")
    parser.add_argument("--point", nargs=2, metavar=("VARIANT", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.point:
        print("RESULT " + json.dumps(run_point(args.point[0], int(args.point[1]), args)), flush=True)
        return
    previous = json.loads(Path(args.out).read_text()) if args.append and Path(args.out).exists() else None
    results = previous["results"] if previous else []
    stopped = previous.get("stopped", {}) if previous else {}
    commands = (previous.get("commands", []) if previous else []) + [" ".join(sys.argv)]
    for variant in args.variants:
        for length in sorted(args.lengths):
            cmd = [sys.executable, __file__, "--point", variant, str(length), "--model", args.model, "--chunk",
                   str(args.chunk), "--decode-tokens", str(args.decode_tokens)]  # fmt: skip
            cmd += (["--prefill"] if args.prefill else []) + (["--threads", str(args.threads)] if args.threads else [])
            key = f"{variant}/{'prefill' if args.prefill else 'synthetic'}"
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.max_seconds)
            except subprocess.TimeoutExpired:
                stopped[key] = f"stopped at {length} tokens: over --max-seconds {args.max_seconds:.0f} s"
                break
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                print(proc.stderr[-3000:], file=sys.stderr)
                stopped[key] = f"failed at {length} tokens"
                break
            point = json.loads(line[7:])
            results.append(point)
            speed = f"prefill {point['prefill_tokens_per_s']:8.0f} tok/s" if args.prefill else "synthetic"
            print(
                f"{variant:9s} L={length:8d} {speed:>22s}"
                f"  decode {point['decode_seconds_per_token'] * 1e3:7.1f} ms/tok  peak {point['peak_rss_delta_bytes'] / 2**20:8.1f} MiB"
                f"  kv {point['kv_cache_bytes'] / 2**20:8.1f} MiB  vkt-state {point['vkt_state_bytes'] / 2**20:6.2f} MiB",
                flush=True,
            )
            write_json(args.out, {"benchmark": "model", "commands": commands, "machine": machine_info("cpu"),
                                  "model": args.model, "results": results, "stopped": stopped})  # fmt: skip
    payload = {"benchmark": "model", "commands": commands, "machine": machine_info("cpu"), "model": args.model,
               "results": results, "stopped": stopped}  # fmt: skip
    write_json(args.out, payload)
    plot(payload, str(Path(args.out).with_suffix(".png")))


def plot(payload: dict, path: str) -> None:
    """Prefill tokens/s, decode ms/token, peak memory and cache bytes vs context length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4.5))
    series: dict[tuple[str, bool], list[dict]] = {}
    for r in payload["results"]:
        series.setdefault((r["variant"], r["synthetic_context"]), []).append(r)
    for (variant, synthetic), rows in sorted(series.items()):
        rows.sort(key=lambda r: r["length"])
        xs = [r["length"] for r in rows]
        label = f"{variant}{' (synthetic ctx)' if synthetic else ''}"
        style = "--" if synthetic else "-"
        if not synthetic:
            axes[0].plot(xs, [r["prefill_tokens_per_s"] for r in rows], style, marker="o", label=label)
        axes[1].plot(xs, [r["decode_seconds_per_token"] * 1e3 for r in rows], style, marker="o", label=label)
        axes[2].plot(xs, [r["peak_rss_delta_bytes"] / 2**20 for r in rows], style, marker="o", label=label)
        axes[3].plot(
            xs, [(r["kv_cache_bytes"] + r["vkt_state_bytes"]) / 2**20 for r in rows], style, marker="o", label=label
        )
    titles = ["prefill tokens/s", "decode ms / token", "peak RSS delta (MiB)", "cache bytes (MiB, all layers)"]
    for ax, title in zip(axes, titles):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("context length (tokens)")
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=7)
    m = payload["machine"]
    fig.suptitle(
        f"SmolLM2-135M, float32, batch 1 — {m['device_name']} ({m['cpu_cores']} cores), torch {m['torch_version']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

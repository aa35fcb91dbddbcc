"""Print the targets table of ``docs/performance.md`` from the benchmark JSON files.

Example::

    python benchmarks/report.py --mixer docs/benchmarks/mixer_cpu.json --model docs/benchmarks/model_cpu.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _get(results: list[dict], **match) -> dict | None:
    return next((r for r in results if all(r.get(k) == v for k, v in match.items())), None)


def mixer_rows(payload: dict) -> list[str]:
    res = payload["results"]
    rows = []
    sdpa = sorted((r for r in res if r["method"] == "sdpa" and r["mode"] == "fwd"), key=lambda r: r["length"])
    last = sdpa[-1] if sdpa else None
    for length, target in ((65536, 20), (262144, 100)):
        core = _get(res, method="vkt_core", length=length, mode="fwd")
        layer = _get(res, method="vkt_layer", length=length, mode="fwd")
        s = _get(res, method="sdpa", length=length, mode="fwd")
        if s is not None:
            sdpa_s, how = s["seconds"], "measured"
        elif last is not None:
            sdpa_s, how = last["seconds"] * (length / last["length"]) ** 2, f"extrapolated N^2 from {last['length']}"
        else:
            continue
        for name, r in (("core", core), ("layer", layer)):
            if r is None:
                continue
            ratio = sdpa_s / r["seconds"]
            verdict = "met" if ratio >= target else f"missed ({ratio / target:.2f} of target)"
            rows.append(
                f"| mixer fwd vs SDPA causal, N={length}, VKT {name} | >= {target}x | "
                f"{ratio:.1f}x (SDPA {sdpa_s:.1f} s {how}, VKT {r['seconds']:.2f} s) | {verdict} |"
            )
    for length in sorted({r["length"] for r in res if r["method"] == "copy"}):
        core, copy = _get(res, method="vkt_core", length=length, mode="fwd"), _get(res, method="copy", length=length)
        if core and copy and length >= 65536:
            ratio = core["seconds"] / copy["seconds"]
            verdict = "met" if ratio <= 3 else f"missed by {ratio / 3:.2f}x"
            rows.append(f"| VKT core / copy of Q,K,V, N={length} | <= 3x | {ratio:.2f}x | {verdict} |")
    return rows


def model_rows(payload: dict) -> list[str]:
    res = payload["results"]
    rows = []
    for variant in ("vkt", "hybrid", "original"):
        pts = sorted((r for r in res if r["variant"] == variant and r["synthetic_context"]), key=lambda r: r["length"])
        if len(pts) < 2:
            continue
        a, b = pts[0], pts[-1]
        lat = b["decode_seconds_per_token"] / a["decode_seconds_per_token"] - 1
        mem = (b["kv_cache_bytes"] + b["vkt_state_bytes"]) / max(a["kv_cache_bytes"] + a["vkt_state_bytes"], 1)
        rows.append(
            f"| decode {variant}: latency {a['length']} -> {b['length']} | flat within 10% (VKT) | "
            f"{a['decode_seconds_per_token'] * 1e3:.0f} -> {b['decode_seconds_per_token'] * 1e3:.0f} ms/token ({lat:+.0%}) | "
            f"{'met' if abs(lat) <= 0.10 else 'see text'} |"
        )
        rows.append(
            f"| decode {variant}: cache bytes {a['length']} -> {b['length']} | VKT flat, KV linear | "
            f"{(a['kv_cache_bytes'] + a['vkt_state_bytes']) / 2**20:.2f} -> {(b['kv_cache_bytes'] + b['vkt_state_bytes']) / 2**20:.2f} MiB "
            f"(x{mem:.1f} for x{b['length'] / a['length']:.0f} tokens) | |"
        )
        rows.append(
            f"| decode {variant}: peak RSS delta {a['length']} -> {b['length']} | flat (VKT) | "
            f"{a['peak_rss_delta_bytes'] / 2**20:.0f} -> {b['peak_rss_delta_bytes'] / 2**20:.0f} MiB | |"
        )
    for r in sorted((r for r in res if not r["synthetic_context"]), key=lambda r: (r["variant"], r["length"])):
        rows.append(
            f"| prefill {r['variant']} {r['length']} tokens (4k chunks) | | {r['prefill_tokens_per_s']:.0f} tok/s, "
            f"peak RSS delta {r['peak_rss_delta_bytes'] / 2**20:.0f} MiB | |"
        )
    return rows


def layer_train_rows(payload: dict) -> list[str]:
    """The training targets (``benchmarks/layer_train.py``): SDPA / VKT from one run."""
    rows, threads = [], payload["args"]["threads"]
    setting = f"{threads} thread(s)"
    if any(name.startswith("MALLOC_") for name in payload.get("machine", {}).get("environment", {})):
        setting += ", glibc malloc keeping freed memory"
    targets = {("fwd+bwd", 2048): 1.5, ("fwd+bwd", 4096): 2.5, ("fwd", 65536): 10.0}
    for r in payload["results"]:
        goal = targets.get((r["mode"], r["length"]))
        ratio = r["ratio_sdpa_over_vkt"].get("vkt", r["ratio_sdpa_over_vkt"].get("vkt_auto"))
        if goal is None or ratio is None:
            continue
        what = "fwd, one competing busy process" if "busy_processes" in r else r["mode"]
        rows.append(
            f"| layer {what} vs SDPA, N={r['length']}, {setting} | >= {goal:g}x | {ratio:.2f}x "
            f"(VKT {r['seconds'].get('vkt', r['seconds'].get('vkt_auto')):.2f} s, SDPA {r['seconds']['sdpa']:.2f} s) | "
            f"{'met' if ratio >= goal else 'not met'} |"
        )
    return rows


def decode_rows(payload: dict) -> list[str]:
    """The decoding targets (``benchmarks/decode.py``): VKT / original ms per token after a 1k prompt, and
    VKT's latency across context lengths, each from one run."""
    rows, args = [], payload["args"]
    setting = f"{args['threads']} thread(s)" + (f", {args['busy']} busy process(es)" if args.get("busy") else "")
    points = sorted(payload["rows"], key=lambda r: r["length"])
    first = next((r for r in points if r["length"] == 1024 and r.get("original_ms")), None)
    if first is not None:
        rows.append(
            f"| decode after a 1k prompt vs the original, converted SmolLM2 shape, {setting} | <= 0.8x | "
            f"{first['ratio']:.3f}x ({first['vkt_ms']:.1f} vs {first['original_ms']:.1f} ms/token) | "
            f"{'met' if first['ratio'] <= 0.8 else 'not met'} |"
        )
    if len(points) > 2:
        # flat: no context length decodes more than 10% slower than the shortest one
        growth = max(r["vkt_ms"] for r in points) / points[0]["vkt_ms"] - 1
        latencies = " / ".join(f"{r['vkt_ms']:.1f}" for r in points)
        rows.append(
            f"| decode flat from {points[0]['length']:,} to {points[-1]['length']:,} tokens (VKT), {setting} | "
            f"flat | {latencies} ms/token (slowest vs the shortest context {growth:+.0%}) | "
            f"{'met' if growth <= 0.10 else 'not met'} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mixer", default="docs/benchmarks/mixer_cpu.json")
    parser.add_argument("--model", default="docs/benchmarks/model_cpu.json")
    parser.add_argument(
        "--layer-train",
        nargs="*",
        default=[f"docs/benchmarks/layer_train_cpu_{name}.json" for name in ("1thread", "1thread_malloc", "2threads")],
    )
    parser.add_argument(
        "--decode",
        nargs="*",
        default=[
            f"docs/benchmarks/decode_cpu_{name}.json" for name in ("1t", "1t_kernel_vs_eager", "2t_quiet", "2t_busy")
        ],
    )
    args = parser.parse_args()
    print("| target | goal | measured | verdict |\n|---|---|---|---|")
    if Path(args.mixer).exists():
        print("\n".join(mixer_rows(json.loads(Path(args.mixer).read_text()))))
    if Path(args.model).exists():
        print("\n".join(model_rows(json.loads(Path(args.model).read_text()))))
    for path in args.layer_train:
        if Path(path).exists():
            print("\n".join(layer_train_rows(json.loads(Path(path).read_text()))))
    for path in args.decode:
        if Path(path).exists():
            print("\n".join(decode_rows(json.loads(Path(path).read_text()))))


if __name__ == "__main__":
    main()

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
    targets = {("fwd+bwd", 2048): 1.5, ("fwd+bwd", 4096): 2.5, ("fwd", 65536): 10.0}
    for r in payload["results"]:
        goal = targets.get((r["mode"], r["length"]))
        ratio = r["ratio_sdpa_over_vkt"].get("vkt", r["ratio_sdpa_over_vkt"].get("vkt_auto"))
        if goal is None or ratio is None:
            continue
        what = "fwd, one competing busy process" if "busy_processes" in r else r["mode"]
        rows.append(
            f"| layer {what} vs SDPA, N={r['length']}, {threads} thread(s) | >= {goal:g}x | {ratio:.2f}x "
            f"(VKT {r['seconds'].get('vkt', r['seconds'].get('vkt_auto')):.2f} s, SDPA {r['seconds']['sdpa']:.2f} s) | "
            f"{'met' if ratio >= goal else 'not met'} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mixer", default="docs/benchmarks/mixer_cpu.json")
    parser.add_argument("--model", default="docs/benchmarks/model_cpu.json")
    parser.add_argument(
        "--layer-train",
        nargs="*",
        default=["docs/benchmarks/layer_train_cpu_1thread.json", "docs/benchmarks/layer_train_cpu_2threads.json"],
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


if __name__ == "__main__":
    main()

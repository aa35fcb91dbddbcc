#!/usr/bin/env python3
"""How much float rounding the literal ratio ``s / (K . T)`` amplifies, as a function of ``eps``.

Random tiny ``paper``-preset models (float32); for each ``eps`` the largest difference between the
logits of one whole pass and of (a) random chunk splits and (b) token-by-token decoding through the
cache. The numbers behind the ``eps`` default in ``docs/method.md``::

    python benchmarks/conditioning.py --out docs/benchmarks/conditioning.json
"""

from __future__ import annotations

import argparse
import json

import torch

import vkt_hf
from vkt_hf.models.vkt.modeling_vkt import CACHE_FIELD


def max_chunk_difference(model: vkt_hf.VKTForCausalLM, ids: torch.Tensor, bounds: list[int]) -> float:
    """Largest |logit difference| between one pass and the same tokens fed in chunks ``bounds``."""
    with torch.no_grad():
        whole = model(ids, use_cache=False).logits
        cache, parts = None, []
        for start, end in zip(bounds[:-1], bounds[1:]):
            out = model(ids[:, start:end], **{CACHE_FIELD: cache}, use_cache=True)
            cache = getattr(out, CACHE_FIELD)
            parts.append(out.logits)
    return (torch.cat(parts, dim=1) - whole).abs().max().item()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eps", type=float, nargs="+", default=[1e-6, 1e-4, 1e-3, 1e-2])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--splits", type=int, default=10, help="random chunk splits per seed")
    parser.add_argument("--tokens", type=int, default=40)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    rows = []
    for eps in args.eps:
        split_worst = decode_worst = 0.0
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            config = vkt_hf.VKTConfig(
                vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, local_window=3, preset="paper", eps=eps,
            )  # fmt: skip
            model = vkt_hf.VKTForCausalLM(config).eval()
            gen = torch.Generator().manual_seed(seed)
            ids = torch.randint(0, 97, (2, args.tokens), generator=gen)
            for _ in range(args.splits):
                cuts = sorted(torch.randperm(args.tokens - 1, generator=gen)[:4].add(1).tolist())
                split_worst = max(split_worst, max_chunk_difference(model, ids, [0, *cuts, args.tokens]))
            decode_worst = max(decode_worst, max_chunk_difference(model, ids, list(range(args.tokens + 1))))
        rows.append({"eps": eps, "max_diff_random_splits": split_worst, "max_diff_token_by_token": decode_worst})
        print(f"eps={eps:g}  random splits {split_worst:.2e}  token by token {decode_worst:.2e}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

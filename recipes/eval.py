#!/usr/bin/env python3
"""Evaluate a causal LM on long documents: perplexity, perplexity by position, streaming
perplexity of a whole book, passkey retrieval and generation samples.

    python recipes/eval.py --run_dir runs/main/vkt                  # a training run: its model + held-out docs
    python recipes/eval.py --model path/to/model --data .cache/vkt-hf/corpus \\
        --val_documents '[austen_persuasion]' --out_dir runs/eval/x

Writes ``<out_dir>/results.json`` (``<run_dir>/eval/`` by default) and PNG plots
(``positions.png``, ``streaming.png``, ``passkey.png``). Every field of
:class:`vkt_hf.eval_job.EvalConfig` is a flag; the computations are in :mod:`vkt_hf.evaluation`.
"""

from __future__ import annotations

import sys

import vkt_hf  # noqa: F401  (registers the VKT model classes with the Auto* factories)
from vkt_hf.config_loading import load_dataclass, run_recipe
from vkt_hf.eval_job import EvalConfig, evaluate_model


def main(argv: list[str] | None = None) -> int:
    evaluate_model(load_dataclass(EvalConfig, argv, __doc__))
    return 0


if __name__ == "__main__":
    sys.exit(run_recipe("eval.py", main))

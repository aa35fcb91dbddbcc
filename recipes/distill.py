#!/usr/bin/env python3
"""Staged distillation of a converted model: both stages in one resumable command.

* Stage 1, attention transfer (``mode: distill``): each VKT layer, fed the original attention's
  input, learns to reproduce its output (MSE per layer, logged as ``mse_layer_<i>``); only the
  new VKT parameters train.
* Stage 2, end to end (``mode: finetune``): the whole converted model on next-token prediction
  mixed with the KL divergence to the original model's logits (``kd_weight``, ``kd_temperature``),
  LoRA or full fine-tuning, the new VKT parameters training too (``train_vkt_params``).

::

    python recipes/distill.py --stage1 recipes/configs/smollm2_stage1_half.yaml \\
        --stage2 recipes/configs/smollm2_stage2_half.yaml

Stage 2 starts from stage 1's model (``<stage 1 output_dir>/model``, whatever its config says).
Further flags (any field of :class:`vkt_hf.training.TrainConfig`, e.g. ``--num_threads 2``) apply
to both stages. A rerun skips a finished stage (its ``run.json`` exists; a stage stopped by its
``time_limit_minutes`` counts as finished) and resumes an interrupted one from its latest
checkpoint. Each stage writes what ``recipes/train.py`` writes to its own ``output_dir``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from vkt_hf.config_loading import run_recipe
from vkt_hf.training import TrainConfig, load_config, train

SHARED_FORBIDDEN = ("--output_dir", "--model_name_or_path", "--mode", "--config")


def stage_configs(argv: list[str] | None = None) -> tuple[TrainConfig, TrainConfig]:
    """Both stages' configs: their YAML files, the shared flags, and stage 2 chained to stage 1's model."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage1", required=True, help="YAML of stage 1 (mode: distill)")
    parser.add_argument("--stage2", required=True, help="YAML of stage 2 (mode: finetune)")
    args, shared = parser.parse_known_args(argv)
    bad = [flag for flag in shared if flag.split("=")[0] in SHARED_FORBIDDEN]
    if bad:
        parser.error(f"{bad} differ per stage: set them in each stage's YAML")
    first = load_config(["--config", args.stage1, *shared])
    second = load_config(["--config", args.stage2, *shared])
    if (first.mode, second.mode) != ("distill", "finetune"):
        parser.error(f"stage 1 must be mode distill and stage 2 finetune, got {first.mode} and {second.mode}")
    if Path(first.output_dir).resolve() == Path(second.output_dir).resolve():
        parser.error("the two stages need different output_dir")
    chained = str(Path(first.output_dir) / "model")
    if second.model_name_or_path != chained:
        print(f"[distill] stage 2 starts from stage 1's model {chained} (not {second.model_name_or_path})")
        second.model_name_or_path = chained
    return first, second


def run_stage(name: str, cfg: TrainConfig) -> dict[str, Any]:
    """Train one stage, unless it finished before (then its ``run.json``)."""
    done = Path(cfg.output_dir) / "run.json"
    if done.exists():
        print(f"[distill] {name}: finished before ({done}), skipped", flush=True)
        return json.loads(done.read_text())
    print(f"[distill] {name}: {cfg.mode}, {cfg.max_steps} steps -> {cfg.output_dir}", flush=True)
    return train(cfg)


def main(argv: list[str] | None = None) -> int:
    stages = dict(zip(("stage 1", "stage 2"), stage_configs(argv)))
    for name, cfg in stages.items():
        summary = run_stage(name, cfg)
        if summary["stopped"] == "killed":
            print(f"[distill] {name} stopped at step {summary['step']}: rerun the command to resume", flush=True)
            return 1
        final = summary["final"]
        print(f"[distill] {name} done: step {final['step']}, val_loss {final['val_loss']:.4f}", flush=True)
    print(f"[distill] model: {Path(stages['stage 2'].output_dir) / 'model'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_recipe("distill.py", main))

#!/usr/bin/env python3
"""Train VKT models: ``pretrain``, ``distill`` (attention transfer) or ``finetune`` (full / LoRA,
optionally with a KL term to a teacher's logits). The trainer is :mod:`vkt_hf.training`.

One run = one config: a YAML file (``--config recipes/configs/<name>.yaml``) and/or flags
(``--lr 3e-4``; every field of :class:`vkt_hf.training.TrainConfig` is a flag; dicts and lists
take YAML, e.g. ``--model_config '{hidden_size: 128}'``). Runs with plain ``python`` or with
``accelerate launch`` (DDP / FSDP / DeepSpeed configs in ``recipes/accelerate/``)::

    python recipes/train.py --config recipes/configs/pretrain_tiny.yaml
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 recipes/train.py --config recipes/configs/pretrain_tiny.yaml

Output (``output_dir``): ``model/``, ``metrics.jsonl``, ``run.json`` and ``checkpoints/step_N/``;
a rerun with the same ``output_dir`` resumes from the latest checkpoint. Both stages of the
staged distillation of SmolLM2 in one command: ``recipes/distill.py``.
"""

from __future__ import annotations

import sys

from vkt_hf import training
from vkt_hf.config_loading import run_recipe


def main(argv: list[str] | None = None) -> int:
    training.train(training.load_config(argv, f"{__doc__}\n{training.__doc__}"))
    return 0


if __name__ == "__main__":
    sys.exit(run_recipe("train.py", main))

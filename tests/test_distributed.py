"""The accelerate configs of ``recipes/accelerate/`` on 2 CPU processes (gloo), and FSDP2 sharding on CPU.

What runs where is in ``docs/distributed.md``: accelerate 1.15 runs DDP and FSDP configs on CPU processes as DDP
(it shards on GPUs only), so the sharding itself is checked with torch's ``fully_shard`` on a CPU mesh over gloo,
with the wrap units accelerate takes from ``_no_split_modules``. DeepSpeed needs GPUs: not run here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}


def launcher(name: str) -> str:
    return shutil.which(name, path=str(Path(sys.executable).parent)) or name


@pytest.mark.parametrize("config", ["ddp.yaml", "fsdp.yaml"])
def test_accelerate_configs_train_on_two_cpu_processes(config, tmp_path):
    out = tmp_path / "run"
    cmd = [launcher("accelerate"), "launch", "--config_file", str(ROOT / "recipes" / "accelerate" / config)]
    cmd += ["--num_processes", "2", "--mixed_precision", "no", str(ROOT / "recipes" / "train.py")]
    cmd += ["--data", str(ROOT / "tests" / "fixtures" / "books"), "--val_documents", "[sonnets]", "--seq_len", "64"]
    cmd += ["--batch_size", "2", "--max_steps", "4", "--save_every", "2", "--eval_every", "4", "--eval_batches", "1"]
    cmd += ["--model_config", json.dumps(TINY), "--output_dir", str(out), "--progress", "false", "--num_threads", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert run["world_size"] == 2 and run["final"]["step"] == 4
    if config == "fsdp.yaml":  # said plainly, not silently
        assert "accelerate runs it as DDP" in proc.stdout


def test_fsdp2_shards_native_and_hybrid_models_on_cpu_over_gloo():
    cmd = [launcher("torchrun"), "--nproc_per_node", "2", str(ROOT / "tests" / "fsdp_worker.py")]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ok native" in proc.stdout and "ok hybrid" in proc.stdout, proc.stdout

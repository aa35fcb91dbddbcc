"""vkt_hf.training and the recipes: configs, resume after a kill, 2-process DDP, distillation and LoRA fine-tuning."""

from __future__ import annotations

import json
import math
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import vkt_hf
from vkt_hf import training
from vkt_hf.data import get_tokenizer

ROOT = Path(__file__).resolve().parent.parent
BOOKS = ROOT / "tests" / "fixtures" / "books"
TINY = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "local_window": 4,
}


def tiny_args(out: Path, **extra) -> list[str]:
    args = dict(
        data=str(BOOKS),
        val_documents="[sonnets]",
        seq_len=64,
        batch_size=4,
        lr=3e-3,
        warmup_steps=2,
        eval_every=4,
        eval_batches=2,
        log_every=1,
        save_every=2,
        progress="false",
        num_threads=1,
        model_config=json.dumps(TINY),
        output_dir=str(out),
    )
    args.update({k: str(v) for k, v in extra.items()})
    return [item for k, v in args.items() for item in (f"--{k}", str(v))]


# conversions without the exact local softmax window: on these short texts the window alone reproduces
# the teacher's attention almost exactly, leaving nothing for the VKT parameters to learn
NO_WINDOW = "{local_attention: false}"


def run_train(argv: list[str]) -> dict:
    return training.train(training.load_config(argv))


def losses(run: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def test_config_yaml_and_flags(tmp_path):
    (tmp_path / "c.yaml").write_text("mode: pretrain\nlr: 0.01\nmixer: softmax\nmodel_config: {hidden_size: 48}\n")
    cfg = training.load_config(["--config", str(tmp_path / "c.yaml"), "--lr", "2e-4", "--doc_boundaries", "no"])
    assert (cfg.lr, cfg.mixer, cfg.model_config, cfg.doc_boundaries) == (2e-4, "softmax", {"hidden_size": 48}, False)
    with pytest.raises(ValueError, match="unknown config fields"):
        (tmp_path / "bad.yaml").write_text("learning_rate: 1\n")
        training.load_config(["--config", str(tmp_path / "bad.yaml")])
    with pytest.raises(ValueError, match="model_name_or_path"):
        training.load_config(["--mode", "distill"])
    for path in sorted((ROOT / "recipes" / "configs").glob("*.yaml")):
        training.load_config(["--config", str(path)])  # every shipped config is valid


def test_resume_after_kill_gives_the_same_loss_curve(tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    run_train(tiny_args(full, max_steps=7))
    # "killed" after step 5: the latest checkpoint is step 4, so step 5 is redone after the resume
    assert run_train(tiny_args(killed, max_steps=7, stop_after_steps=5))["stopped"] == "killed"
    assert not (killed / "run.json").exists() and [s for s, _ in losses(killed)] == [1, 2, 3, 4, 5]
    run_train(tiny_args(killed, max_steps=7))
    assert [s for s, _ in losses(killed)] == list(range(1, 8))
    assert [loss for _, loss in losses(killed)] == pytest.approx([loss for _, loss in losses(full)], rel=1e-6)
    a, b = load_file(full / "model" / "model.safetensors"), load_file(killed / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    run = json.loads((killed / "run.json").read_text())
    assert run["final"]["step"] == 7 and run["final"]["val_loss"] == pytest.approx(
        json.loads((full / "run.json").read_text())["final"]["val_loss"], rel=1e-6
    )


def test_softmax_baseline_has_the_same_size(tmp_path):
    summaries = {}
    for mixer in ("vkt", "softmax"):
        summaries[mixer] = training.train(
            training.load_config(tiny_args(tmp_path / mixer, max_steps=1, mixer=mixer, save_every=0))
        )
    assert summaries["softmax"]["model"]["mixer_types"] == ["softmax", "softmax"]
    sizes = [s["model"]["parameters"] for s in summaries.values()]
    assert abs(sizes[0] - sizes[1]) / sizes[1] < 0.05
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "softmax" / "model")
    assert isinstance(model, vkt_hf.VKTForCausalLM) and model.config.mixer_types == ["softmax", "softmax"]


def test_ddp_two_processes_train(tmp_path):
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    out = tmp_path / "ddp"
    # `--cpu --num_processes 2` starts 2 processes only under mpirun; the torchrun launcher (`--multi_gpu`)
    # does it anywhere, and the recipe picks CPU + gloo when there is no GPU
    cmd = [
        accelerate,
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
    ]
    cmd += ["--dynamo_backend", "no", str(ROOT / "recipes" / "train.py")]
    cmd += tiny_args(out, max_steps=6, lr=1e-2, eval_every=6)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert run["world_size"] == 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert all(len(r["rank_losses"]) == 2 and all(map(math.isfinite, r["rank_losses"])) for r in steps)
    assert steps[0]["rank_losses"][0] != steps[0]["rank_losses"][1]  # the ranks saw different data
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert 0.9 * 6 * 2 * 4 * 64 < steps[-1]["tokens"] <= 6 * 2 * 4 * 64  # 2 ranks x 4 rows x 64 tokens per step
    assert steps[0]["lr"] == pytest.approx(1e-2 / 2)  # the schedule counts optimizer steps (warmup 2)


def save_tiny_llama(path: Path, **overrides) -> Path:
    """A random 2-layer Llama with the byte tokenizer, saved locally (stands in for SmolLM2)."""
    torch.manual_seed(0)
    tok = get_tokenizer("byte")
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        **overrides,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def sharp_llama(tmp_path_factory) -> Path:
    """Like ``tiny_llama`` with 15x larger weights: peaked next-token distributions (a teacher worth distilling;
    the default init gives near-uniform ones, from which any student is a tiny KL away)."""
    return save_tiny_llama(tmp_path_factory.mktemp("sharp_llama"), initializer_range=0.3)


def transfer_mse(student, teacher, ids: torch.Tensor) -> float:
    """The attention-transfer loss of ``student``'s VKT layers on ``ids``."""
    layers = training.vkt_layers(student)
    recorder = training.AttentionRecorder(teacher, [m.layer_idx for m in layers])
    with torch.no_grad():
        teacher(input_ids=ids, use_cache=False)
        records = [recorder.records[m.layer_idx] for m in layers]
        per_layer = training.AttentionTransfer(layers)(
            [r[0] for r in records], [r[1] for r in records], torch.ones_like(ids), [r[2] for r in records]
        )
    recorder.remove()
    return float(per_layer.mean())


def test_distill_trains_only_new_vkt_parameters(tmp_path, tiny_llama):
    out = tmp_path / "distill"
    args = tiny_args(out, mode="distill", max_steps=8, model_name_or_path=tiny_llama, convert_layers="0", lr=1e-2)
    args += ["--vkt_options", NO_WINDOW]
    # the importance V starts at 0, where a = s / (K . T) is steepest: Adam's first steps there overshoot
    # (measured: the transfer loss rises), so this run keeps it frozen
    summary = training.train(training.load_config([*args, "--freeze_params", "[importance]"]))
    student = AutoModelForCausalLM.from_pretrained(out / "model")
    teacher = AutoModelForCausalLM.from_pretrained(tiny_llama)
    before = vkt_hf.convert_to_vkt(AutoModelForCausalLM.from_pretrained(tiny_llama), layers="0", local_attention=False)
    ids = torch.tensor([list((BOOKS / "sonnets.txt").read_bytes()[:128])]) + 3  # held-out text
    assert transfer_mse(student, teacher, ids) < 0.9 * transfer_mse(before, teacher, ids)
    s, b = student.state_dict(), before.state_dict()
    changed = {k for k in s if not torch.equal(s[k], b[k])}
    kept = (*training.PRETRAINED_PROJECTIONS, "importance")
    assert changed and all(".layers.0.self_attn." in k and not any(n in k for n in kept) for k in changed)
    # only new parameters of the converted layer; the pretrained weights and `importance` are untouched
    assert 0 < summary["model"]["trainable_parameters"] < summary["model"]["parameters"] / 10


def test_finetune_lora_saves_a_merged_model(tmp_path, tiny_llama):
    out = tmp_path / "ft"
    args = tiny_args(out, mode="finetune", max_steps=2, model_name_or_path=tiny_llama, convert_layers="all")
    summary = training.train(training.load_config([*args, "--lora_r", "4", "--save_every", "1"]))
    assert summary["model"]["trainable_parameters"] < summary["model"]["parameters"] / 4
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert not any("lora" in k for k in model.state_dict())
    assert len(training.vkt_layers(model)) == 2
    assert (out / "checkpoints" / "step_000002" / "model" / "adapter_config.json").exists()


def test_from_scratch_comparison_quick_run_writes_report_and_cards(tmp_path):
    out, cards = tmp_path / "main_scratch", tmp_path / "cards"
    script = str(ROOT / "recipes" / "main_scratch.py")
    cmd = [sys.executable, script, "--quick", "--out", str(out), "--cards_dir", str(cards)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert set(report["models"]) == {"vkt", "softmax"} and report["steps"] >= 1
    assert all(m["eval"]["streaming"]["ppl"] > 1 for m in report["models"].values())
    assert (out / "report.md").read_text().count("| vkt |") == 1
    for name in ("vkt", "softmax"):
        card = (cards / f"vkt-hf-main-scratch-{name}.md").read_text()
        assert card.startswith("---") and "model-index" in card


def recipe(name: str) -> dict:
    """The globals of ``recipes/<name>.py`` (a script, not a module of the package)."""
    return runpy.run_path(str(ROOT / "recipes" / f"{name}.py"), run_name=f"recipe_{name}")


def metric_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_distill_logs_the_mse_of_every_layer(tmp_path, tiny_llama):
    out = tmp_path / "distill"
    args = tiny_args(out, mode="distill", max_steps=6, model_name_or_path=tiny_llama, convert_layers="all", lr=1e-2)
    run_train([*args, "--vkt_options", NO_WINDOW, "--freeze_params", "[importance]"])
    rows = [r for r in metric_rows(out) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 7))
    for row in rows:  # the loss is the mean of the per-layer MSEs, both logged
        assert {k for k in row if k.startswith("mse_layer_")} == {"mse_layer_0", "mse_layer_1"}
        assert row["loss"] == pytest.approx((row["mse_layer_0"] + row["mse_layer_1"]) / 2, rel=1e-5)
    assert rows[-1]["mse_layer_0"] < rows[0]["mse_layer_0"] and rows[-1]["mse_layer_1"] < rows[0]["mse_layer_1"]
    bar = training.postfix(rows[-1], ["mse_layer_0", "mse_layer_1"])
    assert bar.startswith("loss=") and " L0=" in bar and " L1=" in bar


def test_kd_loss_is_the_lm_loss_at_weight_0_and_the_kl_at_weight_1(sharp_llama):
    student = vkt_hf.convert_to_vkt(
        AutoModelForCausalLM.from_pretrained(sharp_llama), layers="all", local_attention=False
    )
    teacher = AutoModelForCausalLM.from_pretrained(sharp_llama)
    ids = torch.tensor([list((BOOKS / "emma.txt").read_bytes()[:64])]) + 3
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
    setup = training.Setup(student, student, teacher, part_names=["lm_loss", "kl"])
    lm = student(**batch).loss
    p_teacher = teacher(input_ids=ids).logits.softmax(-1)
    kl = (p_teacher * (p_teacher.log() - student(input_ids=ids).logits.log_softmax(-1))).sum(-1).mean()
    assert float(kl) > 0.01  # the converted student differs from its teacher
    for weight, expected in ((0.0, lm), (1.0, kl), (0.25, 0.75 * lm + 0.25 * kl)):
        loss, parts = training.training_loss(setup, batch, training.TrainConfig(kd_weight=weight))
        assert float(loss) == pytest.approx(float(expected), rel=1e-5)
        assert parts.tolist() == pytest.approx([float(lm), float(kl)], rel=1e-5)
    same = training.logit_kl(teacher(input_ids=ids).logits, teacher(input_ids=ids).logits, torch.ones_like(ids))
    assert float(same) == pytest.approx(0.0, abs=1e-6)


def held_out_kl(student, teacher) -> float:
    ids = torch.tensor([list((BOOKS / "sonnets.txt").read_bytes()[:256])]) + 3
    with torch.no_grad():
        return float(
            training.logit_kl(student(input_ids=ids).logits, teacher(input_ids=ids).logits, torch.ones_like(ids))
        )


def test_finetune_with_kd_lowers_the_kl_to_the_teacher(tmp_path, sharp_llama):
    teacher = AutoModelForCausalLM.from_pretrained(sharp_llama)
    kl = {}
    for weight in (0.0, 1.0):
        out = tmp_path / f"kd{weight}"
        args = tiny_args(out, mode="finetune", max_steps=8, model_name_or_path=sharp_llama, convert_layers="all")
        args += ["--teacher_name_or_path", str(sharp_llama), "--kd_weight", str(weight), "--lr", "3e-2"]
        args += ["--vkt_options", NO_WINDOW]
        args += ["--lora_r", "8", "--train_vkt_params", "true", "--eval_every", "0", "--save_every", "0"]
        summary = run_train(args)
        assert summary["config"]["kd_weight"] == weight
        kl[weight] = held_out_kl(AutoModelForCausalLM.from_pretrained(out / "model"), teacher)
        rows = [r for r in metric_rows(out) if "loss" in r]
        assert all(("kl" in r) == (weight > 0) for r in rows)  # the parts are logged when a teacher is used
    converted = vkt_hf.convert_to_vkt(
        AutoModelForCausalLM.from_pretrained(sharp_llama), layers="all", local_attention=False
    )
    before = held_out_kl(converted, teacher)
    assert kl[1.0] < 0.85 * before and kl[1.0] < 0.85 * kl[0.0]  # measured: 0.78 and 0.63


def test_finetune_lora_on_the_original_model(tmp_path, tiny_llama):
    """The quality reference: the unconverted model fine-tuned with the stage-2 recipe (LoRA, KD, VKT flag)."""
    out = tmp_path / "reference"
    args = tiny_args(out, mode="finetune", max_steps=2, model_name_or_path=tiny_llama, convert_layers="null")
    args += ["--teacher_name_or_path", str(tiny_llama), "--kd_weight", "0.5", "--lora_r", "8"]
    summary = run_train([*args, "--train_vkt_params", "true"])
    lora_params = 2 * (2 * 8 * (32 + 32) + 2 * 8 * (32 + 16))  # 2 layers; r=8; q/o: 32 -> 32; k/v: 32 -> 16
    assert summary["model"]["trainable_parameters"] == lora_params
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert isinstance(model, LlamaForCausalLM) and not any("lora" in k for k in model.state_dict())


def write_stage_configs(tmp_path: Path, tiny_llama: Path) -> list[str]:
    common = {
        "data": str(BOOKS), "val_documents": ["sonnets"], "seq_len": 64, "batch_size": 4, "warmup_steps": 1,
        "eval_batches": 1, "log_every": 1, "save_every": 2, "progress": False, "num_threads": 1,
        "teacher_name_or_path": str(tiny_llama),
    }  # fmt: skip
    stage1 = {**common, "mode": "distill", "model_name_or_path": str(tiny_llama), "convert_layers": "all"}
    stage1.update(max_steps=4, lr=1e-2, eval_every=4, output_dir=str(tmp_path / "stage1"))
    stage2 = {**common, "mode": "finetune", "model_name_or_path": "unused", "kd_weight": 0.5, "lora_r": 8}
    stage2.update(train_vkt_params=True, max_steps=3, lr=1e-3, eval_every=3, output_dir=str(tmp_path / "stage2"))
    (tmp_path / "stage1.yaml").write_text(json.dumps(stage1))  # JSON is YAML
    (tmp_path / "stage2.yaml").write_text(json.dumps(stage2))
    return ["--stage1", str(tmp_path / "stage1.yaml"), "--stage2", str(tmp_path / "stage2.yaml")]


def test_staged_distillation_runs_both_stages_and_resumes(tmp_path, tiny_llama, capsys):
    distill = recipe("distill")
    argv = write_stage_configs(tmp_path, tiny_llama)
    assert distill["main"]([*argv, "--stop_after_steps", "3"]) == 1  # "killed" in stage 1 after step 3
    assert not (tmp_path / "stage1" / "run.json").exists() and not (tmp_path / "stage2").exists()
    assert distill["main"](argv) == 0  # stage 1 resumes from its step-2 checkpoint, then stage 2 runs
    out = capsys.readouterr().out
    assert "resumed from" in out and "step_000002" in out
    assert [r["step"] for r in metric_rows(tmp_path / "stage1") if "loss" in r] == [1, 2, 3, 4]
    run2 = json.loads((tmp_path / "stage2" / "run.json").read_text())
    assert run2["model"]["base_model"] == str(tmp_path / "stage1" / "model") and run2["final"]["step"] == 3
    assert all("kl" in r for r in metric_rows(tmp_path / "stage2") if "loss" in r)
    stamps = [(tmp_path / s / "run.json").stat().st_mtime_ns for s in ("stage1", "stage2")]
    assert distill["main"](argv) == 0  # both finished: skipped
    assert capsys.readouterr().out.count("skipped") == 2
    assert stamps == [(tmp_path / s / "run.json").stat().st_mtime_ns for s in ("stage1", "stage2")]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "stage2" / "model")
    assert len(training.vkt_layers(model)) == 2 and not any("lora" in k for k in model.state_dict())


def test_stage_time_limit_counts_as_finished(tmp_path, tiny_llama):
    distill = recipe("distill")
    argv = write_stage_configs(tmp_path, tiny_llama)
    assert distill["main"]([*argv, "--time_limit_minutes", "1e-9"]) == 0  # each stage stops after one step
    for stage in ("stage1", "stage2"):
        run = json.loads((tmp_path / stage / "run.json").read_text())
        assert run["stopped"] == "time_limit" and run["final"]["step"] == 1 and "val_loss" in run["final"]

#!/usr/bin/env python3
"""Train VKT models: ``pretrain``, ``distill`` (attention transfer) or ``finetune`` (full / LoRA).

One run = one config: a YAML file (``--config recipes/configs/<name>.yaml``) and/or flags
(``--lr 3e-4``; every field of :class:`TrainConfig` is a flag; dicts and lists take YAML,
e.g. ``--model_config '{hidden_size: 128}'``). Runs with plain ``python`` or with
``accelerate launch`` (DDP / FSDP / DeepSpeed configs in ``recipes/accelerate/``)::

    python recipes/train.py --config recipes/configs/pretrain_tiny.yaml
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 recipes/train.py --config recipes/configs/pretrain_tiny.yaml

Modes:

* ``pretrain`` -- a fresh :class:`~vkt_hf.VKTForCausalLM` from ``model_config`` (``mixer:
  softmax`` / ``none`` turns every layer into the same-size baseline).
* ``distill`` -- attention transfer (LoLCATs-style): the student is a converted model
  (``model_name_or_path`` of a saved hybrid, or a base model plus ``convert_layers``); a frozen
  copy of the original model (``teacher_name_or_path``) runs on real text, hooks record the
  input and output of each original attention layer, and each VKT layer is trained, fed the
  same input, to reproduce that output (MSE over real tokens). Only the new VKT parameters
  are trained (``distill_params: new``) or the whole VKT layers (``attention``).
* ``finetune`` -- causal-LM training of a (converted) model, full or LoRA (``lora_r > 0``).

Output (``output_dir``): ``model/`` (``save_pretrained`` + tokenizer), ``metrics.jsonl`` (one
JSON object per log / eval event), ``run.json`` (config, data, model size, final metrics) and
``checkpoints/step_N/`` (accelerate state -- model, optimizer, scheduler, RNG -- plus
``trainer_state.json`` with the data position, and ``model/``). A rerun with the same
``output_dir`` resumes from the latest checkpoint and continues exactly where it stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.data_loader import prepare_data_loader, skip_first_batches
from accelerate.utils import set_seed
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, get_cosine_schedule_with_warmup

import vkt_hf
from vkt_hf.data import bits_per_byte, prepare_data

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _config import load_dataclass  # noqa: E402

from vkt_hf.evaluation import sequence_nll
from vkt_hf.layers import VKTAttention, vkt_layers

MODES = ("pretrain", "distill", "finetune")
PRETRAINED_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class TrainConfig:
    """Everything one training run needs (every field is also a command-line flag)."""

    mode: str = "pretrain"
    output_dir: str = "runs/train"
    run_name: str | None = None
    seed: int = 0
    # data
    data: str = ".cache/vkt-hf/corpus"  # Hub name, .txt file, folder (manifest.json) or glob
    dataset_name: str | None = None  # how cards name the data (default: the source)
    data_split: str = "train"
    text_column: str = "text"
    tokenizer: str | None = None  # "byte", a tokenizer dir / Hub name; default: the model's, else "byte"
    seq_len: int = 256
    doc_boundaries: bool = True  # no training sequence crosses a document boundary
    val_documents: list[str] = field(default_factory=list)
    val_fraction: float = 0.1
    max_documents: int | None = None
    max_chars: int | None = None
    # model
    model_config: dict[str, Any] = field(default_factory=dict)  # VKTConfig arguments (pretrain)
    mixer: str | None = None  # pretrain: "vkt" / "softmax" / "none" in every layer
    model_name_or_path: str | None = None  # distill / finetune: the (converted) model
    teacher_name_or_path: str | None = None  # distill: the original softmax model
    convert_layers: str | None = None  # convert `model_name_or_path` on load ("all", "even", "0,2")
    vkt_options: dict[str, Any] = field(default_factory=dict)  # options of that conversion
    distill_params: str = "new"  # "new": only parameters conversion added; "attention": whole VKT layers
    freeze_params: list[str] = field(default_factory=list)  # distill / finetune: keep these VKT parameters frozen
    lora_r: int = 0  # finetune: LoRA rank (0 = full fine-tuning)
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(default_factory=lambda: list(PRETRAINED_PROJECTIONS))
    train_vkt_params: bool = False  # finetune with LoRA: also train the new VKT parameters
    # optimisation
    max_steps: int = 100
    batch_size: int = 8  # sequences per process per micro-batch
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 10
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"  # "no", "bf16", "fp16" (where the device supports it)
    gradient_checkpointing: bool = False
    # evaluation, logging, checkpoints
    eval_every: int = 50
    eval_batches: int = 16
    log_every: int = 10
    save_every: int = 50
    save_total_limit: int = 2
    report_to: str = "none"  # an accelerate tracker: "tensorboard", "wandb", ... (installed separately)
    resume: bool = True
    stop_after_steps: int | None = None  # stop after this many steps as if killed (no final save)
    time_limit_minutes: float | None = None  # stop early (with a final save) when exceeded
    num_threads: int | None = None
    cpu: bool | None = None  # force CPU; default: CPU when no accelerator device is present
    progress: bool = True

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.mode in ("distill", "finetune") and not self.model_name_or_path:
            raise ValueError(f"mode {self.mode!r} needs model_name_or_path")
        if self.mode == "distill" and not (self.teacher_name_or_path or self.convert_layers):
            raise ValueError("distill needs teacher_name_or_path (or convert_layers, to convert the teacher's copy)")
        if self.distill_params not in ("new", "attention"):
            raise ValueError(f"distill_params must be 'new' or 'attention', got {self.distill_params!r}")


# --- configuration from YAML + flags -------------------------------------------------------


def load_config(argv: list[str] | None = None) -> TrainConfig:
    """``TrainConfig`` from ``--config`` YAML, then flags (every field is a flag)."""
    cfg = load_dataclass(TrainConfig, argv, __doc__)
    cfg.validate()
    return cfg


# --- models --------------------------------------------------------------------------------


def load_causal_lm(path: str, convert_layers: str | None = None, vkt_options: dict | None = None) -> nn.Module:
    """``AutoModelForCausalLM`` from ``path`` (float32), converted to VKT when ``convert_layers`` is given."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if convert_layers:
        model = vkt_hf.convert_to_vkt(model, layers=convert_layers, **(vkt_options or {}))
    return model


def build_pretrain_model(cfg: TrainConfig, tokenizer: Any) -> nn.Module:
    """A fresh ``VKTForCausalLM`` (or the model at ``model_name_or_path``) sized to the tokenizer."""
    if cfg.model_name_or_path:
        return load_causal_lm(cfg.model_name_or_path)
    kwargs = dict(cfg.model_config)
    kwargs.setdefault("vocab_size", len(tokenizer))
    kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    kwargs.setdefault("eos_token_id", tokenizer.eos_token_id)
    kwargs.setdefault("bos_token_id", tokenizer.bos_token_id)
    if cfg.mixer:
        kwargs["mixer_types"] = [cfg.mixer] * kwargs.get("num_hidden_layers", vkt_hf.VKTConfig().num_hidden_layers)
    return vkt_hf.VKTForCausalLM(vkt_hf.VKTConfig(**kwargs))


def new_vkt_parameters(layer: VKTAttention, exclude: list[str] | tuple[str, ...] = ()) -> list[nn.Parameter]:
    """Parameters a converted VKT layer added (not the reused pretrained projections), minus ``exclude``
    (names like ``"importance"``, ``"readout_gate"``)."""
    skip = (*PRETRAINED_PROJECTIONS, *exclude)
    return [p for name, p in layer.named_parameters() if name.split(".")[0] not in skip]


class AttentionTransfer(nn.Module):
    """The trainable part of distillation: each VKT layer fed the teacher's attention input.

    ``forward(inputs, targets, mask)`` returns the mean over layers of the MSE between each
    VKT layer's output and the original attention's output, over real tokens.
    """

    def __init__(self, layers: list[VKTAttention]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, inputs: list[torch.Tensor], targets: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        weight = mask.float()
        total = torch.zeros((), device=mask.device)
        for layer, x, y in zip(self.layers, inputs, targets):
            out = layer(x, attention_mask=mask)[0]
            err = (out.float() - y.float()).pow(2).mean(-1)  # (B, N)
            total = total + (err * weight).sum() / weight.sum().clamp(min=1)
        return total / len(self.layers)


class AttentionRecorder:
    """Forward hooks on the teacher's attention modules recording ``(input hidden states, output)``."""

    def __init__(self, teacher: nn.Module, layer_indices: list[int]):
        from vkt_hf.convert import family_for

        family = family_for(teacher.config)
        blocks = family.layers(teacher)
        self.records: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.handles = []
        for index in layer_indices:
            module = getattr(blocks[index], family.attention_name)
            self.handles.append(module.register_forward_hook(self._hook(index), with_kwargs=True))

    def _hook(self, index: int):
        def hook(module, args, kwargs, output):
            hidden = args[0] if args else kwargs["hidden_states"]
            out = output[0] if isinstance(output, tuple) else output
            self.records[index] = (hidden.detach(), out.detach())

        return hook


# --- the loop ------------------------------------------------------------------------------


def _latest_checkpoint(output_dir: Path) -> Path | None:
    ckpts = sorted((output_dir / "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
    ckpts = [c for c in ckpts if (c / "trainer_state.json").exists()]
    return ckpts[-1] if ckpts else None


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric rows after ``step`` (they are recomputed after a resume)."""
    if path.exists():
        rows = [line for line in path.read_text().splitlines() if line.strip()]
        path.write_text("".join(r + "\n" for r in rows if json.loads(r).get("step", 0) <= step))


def _count(params) -> int:
    return sum(p.numel() for p in params)


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run one training job; returns the summary also written to ``run.json``."""
    cfg.validate()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    out_dir = Path(cfg.output_dir)
    # without a GPU, DDP processes started by `accelerate launch --multi_gpu` / torchrun use CPU + gloo
    cpu = cfg.cpu if cfg.cpu is not None else not torch.accelerator.is_available()
    accelerator = Accelerator(
        cpu=cpu,
        step_scheduler_with_optimizer=False,  # the schedule counts optimizer steps, whatever the world size
        mixed_precision=cfg.mixed_precision,
        log_with=None if cfg.report_to in ("none", "", None) else cfg.report_to,
        project_dir=str(out_dir),
    )
    main = accelerator.is_main_process
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
    set_seed(cfg.seed)

    # data: the tokenizer defaults to the model's own
    tok_spec = cfg.tokenizer or cfg.model_name_or_path or cfg.teacher_name_or_path or "byte"
    data = prepare_data(
        cfg.data,
        tok_spec,
        cfg.seq_len,
        doc_boundaries=cfg.doc_boundaries,
        val_documents=cfg.val_documents or None,
        val_fraction=cfg.val_fraction,
        seed=cfg.seed,
        split=cfg.data_split,
        text_column=cfg.text_column,
        max_documents=cfg.max_documents,
        max_chars=cfg.max_chars,
    )
    tokenizer = data["tokenizer"]
    if len(data["train"]) < cfg.batch_size * accelerator.num_processes:
        raise ValueError(f"only {len(data['train'])} training sequences; lower batch_size or seq_len")

    # model and what is trained
    set_seed(cfg.seed)
    teacher = recorder = None
    if cfg.mode == "pretrain":
        model = build_pretrain_model(cfg, tokenizer)
    else:
        model = load_causal_lm(cfg.model_name_or_path, cfg.convert_layers, cfg.vkt_options)
    if cfg.mode == "distill":
        teacher = load_causal_lm(cfg.teacher_name_or_path or cfg.model_name_or_path).to(accelerator.device).eval()
        teacher.requires_grad_(False)
        layers = vkt_layers(model)
        if not layers:
            raise ValueError("distill: the student has no VKT layers (convert it first or set convert_layers)")
        model.requires_grad_(False)
        for layer in layers:
            if cfg.distill_params == "new":
                params = new_vkt_parameters(layer, cfg.freeze_params)
            else:
                params = [p for n, p in layer.named_parameters() if n.split(".")[0] not in cfg.freeze_params]
            for p in params:
                p.requires_grad_(True)
        recorder = AttentionRecorder(teacher, [layer.layer_idx for layer in layers])
        trained: nn.Module = AttentionTransfer(layers)
    elif cfg.mode == "finetune" and cfg.lora_r > 0:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=cfg.lora_target_modules,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
        if cfg.train_vkt_params:
            for layer in vkt_layers(model):
                for p in new_vkt_parameters(layer, cfg.freeze_params):
                    p.requires_grad_(True)
        trained = model
    else:
        trained = model
    model.to(accelerator.device)
    if cfg.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable()
    params = [p for p in trained.parameters() if p.requires_grad]
    total_params, trainable_params = _count(model.parameters()), _count(params)
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    scheduler = get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.max_steps)
    trained, optimizer, scheduler = accelerator.prepare(trained, optimizer, scheduler)
    unwrapped = accelerator.unwrap_model(trained)
    if cfg.mode == "distill":
        model_for_eval = model
    else:
        model_for_eval = unwrapped

    def loader(dataset, batch_size: int, order: list[int] | None, even: bool = True):
        subset = torch.utils.data.Subset(dataset, order if order is not None else range(len(dataset)))
        dl = torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False, drop_last=even)
        return prepare_data_loader(
            dl,
            device=accelerator.device,
            num_processes=accelerator.num_processes,
            process_index=accelerator.process_index,
            put_on_device=True,
            even_batches=even,
        )

    def epoch_loader(epoch: int):
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
        return loader(data["train"], cfg.batch_size, torch.randperm(len(data["train"]), generator=generator).tolist())

    val_loader = loader(data["val"], cfg.batch_size, None, even=False)
    per_epoch = len(epoch_loader(0))

    # resume
    step, micro, tokens, elapsed_before = 0, 0, 0, 0.0
    metrics_path = out_dir / "metrics.jsonl"
    ckpt = _latest_checkpoint(out_dir) if cfg.resume else None
    if ckpt is not None:
        accelerator.load_state(str(ckpt))
        state = json.loads((ckpt / "trainer_state.json").read_text())
        step, micro, tokens, elapsed_before = state["step"], state["micro_step"], state["tokens"], state["elapsed"]
        if main:
            _truncate_metrics(metrics_path, step)
            print(f"[train] resumed from {ckpt} (step {step})", flush=True)
    elif main and metrics_path.exists():
        metrics_path.unlink()
    accelerator.wait_for_everyone()
    if accelerator.log_with:
        accelerator.init_trackers(cfg.run_name or out_dir.name, config=_flat(dataclasses.asdict(cfg)))

    def batches(start: int):
        position = start
        while True:
            epoch, offset = divmod(position, per_epoch)
            dl = epoch_loader(epoch)
            for batch in skip_first_batches(dl, offset) if offset else dl:
                position += 1
                yield batch

    def log(row: dict[str, Any]) -> None:
        if main:
            with metrics_path.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
        if accelerator.log_with:
            accelerator.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=row["step"])

    def evaluate() -> dict[str, float]:
        model_for_eval.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
        for i, batch in enumerate(val_loader):
            if i >= cfg.eval_batches:
                break
            nll = sequence_nll(model_for_eval, batch["input_ids"], batch["attention_mask"])
            keep = batch["labels"][:, 1:] != -100
            sums += torch.stack([nll[keep].double().sum(), keep.sum().double()])
        sums = accelerator.reduce(sums, reduction="sum")
        model_for_eval.train()
        loss = float(sums[0] / sums[1].clamp(min=1))
        return {
            "val_loss": loss,
            "val_ppl": math.exp(min(loss, 80)),
            "val_bpb": bits_per_byte(loss, data["bytes_per_token"]),
        }

    def save_checkpoint() -> None:
        ckpt_dir = out_dir / "checkpoints" / f"step_{step:06d}"
        accelerator.save_state(str(ckpt_dir))
        if main:
            save_model(ckpt_dir / "model")
            state = {"step": step, "micro_step": micro, "tokens": tokens, "elapsed": elapsed()}
            (ckpt_dir / "trainer_state.json").write_text(json.dumps(state, indent=2))
            ckpts = sorted((out_dir / "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
            for old in ckpts[: max(0, len(ckpts) - cfg.save_total_limit)]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()

    def save_model(path: Path) -> None:
        target = model if cfg.mode == "distill" else unwrapped
        target.save_pretrained(path)
        tokenizer.save_pretrained(path)

    start_time = time.time()

    def elapsed() -> float:
        return elapsed_before + time.time() - start_time

    trained.train()
    if teacher is not None:
        model.train()
    stream = batches(micro)
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not (main and cfg.progress), desc=f"{cfg.mode}")
    stopped = None
    last_eval: dict[str, float] = {}
    while step < cfg.max_steps:
        losses = []
        for k in range(cfg.grad_accum):
            batch = next(stream)
            micro += 1
            tokens += int(batch["attention_mask"].sum()) * accelerator.num_processes
            sync = contextlib.nullcontext() if k == cfg.grad_accum - 1 else accelerator.no_sync(trained)
            with sync:
                if cfg.mode == "distill":
                    with torch.no_grad():
                        teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
                    idx = [m.layer_idx for m in unwrapped.layers]
                    loss = trained(
                        [recorder.records[i][0] for i in idx],
                        [recorder.records[i][1] for i in idx],
                        batch["attention_mask"],
                    )
                else:
                    loss = trained(**batch, use_cache=False).loss
                accelerator.backward(loss / cfg.grad_accum)
            losses.append(loss.detach().float())
        if cfg.max_grad_norm:
            accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        local = torch.stack(losses).mean()
        per_rank = accelerator.gather(local[None])
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            row = {"step": step, "loss": float(per_rank.mean()), "lr": scheduler.get_last_lr()[0], "tokens": tokens}
            row.update(elapsed=round(elapsed(), 2), rank_losses=[float(x) for x in per_rank])
            log(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}")
        if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.max_steps):
            last_eval = evaluate()
            log({"step": step, **last_eval})
        if cfg.save_every and step % cfg.save_every == 0:
            save_checkpoint()
        if cfg.stop_after_steps is not None and step >= cfg.stop_after_steps:
            stopped = "killed"  # simulated kill: no final save, resume picks up the latest checkpoint
            break
        if cfg.time_limit_minutes and elapsed() > 60 * cfg.time_limit_minutes and step < cfg.max_steps:
            stopped = "time_limit"
            break
    bar.close()
    if recorder is not None:
        for handle in recorder.handles:
            handle.remove()
    summary: dict[str, Any] = {"stopped": stopped, "step": step}
    if stopped == "killed":
        accelerator.end_training()
        return summary
    if not last_eval or stopped:
        last_eval = evaluate()
        log({"step": step, **last_eval})
    if cfg.mode == "finetune" and cfg.lora_r > 0:
        model_for_eval = unwrapped = unwrapped.merge_and_unload()  # save a plain model
    summary = {
        "name": cfg.run_name or out_dir.name,
        "mode": cfg.mode,
        "stopped": stopped,
        "config": dataclasses.asdict(cfg),
        "model": {
            "class": type(unwrapped if cfg.mode != "distill" else model).__name__,
            "parameters": total_params,
            "trainable_parameters": trainable_params,
            "mixer_types": getattr(model.config, "mixer_types", None),
            "base_model": cfg.model_name_or_path if cfg.mode != "pretrain" else None,
        },
        "data": {
            "source": cfg.data,
            "name": cfg.dataset_name or cfg.data,
            "tokenizer": tok_spec,
            "train_documents": list(data["train_docs"]["name"]),
            "val_documents": list(data["val_docs"]["name"]),
            "train_sequences": len(data["train"]),
            "val_sequences": len(data["val"]),
            "seq_len": cfg.seq_len,
            "bytes_per_token": data["bytes_per_token"],
        },
        "final": {"step": step, "tokens": tokens, "train_time_s": round(elapsed(), 1), **last_eval},
        "world_size": accelerator.num_processes,
    }
    if main:
        save_model(out_dir / "model")
        (out_dir / "run.json").write_text(json.dumps(summary, indent=2))
        print(f"[train] done: {out_dir / 'model'}  val_loss={last_eval['val_loss']:.4f}", flush=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def _flat(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (v if isinstance(v, (int, float, str, bool)) else json.dumps(v)) for k, v in d.items()}


def main(argv: list[str] | None = None) -> int:
    train(load_config(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())

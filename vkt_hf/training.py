"""Training of VKT models: ``pretrain``, ``distill`` (attention transfer) or ``finetune`` (full / LoRA).

One run = one :class:`TrainConfig` (``recipes/train.py`` fills it from a YAML file and flags).
Runs with plain ``python`` or under ``accelerate launch`` (DDP / FSDP / DeepSpeed).

Modes (one small setup function each, :data:`SETUPS`):

* ``pretrain`` -- a fresh :class:`~vkt_hf.VKTForCausalLM` from ``model_config`` (``mixer:
  softmax`` / ``none`` turns every layer into the same-size baseline).
* ``distill`` -- stage 1 of staged distillation, attention transfer (LoLCATs-style): the student
  is a converted model (``model_name_or_path`` of a saved hybrid, or a base model plus
  ``convert_layers``); a frozen copy of the original model (``teacher_name_or_path``) runs on
  real text, hooks record the input and output of each original attention layer, and each VKT
  layer is trained, fed the same input, to reproduce that output (MSE over real tokens, logged
  per layer as ``mse_layer_<i>``). Only the new VKT parameters are trained (``distill_params:
  new``) or the whole VKT layers (``attention``).
* ``finetune`` -- stage 2, causal-LM training of a (converted or original) model, full or LoRA
  (``lora_r > 0``; ``train_vkt_params`` also trains the new VKT parameters). With ``kd_weight >
  0`` the loss is ``(1 - kd_weight) * next-token loss + kd_weight * KL(teacher || student)`` of
  the next-token distributions at ``kd_temperature`` (the teacher: ``teacher_name_or_path``,
  frozen, on the same inputs); ``lm_loss`` and ``kl`` are logged.

Output (``output_dir``): ``model/`` (``save_pretrained`` + tokenizer; LoRA merged), ``metrics.jsonl``
(one JSON object per log / eval event), ``run.json`` (config, data, model size, final metrics) and
``checkpoints/step_N/`` (accelerate state -- model, optimizer, scheduler, RNG -- plus
``trainer_state.json`` with the data position, and ``model/``). A rerun with the same
``output_dir`` resumes from the latest checkpoint and continues exactly where it stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.data_loader import prepare_data_loader, skip_first_batches
from accelerate.utils import DistributedType, set_seed
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, PretrainedConfig, get_cosine_schedule_with_warmup

from . import convert_to_vkt, evaluation
from .config_loading import (
    ConfigError,
    Interrupted,
    check_local,
    load_dataclass,
    unknown_keys_error,
    write_text_atomic,
)
from .convert import family_for
from .data import StreamingPackedDataset, bits_per_byte, prepare_data, prepare_streaming_data
from .layers import VKTAttention, vkt_layers
from .models.vkt import VKTConfig, VKTForCausalLM

MODES = ("pretrain", "distill", "finetune")
PRETRAINED_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
#: what ``model_config`` may hold: the arguments of VKTConfig and of transformers' PretrainedConfig
MODEL_CONFIG_KEYS = {
    name
    for cls in (VKTConfig, PretrainedConfig)
    for name, p in inspect.signature(cls.__init__).parameters.items()
    if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
} | {"output_attentions", "torch_dtype"}


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
    streaming: bool = False  # stream `data` (Hub / local dataset), packed on the fly: nothing downloaded ahead
    val_split: str | None = None  # streaming: validation documents from this split (else the stream's first)
    val_count: int = 8  # streaming: how many validation documents
    # model
    model_config: dict[str, Any] = field(default_factory=dict)  # VKTConfig arguments (pretrain)
    mixer: str | None = None  # pretrain: "vkt" / "softmax" / "none" in every layer
    model_name_or_path: str | None = None  # distill / finetune: the (converted) model
    teacher_name_or_path: str | None = None  # distill, finetune with kd_weight > 0: the original model
    convert_layers: str | None = None  # convert `model_name_or_path` on load ("all", "even", "0,2"; null: as saved)
    vkt_options: dict[str, Any] = field(default_factory=dict)  # options of that conversion
    distill_params: str = "new"  # "new": only parameters conversion added; "attention": whole VKT layers
    freeze_params: list[str] = field(default_factory=list)  # distill / finetune: keep these VKT parameters frozen
    lora_r: int = 0  # finetune: LoRA rank (0 = full fine-tuning)
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(default_factory=lambda: list(PRETRAINED_PROJECTIONS))
    train_vkt_params: bool = False  # finetune with LoRA: also train the new VKT parameters
    kd_weight: float = 0.0  # finetune: weight of the KL to the teacher's logits (0: next-token loss only, 1: KL only)
    kd_temperature: float = 1.0  # finetune: temperature of both distributions in that KL (scaled by T^2)
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
        """Raise :class:`~vkt_hf.config_loading.ConfigError` (one line for the user) on a bad field."""
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.convert_layers in ("none", "null", ""):
            self.convert_layers = None  # YAML `none` reads as a string
        if self.mode in ("distill", "finetune") and not self.model_name_or_path:
            raise ConfigError(f"mode {self.mode!r} needs model_name_or_path")
        needs_teacher = self.mode == "distill" or (self.mode == "finetune" and self.kd_weight > 0)
        if needs_teacher and not (self.teacher_name_or_path or self.convert_layers):
            raise ConfigError(
                f"{self.mode} needs teacher_name_or_path (or convert_layers, to convert the teacher's copy)"
            )
        if self.distill_params not in ("new", "attention"):
            raise ConfigError(f"distill_params must be 'new' or 'attention', got {self.distill_params!r}")
        if not 0.0 <= self.kd_weight <= 1.0 or self.kd_temperature <= 0:
            raise ConfigError(
                f"need 0 <= kd_weight <= 1 and kd_temperature > 0, got {self.kd_weight}, {self.kd_temperature}"
            )
        if self.streaming and not self.doc_boundaries:
            raise ConfigError("streaming packs each document on its own: it needs doc_boundaries: true")
        unknown = set(self.model_config) - MODEL_CONFIG_KEYS
        if unknown:  # VKTConfig would keep a misspelled key as an attribute and train the default size
            raise unknown_keys_error("model_config keys", unknown, MODEL_CONFIG_KEYS)


def load_config(argv: list[str] | None = None, description: str | None = None) -> TrainConfig:
    """``TrainConfig`` from ``--config`` YAML, then flags (every field is a flag); unknown keys are an error."""
    cfg = load_dataclass(TrainConfig, argv, description or __doc__)
    cfg.validate()
    return cfg


# --- models and what each mode trains -----------------------------------------------------------


def load_causal_lm(path: str, convert_layers: str | None = None, vkt_options: dict | None = None) -> nn.Module:
    """``AutoModelForCausalLM`` from ``path`` (float32), converted to VKT when ``convert_layers`` is given."""
    check_local(path, "model")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except OSError as err:  # not a model folder, not on the Hub: the first line says which
        raise ConfigError(f"cannot load a model from {path!r}: {str(err).splitlines()[0]}") from err
    if convert_layers:
        model = convert_to_vkt(model, layers=convert_layers, **(vkt_options or {}))
    return model


def load_teacher(cfg: TrainConfig, device: torch.device) -> nn.Module:
    """The frozen original model: ``teacher_name_or_path``, else ``model_name_or_path`` unconverted."""
    teacher = load_causal_lm(cfg.teacher_name_or_path or cfg.model_name_or_path).to(device).eval()
    return teacher.requires_grad_(False)


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
        kwargs["mixer_types"] = [cfg.mixer] * kwargs.get("num_hidden_layers", VKTConfig().num_hidden_layers)
    try:
        config = VKTConfig(**kwargs)
    except ValueError as err:
        raise ConfigError(f"model_config: {err}") from err
    return VKTForCausalLM(config)


def new_vkt_parameters(layer: VKTAttention, exclude: list[str] | tuple[str, ...] = ()) -> list[nn.Parameter]:
    """Parameters a converted VKT layer added (all but the reused pretrained projections), minus
    ``exclude`` (top-level names like ``"importance"``, ``"readout_gate"``)."""
    skip = (*PRETRAINED_PROJECTIONS, *exclude)
    return [p for name, p in layer.named_parameters() if name.split(".")[0] not in skip]


class AttentionTransfer(nn.Module):
    """The trainable part of distillation: each VKT layer fed the teacher's attention input.

    ``forward(inputs, targets, mask, position_embeddings)`` returns the MSE between each VKT layer's
    output and the original attention's output over real tokens, one value per layer ``(L,)``.
    """

    def __init__(self, layers: list[VKTAttention]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(
        self,
        inputs: list[torch.Tensor],
        targets: list[torch.Tensor],
        mask: torch.Tensor,
        position_embeddings: list[Any] | None = None,
    ) -> torch.Tensor:
        weight = mask.float()
        losses = []
        for i, (layer, x, y) in enumerate(zip(self.layers, inputs, targets)):
            extra = {} if position_embeddings is None else {"position_embeddings": position_embeddings[i]}
            out = layer(x, attention_mask=mask, **extra)[0]
            err = (out.float() - y.float()).pow(2).mean(-1)  # (B, N)
            losses.append((err * weight).sum() / weight.sum().clamp(min=1))
        return torch.stack(losses)


class AttentionRecorder:
    """Forward hooks on the teacher's attention modules recording ``(input hidden states, output,
    RoPE tables or None)`` per layer index."""

    def __init__(self, teacher: nn.Module, layer_indices: list[int]):
        family = family_for(teacher.config)
        blocks = family.layers(teacher)
        self.layer_indices = list(layer_indices)
        self.records: dict[int, tuple[torch.Tensor, torch.Tensor, Any]] = {}
        self.handles = [
            getattr(blocks[i], family.attention_name).register_forward_hook(self._hook(i), with_kwargs=True)
            for i in self.layer_indices
        ]

    def _hook(self, index: int):
        def hook(module, args, kwargs, output):
            hidden = args[0] if args else kwargs["hidden_states"]
            out = output[0] if isinstance(output, tuple) else output
            self.records[index] = (hidden.detach(), out.detach(), kwargs.get("position_embeddings"))

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


@dataclass
class Setup:
    """What a mode trains: ``model`` (evaluated and saved), ``trained`` (the module the optimizer and
    accelerate see: the model, or the attention-transfer wrapper of its VKT layers), the frozen
    ``teacher`` (distill, or finetune with ``kd_weight > 0``) and the names of the loss parts logged."""

    model: nn.Module
    trained: nn.Module
    teacher: nn.Module | None = None
    recorder: AttentionRecorder | None = None
    part_names: list[str] = field(default_factory=list)
    params: list[nn.Parameter] = field(default_factory=list)  # the trained parameters (set after setup)


def setup_pretrain(cfg: TrainConfig, tokenizer: Any, device: torch.device) -> Setup:
    model = build_pretrain_model(cfg, tokenizer).to(device)
    return Setup(model, model)


def setup_distill(cfg: TrainConfig, tokenizer: Any, device: torch.device) -> Setup:
    model = load_causal_lm(cfg.model_name_or_path, cfg.convert_layers, cfg.vkt_options)
    teacher = load_teacher(cfg, device)
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
    model.to(device)
    recorder = AttentionRecorder(teacher, [layer.layer_idx for layer in layers])
    names = [f"mse_layer_{i}" for i in recorder.layer_indices]
    return Setup(model, AttentionTransfer(layers), teacher, recorder, names)


def setup_finetune(cfg: TrainConfig, tokenizer: Any, device: torch.device) -> Setup:
    model = load_causal_lm(cfg.model_name_or_path, cfg.convert_layers, cfg.vkt_options)
    if cfg.lora_r > 0:
        lora = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=cfg.lora_target_modules,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
        for layer in vkt_layers(model) if cfg.train_vkt_params else []:
            for p in new_vkt_parameters(layer, cfg.freeze_params):
                p.requires_grad_(True)
    else:
        for layer in vkt_layers(model):
            for name, p in layer.named_parameters():
                p.requires_grad_(name.split(".")[0] not in cfg.freeze_params)
    model.to(device)
    if cfg.kd_weight > 0:
        return Setup(model, model, load_teacher(cfg, device), part_names=["lm_loss", "kl"])
    return Setup(model, model)


SETUPS = {"pretrain": setup_pretrain, "distill": setup_distill, "finetune": setup_finetune}


# --- losses --------------------------------------------------------------------------------------


def logit_kl(
    student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """``KL(teacher || student)`` of the next-token distributions ``softmax(logits / T)`` ``(B, N, V)``,
    times ``T^2`` (so its gradients keep their scale, as in Hinton et al.), averaged over real tokens."""
    log_p = F.log_softmax(student.float() / temperature, dim=-1)
    log_q = F.log_softmax(teacher.float() / temperature, dim=-1)
    kl = F.kl_div(log_p, log_q, log_target=True, reduction="none").sum(-1)  # (B, N)
    weight = mask.float()
    return (kl * weight).sum() / weight.sum().clamp(min=1) * temperature**2


def training_loss(setup: Setup, batch: dict[str, torch.Tensor], cfg: TrainConfig) -> tuple[torch.Tensor, Any]:
    """The loss of one micro-batch and its logged parts (``setup.part_names``; ``None`` when none)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if setup.recorder is not None:  # attention transfer
        with torch.no_grad():
            setup.teacher(input_ids=ids, attention_mask=mask, use_cache=False)
        records = [setup.recorder.records[i] for i in setup.recorder.layer_indices]
        rope = [r[2] for r in records] if all(r[2] is not None for r in records) else None
        per_layer = setup.trained([r[0] for r in records], [r[1] for r in records], mask, rope)
        return per_layer.mean(), per_layer.detach()
    out = setup.trained(**batch, use_cache=False)
    if setup.teacher is None:
        return out.loss, None
    with torch.no_grad():
        teacher_logits = setup.teacher(input_ids=ids, attention_mask=mask, use_cache=False).logits
    kl = logit_kl(out.logits, teacher_logits, mask, cfg.kd_temperature)
    loss = (1 - cfg.kd_weight) * out.loss + cfg.kd_weight * kl
    return loss, torch.stack([out.loss.detach(), kl.detach()])


def make_optimizer(cfg: TrainConfig, params: list[nn.Parameter]) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW (no weight decay on vectors) and a cosine schedule with warmup over optimizer steps."""
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    return optimizer, get_cosine_schedule_with_warmup(optimizer, cfg.warmup_steps, cfg.max_steps)


# --- data, evaluation, logging, checkpoints -------------------------------------------------------


def load_data(cfg: TrainConfig, world_size: int, rank: int = 0) -> dict[str, Any]:
    """:func:`vkt_hf.data.prepare_data` for ``cfg`` (:func:`~vkt_hf.data.prepare_streaming_data` with
    ``streaming``: this process's part of the stream); the tokenizer defaults to the model's own."""
    tokenizer = cfg.tokenizer or cfg.model_name_or_path or cfg.teacher_name_or_path or "byte"
    check_local(cfg.data, "data", " (fetch the book corpus with `python scripts/fetch_corpus.py`, or give --data)")
    check_local(tokenizer, "tokenizer")
    if cfg.streaming:
        data = prepare_streaming_data(
            cfg.data,
            tokenizer,
            cfg.seq_len,
            split=cfg.data_split,
            text_column=cfg.text_column,
            val_split=cfg.val_split,
            val_count=cfg.val_count,
            max_documents=cfg.max_documents,
            rank=rank,
            world_size=world_size,
        )
        return {**data, "tokenizer_spec": tokenizer}
    data = prepare_data(
        cfg.data,
        tokenizer,
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
    if len(data["train"]) < cfg.batch_size * world_size:
        raise ValueError(f"only {len(data['train'])} training sequences; lower batch_size or seq_len")
    return {**data, "tokenizer_spec": tokenizer}


def epoch_loader(dataset: Any, cfg: TrainConfig, accelerator: Accelerator, epoch: int) -> Any:
    """This process's shard of one epoch of training batches, in a seeded order (drop_last)."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch))
    subset = torch.utils.data.Subset(dataset, order.tolist())
    loader = torch.utils.data.DataLoader(subset, batch_size=cfg.batch_size, shuffle=False, drop_last=True)
    return prepare_data_loader(
        loader,
        device=accelerator.device,
        num_processes=accelerator.num_processes,
        process_index=accelerator.process_index,
        put_on_device=True,
        even_batches=True,
    )


def train_batches(dataset: Any, cfg: TrainConfig, accelerator: Accelerator, start: int, data_state: Any = None):
    """Endless training batches from micro-batch ``start`` on (epochs reshuffled), so a resume continues exactly.

    A streamed dataset continues from ``data_state`` (this process's position, saved with each checkpoint).
    """
    if isinstance(dataset, StreamingPackedDataset):
        if data_state is not None:
            dataset.load_state_dict(data_state)
        for batch in torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size):  # endless: epochs restart
            yield {k: v.to(accelerator.device) for k, v in batch.items()}
        return
    per_epoch = len(epoch_loader(dataset, cfg, accelerator, 0))
    position = start
    while True:
        epoch, offset = divmod(position, per_epoch)
        loader = epoch_loader(dataset, cfg, accelerator, epoch)
        for batch in skip_first_batches(loader, offset) if offset else loader:
            position += 1
            yield batch


def evaluate(model: nn.Module, data: dict[str, Any], cfg: TrainConfig) -> dict[str, float]:
    """Validation loss, perplexity and bits per byte over the first ``eval_batches`` batches
    (:func:`vkt_hf.evaluation.perplexity`; every process computes the same numbers)."""
    result = evaluation.perplexity(model, data["val"], batch_size=cfg.batch_size, max_batches=cfg.eval_batches)
    loss = result["loss"]
    return {"val_loss": loss, "val_ppl": result["ppl"], "val_bpb": bits_per_byte(loss, data["bytes_per_token"])}


def log_metrics(accelerator: Accelerator, path: Path, row: dict[str, Any]) -> None:
    """Append ``row`` to ``metrics.jsonl`` (main process) and to the tracker, if any."""
    if accelerator.is_main_process:
        with path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
    if accelerator.log_with:
        accelerator.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=row["step"])


@dataclass
class Progress:
    """Where training stands: what ``trainer_state.json`` records (``started``: this process's start)."""

    step: int = 0
    micro_step: int = 0
    tokens: int = 0
    elapsed_before: float = 0.0
    started: float = field(default_factory=time.time)
    data_state: dict[str, Any] | None = None  # this process's position in a streamed dataset

    def elapsed(self) -> float:
        return self.elapsed_before + time.time() - self.started

    def state(self) -> dict[str, Any]:
        return {"step": self.step, "micro_step": self.micro_step, "tokens": self.tokens, "elapsed": self.elapsed()}


def full_state_dict(accelerator: Accelerator, model: nn.Module, trained: nn.Module | None) -> dict | None:
    """Under FSDP, the model's full state dict gathered from its shards (every process must call this);
    ``None`` otherwise, where ``save_pretrained`` reads the parameters themselves."""
    if accelerator.distributed_type != DistributedType.FSDP or trained is None:
        return None
    if accelerator.unwrap_model(trained) is not model:  # distillation trains a wrapper of some layers
        return None
    return accelerator.get_state_dict(trained)


class Checkpoints:
    """``<output_dir>/checkpoints/step_N/``: save (accelerate state -- model, optimizer, scheduler,
    RNG -- plus ``trainer_state.json`` and ``model/``), find the latest, and resume from it.

    ``trainer_state.json`` is written last and atomically: a checkpoint without a readable one is
    incomplete (the run was killed while saving it) and is skipped on resume.
    """

    def __init__(self, out_dir: Path, accelerator: Accelerator, keep: int):
        self.root, self.accelerator, self.keep = out_dir / "checkpoints", accelerator, keep

    def _all(self) -> list[Path]:
        steps = [p for p in self.root.glob("step_*") if p.name.split("_")[1].isdigit()]
        return sorted(steps, key=lambda p: int(p.name.split("_")[1]))

    def latest(self) -> tuple[Path, dict[str, Any]] | None:
        """The newest complete checkpoint and its trainer state, or ``None``."""
        for path in reversed(self._all()):
            state = read_trainer_state(path / "trainer_state.json")
            if state is not None:
                return path, state
            if self.accelerator.is_main_process:
                print(f"[train] skipping incomplete checkpoint {path}", flush=True)
        return None

    def save(self, progress: Progress, model: nn.Module, tokenizer: Any, trained: nn.Module | None = None) -> None:
        path = self.root / f"step_{progress.step:06d}"
        self.accelerator.save_state(str(path))
        state_dict = full_state_dict(self.accelerator, model, trained)
        if progress.data_state is not None:  # each process's position in its part of a streamed dataset
            write_text_atomic(
                path / f"data_state_{self.accelerator.process_index}.json", json.dumps(progress.data_state)
            )
            self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            model.save_pretrained(path / "model", state_dict=state_dict)
            tokenizer.save_pretrained(path / "model")
            write_text_atomic(path / "trainer_state.json", json.dumps(progress.state(), indent=2))
            old = self._all()
            for stale in old[: max(0, len(old) - self.keep)]:
                (stale / "trainer_state.json").unlink(missing_ok=True)  # incomplete first, then removed
                shutil.rmtree(stale, ignore_errors=True)
        self.accelerator.wait_for_everyone()

    def fresh_start(self, metrics_path: Path) -> Progress:
        """Step 0 with an empty ``metrics.jsonl``."""
        if self.accelerator.is_main_process and metrics_path.exists():
            metrics_path.unlink()
        self.accelerator.wait_for_everyone()
        return Progress()

    def resume(self, metrics_path: Path) -> Progress:
        """Load the latest checkpoint (and drop the metric rows after it); a fresh start without one."""
        found = self.latest()
        if found is None:
            return self.fresh_start(metrics_path)
        path, state = found
        self.accelerator.load_state(str(path))
        if self.accelerator.is_main_process:
            rows = [r for r in read_metrics(metrics_path) if r.get("step", 0) <= state["step"]]
            write_text_atomic(metrics_path, "".join(json.dumps(r) + "\n" for r in rows))
            print(f"[train] resumed from {path} (step {state['step']})", flush=True)
        self.accelerator.wait_for_everyone()
        data_state = path / f"data_state_{self.accelerator.process_index}.json"
        streamed = json.loads(data_state.read_text()) if data_state.exists() else None
        return Progress(state["step"], state["micro_step"], state["tokens"], state["elapsed"], data_state=streamed)


def read_trainer_state(path: Path) -> dict[str, Any] | None:
    """A checkpoint's ``trainer_state.json``, or ``None`` when it is missing, empty or incomplete."""
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    keys = ("step", "micro_step", "tokens", "elapsed")
    return state if isinstance(state, dict) and all(k in state for k in keys) else None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of ``metrics.jsonl``; a line cut short by a kill is skipped."""
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return [r for r in rows if isinstance(r, dict)]


def interrupted_message(cfg: TrainConfig, progress: Progress, checkpoints: Checkpoints) -> str:
    """What Ctrl-C prints: the step reached, the checkpoint a rerun resumes from, the command to rerun."""
    found = checkpoints.latest()
    where = f"interrupted at step {progress.step} of {cfg.max_steps}"
    if found is None:
        return f"{where}; no checkpoint saved yet (save_every={cfg.save_every}): rerunning starts over"
    return (
        f"{where}; the latest checkpoint is step {found[1]['step']} ({found[0]}): rerun the same command "
        f"(output_dir {cfg.output_dir}, resume on) to continue from it"
    )


def step_row(accelerator: Accelerator, progress: Progress, losses: list, parts: list, setup: Setup, lr: float) -> dict:
    """The metrics row of one optimizer step: loss (mean over micro-batches and processes), the
    loss of each process, and the mean of each logged loss part (``setup.part_names``)."""
    per_rank = accelerator.gather(torch.stack(losses).mean()[None])
    row = {"step": progress.step, "loss": float(per_rank.mean()), "lr": lr, "tokens": progress.tokens}
    row.update(elapsed=round(progress.elapsed(), 2), rank_losses=[float(x) for x in per_rank])
    if setup.part_names:
        means = accelerator.gather(torch.stack(parts).float().mean(0)[None]).mean(0)
        row.update({name: float(v) for name, v in zip(setup.part_names, means)})
    return row


def postfix(row: dict[str, Any], names: list[str]) -> str:
    """The progress bar's text: the loss, then each loss part (per-layer MSE: ``L<i>=...``)."""
    parts = [f"{name.replace('mse_layer_', 'L')}={row[name]:.3g}" for name in names]
    return " ".join([f"loss={row['loss']:.4f}", *parts])


def stop_reason(cfg: TrainConfig, progress: Progress) -> str | None:
    """``"killed"`` (``stop_after_steps``: no final save), ``"time_limit"`` or ``None`` (go on)."""
    if cfg.stop_after_steps is not None and progress.step >= cfg.stop_after_steps:
        return "killed"
    if cfg.time_limit_minutes and progress.elapsed() > 60 * cfg.time_limit_minutes and progress.step < cfg.max_steps:
        return "time_limit"
    return None


# --- the run -------------------------------------------------------------------------------------


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    # without a GPU, DDP processes started by `accelerate launch --multi_gpu` / torchrun use CPU + gloo
    cpu = cfg.cpu if cfg.cpu is not None else not torch.accelerator.is_available()
    accelerator = Accelerator(
        cpu=cpu,
        step_scheduler_with_optimizer=False,  # the schedule counts optimizer steps, whatever the world size
        mixed_precision=cfg.mixed_precision,
        log_with=None if cfg.report_to in ("none", "", None) else cfg.report_to,
        project_dir=cfg.output_dir,
    )
    fsdp_asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if fsdp_asked and accelerator.distributed_type != DistributedType.FSDP and accelerator.is_main_process:
        print("[train] an FSDP config on CPU processes: accelerate runs it as DDP (it shards on GPUs)", flush=True)
    return accelerator


def prepare_training(cfg: TrainConfig, accelerator: Accelerator, tokenizer: Any) -> tuple[Setup, Any, Any]:
    """The mode's :class:`Setup` (``params``: what is trained), its optimizer and schedule, through accelerate."""
    set_seed(cfg.seed)
    setup = SETUPS[cfg.mode](cfg, tokenizer, accelerator.device)
    if cfg.gradient_checkpointing and hasattr(setup.model, "gradient_checkpointing_enable"):
        setup.model.gradient_checkpointing_enable()
    setup.params = [p for p in setup.trained.parameters() if p.requires_grad]
    optimizer, scheduler = make_optimizer(cfg, setup.params)
    if accelerator.state.deepspeed_plugin is not None:
        # DeepSpeed sizes its batches from a dataloader passed to `prepare`; ours are built per epoch (or
        # streamed), so it gets the micro-batch and the accumulation as accelerate's error message offers
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        ds_config["train_micro_batch_size_per_gpu"] = cfg.batch_size
        ds_config["gradient_accumulation_steps"] = cfg.grad_accum
    model_is_trained = setup.trained is setup.model
    setup.trained, optimizer, scheduler = accelerator.prepare(setup.trained, optimizer, scheduler)
    if model_is_trained:
        setup.model = accelerator.unwrap_model(setup.trained)
    return setup, optimizer, scheduler


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run one training job; returns the summary also written to ``run.json``."""
    cfg.validate()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    out_dir, metrics = Path(cfg.output_dir), Path(cfg.output_dir) / "metrics.jsonl"
    accelerator = make_accelerator(cfg)
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
    set_seed(cfg.seed)
    data = load_data(cfg, accelerator.num_processes, accelerator.process_index)
    setup, optimizer, scheduler = prepare_training(cfg, accelerator, data["tokenizer"])
    checkpoints = Checkpoints(out_dir, accelerator, cfg.save_total_limit)
    progress = checkpoints.resume(metrics) if cfg.resume else checkpoints.fresh_start(metrics)
    if accelerator.log_with:
        accelerator.init_trackers(cfg.run_name or out_dir.name, config=_flat(dataclasses.asdict(cfg)))

    setup.trained.train()
    setup.model.train()
    stream = train_batches(data["train"], cfg, accelerator, progress.micro_step, progress.data_state)
    show = accelerator.is_main_process and cfg.progress
    bar = tqdm(total=cfg.max_steps, initial=progress.step, disable=not show, desc=cfg.mode)
    stopped, last_eval, progress.started = None, {}, time.time()
    try:
        while progress.step < cfg.max_steps:
            losses, parts = [], []
            for k in range(cfg.grad_accum):
                batch = next(stream)
                progress.micro_step += 1
                progress.tokens += int(batch["attention_mask"].sum()) * accelerator.num_processes
                with contextlib.nullcontext() if k == cfg.grad_accum - 1 else accelerator.no_sync(setup.trained):
                    loss, part = training_loss(setup, batch, cfg)
                    accelerator.backward(loss / cfg.grad_accum)
                losses.append(loss.detach().float())
                parts.append(part)
            if cfg.max_grad_norm:
                accelerator.clip_grad_norm_(setup.params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            progress.step += 1
            bar.update(1)
            if progress.step % cfg.log_every == 0 or progress.step == cfg.max_steps:
                row = step_row(accelerator, progress, losses, parts, setup, scheduler.get_last_lr()[0])
                log_metrics(accelerator, metrics, row)
                bar.set_postfix_str(postfix(row, setup.part_names))
            if cfg.eval_every and (progress.step % cfg.eval_every == 0 or progress.step == cfg.max_steps):
                last_eval = {"step": progress.step, **evaluate(setup.model, data, cfg)}
                log_metrics(accelerator, metrics, last_eval)
            if cfg.save_every and progress.step % cfg.save_every == 0:
                if cfg.streaming:
                    progress.data_state = data["train"].state_dict()
                checkpoints.save(progress, setup.model, data["tokenizer"], setup.trained)
            stopped = stop_reason(cfg, progress)
            if stopped:
                break
    except KeyboardInterrupt:  # Ctrl-C: say where the run stopped and how to resume, not a traceback
        bar.close()
        raise Interrupted(interrupted_message(cfg, progress, checkpoints)) from None
    bar.close()
    return finish(cfg, accelerator, setup, data, progress, last_eval, stopped)


def finish(
    cfg: TrainConfig,
    accelerator: Accelerator,
    setup: Setup,
    data: dict[str, Any],
    progress: Progress,
    last_eval: dict[str, float],
    stopped: str | None,
) -> dict[str, Any]:
    """After the loop: unless ``"killed"`` (a simulated kill: no final save, a rerun resumes from the
    latest checkpoint), evaluate if needed and save the final model (LoRA merged) and ``run.json``."""
    if setup.recorder is not None:
        setup.recorder.remove()
    if stopped == "killed":
        accelerator.end_training()
        return {"stopped": stopped, "step": progress.step}
    if last_eval.get("step") != progress.step:  # no evaluation at this step in this process
        metrics = Path(cfg.output_dir) / "metrics.jsonl"
        logged = [r for r in read_metrics(metrics) if r.get("step") == progress.step and "val_loss" in r]
        if logged:  # a finished run resumed: its final evaluation is logged already
            last_eval = logged[-1]
        else:
            last_eval = {"step": progress.step, **evaluate(setup.model, data, cfg)}
            log_metrics(accelerator, metrics, last_eval)
    parameters = sum(p.numel() for p in setup.model.parameters())
    if isinstance(setup.model, PeftModel):
        setup.model = setup.model.merge_and_unload()  # save a plain model
    final = {"step": progress.step, "tokens": progress.tokens, "train_time_s": round(progress.elapsed(), 1)}
    summary = run_summary(cfg, setup, data, parameters, {**final, **last_eval}, stopped, accelerator.num_processes)
    out_dir = Path(cfg.output_dir)
    state_dict = full_state_dict(accelerator, setup.model, setup.trained)
    if accelerator.is_main_process:
        setup.model.save_pretrained(out_dir / "model", state_dict=state_dict)
        data["tokenizer"].save_pretrained(out_dir / "model")
        write_text_atomic(out_dir / "run.json", json.dumps(summary, indent=2))
        print(f"[train] done: {out_dir / 'model'}  val_loss={last_eval['val_loss']:.4f}", flush=True)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def run_summary(
    cfg: TrainConfig,
    setup: Setup,
    data: dict[str, Any],
    parameters: int,
    final: dict[str, Any],
    stopped: str | None,
    world_size: int,
) -> dict[str, Any]:
    """``run.json``: the config, the model, the data and the ``final`` metrics of the run."""
    return {
        "name": cfg.run_name or Path(cfg.output_dir).name,
        "mode": cfg.mode,
        "stopped": stopped,
        "config": dataclasses.asdict(cfg),
        "model": {
            "class": type(setup.model).__name__,
            "parameters": parameters,
            "trainable_parameters": sum(p.numel() for p in setup.params),
            "mixer_types": getattr(setup.model.config, "mixer_types", None),
            "base_model": None if cfg.mode == "pretrain" else cfg.model_name_or_path,
        },
        "data": {
            "source": cfg.data,
            "name": cfg.dataset_name or cfg.data,
            "tokenizer": data["tokenizer_spec"],
            "train_documents": "streamed" if cfg.streaming else list(data["train_docs"]["name"]),
            "val_documents": list(data["val_docs"]["name"]),
            "train_sequences": None if cfg.streaming else len(data["train"]),
            "val_sequences": len(data["val"]),
            "seq_len": cfg.seq_len,
            "bytes_per_token": data["bytes_per_token"],
        },
        "final": final,
        "world_size": world_size,
    }


def _flat(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (v if isinstance(v, (int, float, str, bool)) else json.dumps(v)) for k, v in d.items()}

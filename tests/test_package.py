"""The project is an installed package: `make setup` installs it (editable) with its two commands."""

import importlib.metadata
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_installed_with_its_commands_and_from_this_tree():
    dist = importlib.metadata.distribution("llm-finetune")
    scripts = {e.name: e.value for e in dist.entry_points if e.group == "console_scripts"}
    assert scripts == {"llm-finetune": "trainer.cli:main", "llm-finetune-launch": "trainer.runtime.launch:main"}
    import infra.config
    import trainer.cli

    assert Path(trainer.cli.__file__).resolve().is_relative_to(ROOT)  # editable: this tree, not a copy
    assert Path(infra.config.__file__).resolve().is_relative_to(ROOT)
    exe = Path(sys.executable).parent / "llm-finetune"
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120, cwd="/")
    assert out.returncode == 0 and "finetune" in out.stdout


def test_paths_the_trainer_derives_from_its_files_are_the_repository():
    """The demo's default output (demo-output/, ignored by git) and the PYTHONPATH local runs give their
    processes are the repository root, wherever the module sits in the package: a module moved one folder
    down once put demo-output/ inside trainer/ and trainer/ itself on the workers' path."""
    from trainer.dev import demo
    from trainer.runtime import local

    assert demo.ROOT == ROOT and local.ROOT == ROOT
    assert (ROOT / "trainer" / "__init__.py").exists()

"""No Docker engine runs here: check statically what can be checked about the images."""

import json
import re
import shlex
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from infra.common import APP_UID
from infra.config import parse
from infra.jobs.pod import CPU_RUNTIME_ENV, trainer_command

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted((ROOT / "docker").glob("Dockerfile.*"))


def instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def args(path: Path) -> dict[str, str]:
    found = {}
    for op, rest in instructions(path):
        if op == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            found[k] = v
    return found


def test_two_images():
    assert {p.name for p in DOCKERFILES} == {"Dockerfile.cpu", "Dockerfile.cuda"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_copied_file_exists_and_is_not_ignored(dockerfile):
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    ignored = {line.strip() for line in lines if line.strip() and not line.startswith("#")}
    for op, rest in instructions(dockerfile):
        if op == "COPY":
            parts = [p for p in shlex.split(rest) if not p.startswith("--")]
            for src in parts[:-1]:
                assert (ROOT / src).exists(), f"{dockerfile.name} copies missing {src}"
                assert src.split("/")[0] not in ignored, f"{src} is excluded by .dockerignore"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_runs_non_root_with_the_command_infra_renders(dockerfile):
    ops = instructions(dockerfile)
    users = [rest for op, rest in ops if op == "USER"]
    assert users and users[-1] == str(APP_UID)  # numeric: runAsNonRoot can verify it
    cmd = json.loads([rest for op, rest in ops if op == "CMD"][-1])
    cfg = parse({"dataset": {"name": "x/y"}, "storage": {"className": "nfs-rwx"}})
    assert cmd == trainer_command(cfg)
    env = " ".join(rest for op, rest in ops if op == "ENV")
    assert "PYTHONPATH=/app" in env and "/opt/venv/bin" in env  # trainer importable, python is the venv's
    assert any(op == "COPY" and "trainer /app/trainer" in rest for op, rest in ops)
    base = [rest for op, rest in ops if op == "FROM"][0]
    arg = args(dockerfile)
    image = arg.get(base.strip("${}"), base)
    assert ":" in image and not image.endswith(":latest"), f"base image {image} is not pinned"


def test_cpu_image_is_upstream_torch_at_the_tested_version():
    """Intel Extension for PyTorch and the oneCCL bindings are discontinued: the CPU image is upstream
    torch, the version the suite runs."""
    import torch

    text = (ROOT / "docker" / "Dockerfile.cpu").read_text()
    assert args(ROOT / "docker" / "Dockerfile.cpu")["TORCH_VERSION"] == torch.__version__.split("+")[0]
    installs = " ".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert "intel-extension-for-pytorch" not in installs and "oneccl" not in installs.lower()


def test_cpu_runtime_env_points_at_what_the_cpu_image_installs():
    text = (ROOT / "docker" / "Dockerfile.cpu").read_text()
    assert "libjemalloc2" in text and "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2" in CPU_RUNTIME_ENV["LD_PRELOAD"]
    assert "intel-openmp" in text and "python -m venv /opt/venv" in text
    assert "/opt/venv/lib/libiomp5.so" in CPU_RUNTIME_ENV["LD_PRELOAD"]


def test_image_pins_satisfy_the_project_ranges():
    ranges = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            ranges[req.name.lower().replace("_", "-")] = req.specifier
    for line in (ROOT / "docker" / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        req = Requirement(line)
        pins = [s.version for s in req.specifier if s.operator == "=="]
        assert pins, f"{line}: images pin exact versions"
        name = req.name.lower().replace("_", "-")
        if name in ranges:
            assert ranges[name].contains(pins[0]), f"{line} is outside requirements.txt's {ranges[name]}"
    cuda = args(ROOT / "docker" / "Dockerfile.cuda")["TORCH_VERSION"]
    assert ranges["torch"].contains(cuda)

"""Reproducible installs: `make setup` installs the lock file, and the lock agrees with every range."""

import re
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def _requirements(path: Path) -> dict[str, Requirement]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            req = Requirement(line)
            out[_norm(req.name)] = req
    return out


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for name, req in _requirements(path).items():
        exact = [s.version for s in req.specifier if s.operator == "=="]
        assert exact, f"{path.name}: {req} is not an exact pin"
        pins[name] = exact[0]
    return pins


def test_the_lock_pins_every_requirement_inside_its_range():
    lock = _pins(ROOT / "requirements.lock")
    for name, req in _requirements(ROOT / "requirements.txt").items():
        assert name in lock, f"requirements.lock lacks {name}: run `make lock`"
        assert req.specifier.contains(Version(lock[name]), prereleases=True), \
            f"requirements.lock pins {name}=={lock[name]}, outside requirements.txt's {req.specifier}: run `make lock`"
    # The on-disk CPU build of torch, and nothing that only a CUDA build of torch would pull in.
    assert Version(lock["torch"]).base_version == "2.13.0"
    assert not [n for n in lock if n.startswith("nvidia-") or n == "triton"]


def test_make_setup_installs_the_lock():
    makefile = (ROOT / "Makefile").read_text()
    assert "LOCK := requirements.lock" in makefile
    assert "-r $(LOCK)" in makefile and "pip install -q torch==2.13.0" in makefile
    assert re.search(r"STAMP := .*\$\(LOCK\)", makefile)  # a changed lock re-installs


def test_this_environment_is_the_lock():
    """What the suite runs on is what the lock says (`make test` installs it first)."""
    wrong = {}
    for name, version in _pins(ROOT / "requirements.lock").items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            wrong[name] = (version, None)
            continue
        if Version(installed) != Version(version):
            wrong[name] = (version, installed)
    assert not wrong, f"installed versions differ from requirements.lock (pinned, installed): {wrong}. Fix: make setup"


def test_image_pins_are_the_locked_versions():
    lock = _pins(ROOT / "requirements.lock")
    for name, version in _pins(ROOT / "docker" / "requirements.txt").items():
        assert lock.get(name) == version, f"docker/requirements.txt pins {name}=={version}, the lock {lock.get(name)}"

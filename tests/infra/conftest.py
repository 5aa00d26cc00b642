import pytest

from tests.infra.harness import render

BASE = {"dataset": {"name": "medalpaca/medical_meadow_medical_flashcards"}, "storage": {"className": "nfs-rwx"}}


@pytest.fixture
def base():
    return {k: (dict(v) if isinstance(v, dict) else v) for k, v in BASE.items()}


@pytest.fixture
def rendered(base):
    return render(base)

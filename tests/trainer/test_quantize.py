"""Quantize, reload, generate; perplexity within a stated bound; size smaller; bad input."""

import json
import shutil

import pytest

from tests.conftest import write_config
from tests.trainer.test_cli import run
from trainer.config import load_config
from trainer.errors import UserError

# The bound this product states (README): 4-bit weight-only quantization keeps validation perplexity
# within 10% of the fine-tuned model's.
PPL_BOUND = 0.10


@pytest.fixture
def finetuned(tmp_path, pretrained_model, flashcards_file):
    """An output directory whose final/ holds a fine-tuned model (copied from the session fixture)."""
    out = tmp_path / "out"
    out.mkdir()
    shutil.copytree(pretrained_model, out / "final")
    return out, flashcards_file


def _cfg(tmp_path, out, data, **quantize):
    return load_config(write_config(tmp_path / "q.yaml", out / "final", data, out,
                                    quantize={"enabled": True, "eval_samples": 24, "sample_prompts": 2,
                                              "max_new_tokens": 8, "calibration_samples": 8, **quantize}))


@pytest.mark.parametrize("algorithm,bits", [("rtn", 4), ("gptq", 4), ("awq", 4), ("rtn", 8)])
def test_quantize_reload_generate(tmp_path, finetuned, algorithm, bits):
    from trainer import quantize

    out, data = finetuned
    section = quantize.run(_cfg(tmp_path, out, data, algorithm=algorithm, bits=bits))
    report = json.loads((out / "report.json").read_text())["quantize"]
    for key in ("bits", "algorithm", "group_size", "size_bytes_before", "size_bytes_after", "perplexity_before",
                "perplexity_after", "latency_ms_before", "latency_ms_after"):
        assert key in report, key
    assert report["bits"] == bits and report["algorithm"] == algorithm
    assert report["size_bytes_after"] < report["size_bytes_before"]
    assert report["perplexity_after"] <= report["perplexity_before"] * (1 + PPL_BOUND), report
    model, tok = quantize.load_quantized(out / "quantized")
    ids = tok("What is the main effect of insulin", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False).shape[1] == ids.shape[1] + 4
    assert len(section["samples"]) == 2 and all("after" in s for s in section["samples"])
    assert (out / "report.md").exists() and (out / "quantization.png").stat().st_size > 1000


def test_evaluate_reports_both_models(tmp_path, finetuned):
    from trainer import evaluate, quantize

    out, data = finetuned
    cfg = _cfg(tmp_path, out, data)
    quantize.run(cfg)
    results = evaluate.run(cfg)
    assert set(results) >= {"final", "quantized"}
    assert results["quantized"]["size_bytes"] < results["final"]["size_bytes"]
    assert json.loads((out / "report.json").read_text())["evaluation"]["final"]["perplexity"] > 1


def test_missing_final_names_path_and_command(tmp_path, flashcards_file):
    from trainer import quantize

    out = tmp_path / "empty"
    with pytest.raises(UserError, match=rf"no fine-tuned model at {out}/final.*python -m trainer finetune"):
        quantize.run(_cfg(tmp_path, out, flashcards_file))


def test_unloadable_quantized_dir(tmp_path):
    from trainer.quantize import load_quantized

    (tmp_path / "q").mkdir()
    with pytest.raises(UserError, match="not a quantized model directory"):
        load_quantized(tmp_path / "q")
    (tmp_path / "q" / "config.json").write_text('{"quantization_config": {"quant_method": "intel/auto-round"}}')
    with pytest.raises(UserError, match="cannot be loaded"):
        load_quantized(tmp_path / "q")


@pytest.mark.parametrize("setting,words", [("quantize.bits=3", "unsupported bits 3"),
                                           ("quantize.algorithm=smoothquant", "unsupported algorithm")])
def test_unsupported_settings_exit_clearly(tmp_path, tiny_model, flashcards_file, setting, words):
    cfg = write_config(tmp_path / "c.yaml", tiny_model, flashcards_file, tmp_path / "out")
    result = run("quantize", "--config", str(cfg), "--set", setting)
    assert result.returncode == 2 and words in result.stderr and "Traceback" not in result.stderr


def test_missing_final_through_cli(tmp_path, tiny_model, flashcards_file):
    cfg = write_config(tmp_path / "c.yaml", tiny_model, flashcards_file, tmp_path / "out")
    result = run("quantize", "--config", str(cfg))
    assert result.returncode == 2 and "no fine-tuned model at" in result.stderr and "Traceback" not in result.stderr

"""`python -m trainer prepare` and `evaluate` through the real CLI, and a conversational fine-tune."""

import json
import re

import pytest

from tests.conftest import write_config
from tests.trainer.test_cli import run
from trainer.dev.tiny import conversations, finance_alpaca, write_json


def test_prepare_validates_tokenizes_reports_and_the_run_uses_its_cache(tmp_path, tiny_model, flashcards_file):
    cfg = write_config(tmp_path / "c.yaml", tiny_model, flashcards_file, tmp_path / "out",
                       training={"max_steps": 2, "save_steps": 100})
    result = run("prepare", "--config", str(cfg))
    assert result.returncode == 0, result.stderr
    err = result.stderr
    assert "format instruction (detected from the columns)" in err
    assert re.search(r"data: 600 records \(instruction\) -> 570 training examples, \d+ tokens \(\d+ trained\), \d+ "
                     r"truncated to max_seq_length, 0 dropped, invalid skipped: 0 training, 0 validation; lengths p50 "
                     r"\d+, p90 \d+, p99 \d+, max 256", err), err
    assert "validation: 30 examples" in err and "written" in err
    assert not (tmp_path / "out" / "checkpoints").exists()  # nothing trained
    train = run("finetune", "--config", str(cfg))
    assert train.returncode == 0, train.stderr[-3000:]
    assert "tokenized data found in" in train.stderr  # not tokenized again


def test_prepare_exports_a_cleaned_subset(tmp_path, tiny_model):
    records = finance_alpaca(40, seed=3)
    records[5]["output"] = None  # an invalid record is left out of the export
    data = write_json(tmp_path / "finance-alpaca-raw.jsonl", records, lines=True)
    cfg = write_config(tmp_path / "c.yaml", tiny_model, data, tmp_path / "out", data={"skip_invalid": True})
    export = tmp_path / "finance-alpaca.json"
    result = run("prepare", "--config", str(cfg), "--export", str(export), "--max-examples", "10")
    assert result.returncode == 0, result.stderr
    assert "exported 10 cleaned records" in result.stderr and "skipped invalid training record" in result.stderr
    exported = json.loads(export.read_text())
    assert len(exported) == 10 and all(set(r) == {"instruction", "input", "output"} for r in exported)
    assert all(r["output"] for r in exported)


def test_evaluate_scores_a_whole_file_the_base_model_and_a_checkpoint(tmp_path, tiny_model, flashcards_records):
    data = write_json(tmp_path / "cards.jsonl", flashcards_records[:300], lines=True)
    other = write_json(tmp_path / "other.jsonl", flashcards_records[300:345], lines=True)
    cfg = write_config(tmp_path / "c.yaml", tiny_model, data, tmp_path / "out",
                       training={"max_steps": 6, "save_steps": 3})
    assert run("finetune", "--config", str(cfg)).returncode == 0
    whole = run("evaluate", "--config", str(cfg), "--data", str(other))
    assert whole.returncode == 0, whole.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())["evaluation"]
    assert report["final"]["eval_examples"] == 45 and report["data"] == str(other)  # every record, not 5%
    ppl = report["final"]["perplexity"]
    assert f"| final | 45 | {report['final']['eval_loss']:.4f} | {ppl:.4g} |" in whole.stderr  # what it computed
    base = run("evaluate", "--config", str(cfg), "--model", "base")
    assert base.returncode == 0, base.stderr
    base_report = json.loads((tmp_path / "out" / "report.json").read_text())["evaluation"]
    assert base_report["base"]["perplexity"] > ppl  # fine-tuning helped on its validation data
    checkpoint = tmp_path / "out" / "checkpoints" / "step-00000003"
    step3 = run("evaluate", "--config", str(cfg), "--model", str(checkpoint))
    assert step3.returncode == 0, step3.stderr
    row = json.loads((tmp_path / "out" / "report.json").read_text())["evaluation"][str(checkpoint)]
    assert base_report["base"]["perplexity"] > row["perplexity"] > 0
    bad = run("evaluate", "--config", str(cfg), "--model", str(tmp_path / "nowhere"))
    assert bad.returncode == 2 and "not final, base, a model directory" in bad.stderr


@pytest.mark.parametrize("fmt", ["messages", "sharegpt", "prompt-completion"])
def test_other_formats_fine_tune_end_to_end(tmp_path, pretrained_model, fmt):
    records = conversations(fmt, 120)
    data = write_json(tmp_path / f"{fmt}.jsonl", records, lines=True)
    cfg = write_config(tmp_path / "c.yaml", pretrained_model, data, tmp_path / "out",
                       training={"max_steps": 10, "save_steps": 100, "learning_rate": 0.003})
    result = run("finetune", "--config", str(cfg))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"format {fmt} (detected from the columns)" in result.stderr
    assert (tmp_path / "out" / "final" / "config.json").exists()

"""Bad input through the real CLI: non-zero exit before any training, a message, no traceback."""

import json
import subprocess
import sys

import pytest

from tests.conftest import write_config
from tests.integration.procs import ROOT, env


def run(*args):
    return subprocess.run([sys.executable, "-m", "trainer", *args], capture_output=True, text=True, env=env(),
                          cwd=ROOT, timeout=300)


def test_help_documents_every_command_and_option():
    out = run("--help").stdout
    for cmd in ("finetune", "evaluate", "quantize", "report"):
        assert cmd in out
    sub = run("finetune", "--help").stdout
    assert "--config" in sub and "--set" in sub and "training.max_steps=20" in sub


def _bad(tmp_path, tiny_model, data_text, suffix=".jsonl", **sections):
    data = tmp_path / f"data{suffix}"
    data.write_text(data_text)
    cfg = write_config(tmp_path / "c.yaml", tiny_model, data, tmp_path / "out", **sections)
    return run("finetune", "--config", str(cfg))


GOOD = json.dumps({"instruction": "i", "input": "", "output": "o"}) + "\n"


@pytest.mark.parametrize("case,data,sections,words", [
    ("malformed-line", GOOD + '{"instruction": "x", "output"\n', {}, "data.jsonl:2: malformed JSON line"),
    ("empty", "", {}, "has no records"),
    ("columns", json.dumps({"question": "q", "answer": "a"}) + "\n", {}, "columns answer, question. Expected one of"),
    ("lora-target", GOOD * 50, {"lora": {"enabled": True, "target_modules": ["c_attn"]}},
     "lora.target_modules ['c_attn'] not found"),
    ("seq-len", GOOD * 50, {"data": {"max_seq_length": 16}}, "data.max_seq_length=16 is too small"),
    ("unknown-key", GOOD * 50, {"training": {"max_step": 5}}, "did you mean 'max_steps'"),
    # One process is a world of one: FSDP is refused there, never silently ignored.
    ("fsdp-one-process", GOOD * 50, {"training": {"fsdp": True}}, "training.fsdp: true with a single process"),
])
def test_bad_input_exits_clearly(tmp_path, tiny_model, case, data, sections, words):
    result = _bad(tmp_path, tiny_model, data, **sections)
    assert result.returncode == 2, result.stderr
    assert words in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out" / "checkpoints").exists()  # nothing trained


def test_unloadable_model_exits_clearly(tmp_path, flashcards_file):
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "no-such-model", flashcards_file, tmp_path / "out")
    result = run("finetune", "--config", str(cfg))
    assert result.returncode == 2 and "does not exist" in result.stderr and "Traceback" not in result.stderr


def test_an_input_error_is_printed_before_any_rank_moves_on(tmp_path, monkeypatch, capsys):
    """Under torchrun a rank that did not claim the message waits until the claiming rank has printed
    it: exiting or signalling the agent first lets torchrun kill the printer before its line (CI race)."""
    import threading
    import time

    from trainer import cli

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", f"test-{time.time_ns()}")
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    line = "error: output_dir x is in use by another run"
    claim = cli._claim_path(line)
    open(claim, "w").close()  # another rank claimed it and has not printed yet
    done = threading.Event()
    waiter = threading.Thread(target=lambda: (cli.report_once(line, wait_s=30), done.set()))
    waiter.start()
    assert not done.wait(0.5)  # still waiting for the printer
    open(claim + ".printed", "w").close()
    assert done.wait(10)
    waiter.join()
    assert line not in capsys.readouterr().err  # the waiter itself printed nothing

    other = "error: another message"
    cli.report_once(other)  # first claimant: prints once and marks it printed
    cli.report_once(other, wait_s=5)  # a second rank returns at once, silent
    assert capsys.readouterr().err.count(other) == 1
    assert (tmp_path / (cli._claim_path(other).rsplit("/", 1)[1] + ".printed")).exists()
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    cli.report_once(other)  # outside torchrun every call prints
    assert capsys.readouterr().err.count(other) == 1


def test_plan_refuses_fsdp_on_one_process_and_takes_it_on_two(tmp_path, tiny_model):
    data = tmp_path / "data.jsonl"
    data.write_text(GOOD * 50)
    cfg = write_config(tmp_path / "c.yaml", tiny_model, data, tmp_path / "out", training={"fsdp": True})
    one = run("plan", "--config", str(cfg), "--processes", "1")
    assert one.returncode == 2 and "training.fsdp: true with a single process" in one.stderr
    two = run("plan", "--config", str(cfg), "--processes", "2")
    assert two.returncode == 0, two.stderr

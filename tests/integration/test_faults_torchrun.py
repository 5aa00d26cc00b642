"""Faults under real torchrun: two runs on one output_dir, and an input error that must not burn
torchrun's restarts."""

import json
import time

from tests.conftest import write_config
from tests.integration.procs import start, stop, torchrun, wait


def test_a_second_run_on_the_same_output_dir_is_refused_without_restarts(tmp_path, tiny_model, flashcards_file):
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "c.yaml", tiny_model, flashcards_file, out,
                       training={"max_steps": 120, "save_steps": 10, "logging_steps": 10})
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    a = start(torchrun(2, "-m", "trainer", "finetune", "--config", str(cfg)), log_a)
    b = None
    try:
        deadline = time.monotonic() + 240
        while not (out / "checkpoints" / "step-00000010" / "COMPLETE").exists():
            assert a.poll() is None, log_a.read_text()[-3000:]
            assert time.monotonic() < deadline, "run A made no checkpoint in time"
            time.sleep(0.1)
        started = time.monotonic()
        b = start(torchrun(2, "-m", "trainer", "finetune", "--config", str(cfg), max_restarts=3), log_b)
        assert wait(b, 120, log_b) != 0
        text_b = log_b.read_text()
        assert "is in use by another run" in text_b and "Fix: wait for it to finish" in text_b
        assert text_b.count("is in use by another run") == 1  # one line, whichever ranks raised it
        assert "will restart worker group" not in text_b  # the 3 restarts were not spent on it
        assert time.monotonic() - started < 90
        assert wait(a, 400, log_a) == 0, log_a.read_text()[-3000:]
    finally:
        stop(a)
        if b is not None:
            stop(b)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 120  # one writer: no duplicated rows
    assert not (out / ".lock").exists()  # released at the end

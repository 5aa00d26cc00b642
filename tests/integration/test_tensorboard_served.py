"""The stack's TensorBoard: the data-access pod's container command, run as rendered (the volume's
/data mapped to a temporary directory), serves the scalars a real training run wrote, on loopback."""

import json
import re
import sys
import time
import urllib.request

from infra.data_access import tensorboard_command
from infra.config import parse
from tests.conftest import write_config
from tests.integration.procs import start, stop


def test_the_rendered_tensorboard_serves_the_runs_scalars(tmp_path, tiny_model, flashcards_file):
    from trainer.config import load_config
    from trainer.train import finetune

    cfg = parse({"dataset": {"name": "org/data"}, "storage": {"className": "nfs-rwx"}, "jobName": "medical",
                 "training": {"reportTo": ["tensorboard"]}})
    data = tmp_path / "data"
    out = data / cfg.output_dir.removeprefix("/data/")
    finetune(load_config(write_config(tmp_path / "c.yaml", tiny_model, flashcards_file, out,
                                      training={"max_steps": 10, "logging_steps": 5, "report_to": ["tensorboard"]})))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    command = [a.replace("/data", str(data)) for a in tensorboard_command(cfg)]
    assert command[:3] == ["python", "-m", "tensorboard.main"]
    command[0] = sys.executable
    command[command.index("--port") + 1] = "0"  # a free port, chosen by TensorBoard and printed
    log = tmp_path / "tensorboard.log"
    proc = start(command, log)
    try:
        deadline, url = time.monotonic() + 120, None
        while url is None:
            assert proc.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, "TensorBoard did not start: " + log.read_text()[-2000:]
            found = re.search(r"http://127\.0\.0\.1:(\d+)/", log.read_text())
            url = found.group(0) if found else None
            time.sleep(0.2)
        run = f"{out.name}/tensorboard"  # one run per run directory of the job
        while True:
            with urllib.request.urlopen(url + "data/runs", timeout=10) as r:
                if run in json.load(r):
                    break
            assert time.monotonic() < deadline, "TensorBoard never listed the run"
            time.sleep(0.5)
        with urllib.request.urlopen(f"{url}data/plugin/scalars/scalars?run={run}&tag=loss", timeout=10) as r:
            served = [(step, value) for _, step, value in json.load(r)]
    finally:
        stop(proc)
    assert [s for s, _ in served] == [r["step"] for r in rows]
    assert all(abs(v - r["loss"]) < 1e-5 for (_, v), r in zip(served, rows))

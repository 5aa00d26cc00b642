"""training.report_to: TensorBoard, MLflow (local file store) and W&B (offline) receive the rows of
metrics.jsonl, read back with each library's own reader; a tracker that cannot be reached is refused
before any training; every row and log line carries the time left; progress.txt says where a run is."""

import glob
import json
import socket
import struct
import subprocess
import sys

import pytest

from tests.conftest import write_config
from tests.integration.procs import ROOT, env


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once closed


def _wandb_history(run_dir):
    """Rows of an offline W&B run, from its transaction log (LevelDB log framing of wandb's own
    protobuf Records; the public API reads only from the server)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(glob.glob(f"{run_dir}/*.wandb")[0], "rb").read()
    assert data[:4] == b":W&B"
    block, pos, buf, rows = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if kind == 0 and length == 0:
            break
        buf += data[pos:pos + length]
        pos += length
        if kind in (1, 4):  # FULL or LAST
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows


def _numbers(row):
    return {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def test_three_trackers_receive_the_rows_of_metrics_jsonl(tmp_path, tiny_model, flashcards_file, monkeypatch):
    from trainer.config import load_config
    from trainer.train import finetune

    out = tmp_path / "out"
    mlruns = tmp_path / "mlruns"
    cfg = write_config(tmp_path / "c.yaml", tiny_model, flashcards_file, out,
                       training={"max_steps": 12, "logging_steps": 4, "save_steps": 100, "eval_steps": 8,
                                 "report_to": ["tensorboard", "mlflow", "wandb"]},
                       data={"validation_fraction": 0.1},
                       tracking={"mlflow_tracking_uri": f"file:{mlruns}", "mlflow_experiment": "tests",
                                 "wandb_project": "tests", "wandb_mode": "offline", "run_name": "tiny"})
    monkeypatch.setenv("WANDB_SILENT", "true")
    finetune(load_config(cfg))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [4, 8, 12] and "eval_loss" in rows[1]
    expected = {(r["step"], k): v for r in rows for k, v in _numbers(r).items()}
    assert {"loss", "learning_rate", "grad_norm", "tokens_per_second", "eval_loss", "eta_seconds",
            "num_input_tokens_seen"} <= {k for _, k in expected}

    # TensorBoard: its own event reader.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tb = {(e.step, tag): e.value for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)}
    assert tb.keys() == expected.keys()
    assert all(tb[k] == pytest.approx(v, rel=1e-6, abs=1e-6) for k, v in expected.items())  # float32 events

    # MLflow: the client on the local file store.
    import mlflow

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = mlflow.MlflowClient(tracking_uri=f"file:{mlruns}")
    (run,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert run.info.run_name == "tiny" and run.info.status == "FINISHED"
    got = {(m.step, key): m.value for key in run.data.metrics for m in client.get_metric_history(run.info.run_id, key)}
    assert got == pytest.approx(expected)
    assert run.data.params["training.learning_rate"] == "0.003" and run.data.params["world_size"] == "1"
    assert run.data.params["model.name_or_path"] == str(tiny_model) and "memory_plan.peak_gib" in run.data.params
    assert run.data.tags["llm_finetune.output_dir"] == str(out)

    # W&B (offline): its transaction log.
    ids = json.loads((out / "tracking.json").read_text())
    (run_dir,) = glob.glob(str(out / "wandb" / f"offline-run-*-{ids['wandb']}"))
    history = _wandb_history(run_dir)
    got = {(h["_step"], k): v for h in history for k, v in h.items() if not k.startswith("_")}
    assert got == pytest.approx(expected)

    progress = (out / "progress.txt").read_text()
    assert progress.startswith("trained: step 12/12 (100%)") and f"{rows[-1]['loss']:.4f}" in progress


def test_a_resumed_run_continues_the_same_tracker_runs(tmp_path, tiny_model, flashcards_file, monkeypatch):
    import mlflow

    from trainer.config import load_config
    from trainer.train import finetune

    out, mlruns = tmp_path / "out", tmp_path / "mlruns"
    tracking = {"mlflow_tracking_uri": f"file:{mlruns}"}
    first = write_config(tmp_path / "a.yaml", tiny_model, flashcards_file, out,
                         training={"max_steps": 8, "logging_steps": 4, "save_steps": 4, "report_to": ["mlflow"]},
                         tracking=tracking)
    finetune(load_config(first))
    ids = json.loads((out / "tracking.json").read_text())
    longer = write_config(tmp_path / "b.yaml", tiny_model, flashcards_file, out,
                          training={"max_steps": 12, "logging_steps": 4, "save_steps": 4, "report_to": ["mlflow"]},
                          tracking=tracking)
    finetune(load_config(longer))
    assert json.loads((out / "tracking.json").read_text()) == ids  # same tracker run
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = mlflow.MlflowClient(tracking_uri=f"file:{mlruns}")
    assert len(client.search_runs([client.get_experiment_by_name("llm-finetune").experiment_id])) == 1
    assert [m.step for m in client.get_metric_history(ids["mlflow"], "loss")] == [4, 8, 12]


def test_an_unreachable_tracker_is_refused_before_training(tmp_path, tiny_model, flashcards_file):
    out = tmp_path / "out"
    port = _closed_port()
    cfg = write_config(tmp_path / "c.yaml", tiny_model, flashcards_file, out,
                       training={"report_to": ["mlflow"]},
                       tracking={"mlflow_tracking_uri": f"http://127.0.0.1:{port}"})
    proc = subprocess.run([sys.executable, "-m", "trainer", "finetune", "--config", str(cfg)], capture_output=True,
                          text=True, env=env(), cwd=ROOT, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "training.report_to: mlflow" in errors[0] and f"127.0.0.1:{port}" in errors[0]
    assert errors[0].count("Fix:") == 1 and "Traceback" not in proc.stderr
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()


@pytest.mark.parametrize("tracking, words", [
    ({}, "tracking.mlflow_tracking_uri"),
])
def test_a_tracker_without_its_settings_is_refused_by_the_config(tmp_path, tiny_model, flashcards_file,
                                                                 tracking, words):
    from trainer.config import ConfigError, load_config

    cfg = write_config(tmp_path / "c.yaml", tiny_model, flashcards_file, tmp_path / "out",
                       training={"report_to": ["mlflow"]}, tracking=tracking)
    with pytest.raises(ConfigError, match=words):
        load_config(cfg)
    bad = write_config(tmp_path / "d.yaml", tiny_model, flashcards_file, tmp_path / "out",
                       training={"report_to": ["tensorbord"]})
    with pytest.raises(ConfigError, match="did you mean 'tensorboard'"):
        load_config(bad)
    wandb = write_config(tmp_path / "e.yaml", tiny_model, flashcards_file, tmp_path / "out",
                         training={"report_to": ["wandb"]})
    with pytest.raises(ConfigError, match="tracking.wandb_project"):
        load_config(wandb)


def test_time_left_is_the_recent_step_time_times_the_steps_left():
    from trainer.monitor.metrics import Eta, duration, progress_text

    eta = Eta(total_steps=100, window=3)
    assert eta.seconds_left(10) is None
    for seconds in (9.0, 1.0, 2.0, 3.0):  # the window keeps the last three
        eta.add(seconds)
    assert eta.seconds_per_step() == 2.0 and eta.seconds_left(40) == 120.0 and eta.seconds_left(100) == 0.0
    assert [duration(s) for s in (7, 245, 3720)] == ["7s", "4m05s", "1h02m"]
    rows = [{"step": 10, "loss": 2.0}, {"step": 20, "loss": 1.5, "eval_loss": 1.7},
            {"step": 30, "loss": 1.25, "eta_seconds": 3720, "seconds_per_step": 53.1, "tokens_per_second": 900}]
    text = progress_text(rows, 100)
    assert text.startswith("training: step 30/100 (30%), 1h02m left at 53.10 s/step\n")
    assert "(every 10 steps, newest last): 2.0000 1.5000 1.2500" in text and "eval_loss 1.7000 at step 20" in text

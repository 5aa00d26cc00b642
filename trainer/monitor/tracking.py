"""Experiment trackers (training.report_to): TensorBoard, MLflow, Weights & Biases.

Rank 0 sends each tracker the rows metrics.jsonl gets, under the same names and steps, plus the run's
config and identity as parameters. Each tracker is checked at start-up (importable, reachable,
credentials readable) before anything large is loaded: a tracker that cannot be reached is refused
in one line naming training.report_to, never discovered at step N. Each integration is the
library's own client (torch's SummaryWriter, mlflow, wandb); what is written by hand here is only
what they have no notion of: one run per output_dir across restarts (the ids kept in
tracking.json), and credentials read from files (a Secret mounted in the pod) rather than from
plain environment values in the pod spec.

A local run:  training.report_to: [tensorboard]  ->  tensorboard --logdir output/tensorboard
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from pathlib import Path
from typing import Any, Callable, Optional
from urllib.parse import urlparse

from trainer.config import CREDENTIAL_FILES, TrainerConfig
from trainer.errors import UserError

# Where each client looks for its credential, set in this process only from the file CREDENTIAL_FILES
# names (the pod spec holds paths, never the values).
CREDENTIAL_ENV = {"mlflow": "MLFLOW_TRACKING_TOKEN", "wandb": "WANDB_API_KEY"}
PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow-skinny", "wandb": "wandb"}
CONNECT_TIMEOUT_S = 10.0
IDS_FILE = "tracking.json"


def _refuse(tracker: str, problem: str, fix: str) -> UserError:
    return UserError(f"training.report_to: {tracker}: {problem}. Fix: {fix}")


def _credential(tracker: str) -> Optional[str]:
    path = os.environ.get(CREDENTIAL_FILES[tracker])
    if not path:
        return None
    try:
        value = Path(path).read_text().strip()
    except OSError as exc:
        raise _refuse(
            tracker,
            f"{CREDENTIAL_FILES[tracker]}={path} cannot be read ({exc.strerror})",
            "set the secret with pulumi config set --secret and pulumi up, or unset the variable",
        ) from None
    return value or None


def _reachable(tracker: str, url: str, key: str) -> None:
    """A TCP connection to the tracker's host, bounded: a wrong address or a server that is down is
    refused now. (The clients themselves retry for minutes before they fail.)"""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        return
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise _refuse(
            tracker,
            f"{url} cannot be reached ({reason} connecting to {parsed.hostname}:{port})",
            f"check {key} (the server's address as seen from the pods), or remove {tracker} from training.report_to",
        ) from None


def check(cfg: TrainerConfig) -> None:
    """Start-up check of every tracker in training.report_to (rank 0, before the model is loaded)."""
    import importlib.util

    tr = cfg.tracking
    for name in cfg.training.trackers:
        if importlib.util.find_spec(name) is None:  # each tracker's module has its report_to name
            raise _refuse(
                name,
                f"the {name} package is not installed in this environment",
                f"pip install {PACKAGES[name]} (the trainer images have it), or remove {name}",
            )
        if name == "tensorboard":
            target = Path(cfg.output_dir) / "tensorboard"
            try:
                target.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise _refuse(name, f"{target} cannot be created ({exc.strerror})", "check output_dir") from None
        elif name == "mlflow":
            _credential(name)
            _reachable(name, tr.mlflow_tracking_uri or "", "tracking.mlflow_tracking_uri")
        elif name == "wandb" and tr.wandb_mode == "online":
            key = _credential(name) or os.environ.get("WANDB_API_KEY")
            if not key:
                raise _refuse(
                    name,
                    "no API key (online mode)",
                    "pulumi config set --secret wandbApiKey ... (or WANDB_API_KEY locally), or tracking.wandb_mode: offline",
                )
            _reachable(name, os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"), "WANDB_BASE_URL")


def _flat(prefix: str, value: Any, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(value, dict):
        for k, v in value.items():
            _flat(f"{prefix}.{k}" if prefix else k, v, out)
    else:
        out[prefix] = ",".join(map(str, value)) if isinstance(value, list) else value
    return out


class Trackers:
    """The trackers of one run (rank 0); `log(row)` with a metrics.jsonl row, `close()` at the end."""

    def __init__(self, cfg: TrainerConfig, params: dict[str, Any], start_step: int, log: Callable[[str], None]):
        self.cfg = cfg
        self.log = log
        # (tracker, where it writes, log a row at a step, close as finished or not)
        self.sinks: list[tuple[str, str, Callable[[dict[str, Any], int], None], Callable[[bool], None]]] = []
        self.ids = self._ids()
        self.run_name = cfg.tracking.run_name or f"{Path(cfg.output_dir).name}-{self.ids['run'][:8]}"
        params = {**_flat("", cfg.to_dict(), {}), **params, "run_name": self.run_name}
        for name in cfg.training.trackers:
            getattr(self, f"_open_{name}")(params, start_step)
        if self.sinks:
            log(f"tracking: {', '.join(self.describe())}")

    # ---- one run per output_dir ---------------------------------------------------------

    def _ids(self) -> dict[str, str]:
        """The same tracker runs after a restart or a preemption: ids made at the first start, kept in
        output_dir/tracking.json (written to a temporary name and renamed)."""
        path = Path(self.cfg.output_dir) / IDS_FILE
        try:
            ids = json.loads(path.read_text())
            if isinstance(ids, dict) and isinstance(ids.get("run"), str):
                return ids
        except (OSError, ValueError):
            pass
        return {"run": uuid.uuid4().hex}

    def _save_ids(self) -> None:
        from trainer.monitor.metrics import rewrite

        path = Path(self.cfg.output_dir) / IDS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        rewrite(path, json.dumps(self.ids, indent=2))

    # ---- the three trackers ---------------------------------------------------------------

    def _open_tensorboard(self, params: dict[str, Any], start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        logdir = Path(self.cfg.output_dir) / "tensorboard"
        # purge_step: after a resume, TensorBoard drops the earlier events of the steps trained again.
        writer = SummaryWriter(str(logdir), purge_step=start_step + 1 if start_step else None)
        if not start_step:
            writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in sorted(params.items())), 0)

        def log(row: dict[str, Any], step: int) -> None:
            for key, value in _scalars(row).items():
                writer.add_scalar(key, value, step)
            writer.flush()

        self.sinks.append(("tensorboard", str(logdir), log, lambda ok: writer.close()))

    def _open_mlflow(self, params: dict[str, Any], start_step: int) -> None:
        import mlflow

        tr = self.cfg.tracking
        token = _credential("mlflow")
        if token:
            os.environ[CREDENTIAL_ENV["mlflow"]] = token  # this process only; never in the pod spec
        if (tr.mlflow_tracking_uri or "").startswith("file:"):
            # MLflow 3 refuses its file store unless asked for explicitly; the config asked.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            self.log("tracking: MLflow file store (MLFLOW_ALLOW_FILE_STORE=true for this run)")
        client = mlflow.MlflowClient(tracking_uri=tr.mlflow_tracking_uri)
        experiment = client.get_experiment_by_name(tr.mlflow_experiment)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(tr.mlflow_experiment)
        run_id = self.ids.get("mlflow")
        if run_id is None:
            run = client.create_run(
                experiment_id,
                run_name=self.run_name,
                tags={"llm_finetune.run": self.ids["run"], "llm_finetune.output_dir": self.cfg.output_dir},
            )
            run_id = self.ids["mlflow"] = run.info.run_id
            self._save_ids()
            from mlflow.entities import Param

            items = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
            for i in range(0, len(items), 100):  # the server takes at most 100 parameters per batch
                client.log_batch(run_id, params=items[i : i + 100])
        else:
            client.update_run(run_id, status="RUNNING")

        def log(row: dict[str, Any], step: int) -> None:
            import time

            from mlflow.entities import Metric

            stamp = int(time.time() * 1000)
            client.log_batch(run_id, metrics=[Metric(k, v, stamp, step) for k, v in _scalars(row).items()])

        def close(ok: bool) -> None:
            client.set_terminated(run_id, status="FINISHED" if ok else "KILLED")

        self.sinks.append(("mlflow", f"{tr.mlflow_tracking_uri} experiment {tr.mlflow_experiment!r} run {run_id}", log, close))

    def _open_wandb(self, params: dict[str, Any], start_step: int) -> None:
        import wandb

        tr = self.cfg.tracking
        key = _credential("wandb")
        if key:
            os.environ[CREDENTIAL_ENV["wandb"]] = key  # this process only; never in the pod spec
        run_id = self.ids.setdefault("wandb", self.ids["run"][:16])
        self._save_ids()
        run = wandb.init(
            project=tr.wandb_project,
            entity=tr.wandb_entity,
            name=self.run_name,
            id=run_id,
            resume="allow",
            mode=tr.wandb_mode,
            dir=str(Path(self.cfg.output_dir)),
            config=params,
            settings=wandb.Settings(console="off", silent=True),
        )

        def log(row: dict[str, Any], step: int) -> None:
            run.log(_scalars(row), step=step)

        self.sinks.append(
            (
                "wandb",
                f"project {tr.wandb_project} run {run_id} ({tr.wandb_mode})",
                log,
                lambda ok: run.finish(exit_code=0 if ok else 1),
            )
        )

    # ---- use ------------------------------------------------------------------------------

    def describe(self) -> list[str]:
        return [f"{name} -> {where}" for name, where, _, _ in self.sinks]

    def log_row(self, row: dict[str, Any]) -> None:
        for name, _, log, _ in self.sinks:
            try:
                log(row, int(row["step"]))
            except Exception as exc:  # a tracker that fails mid-run must not end hours of training
                self.log(f"warning: {name} did not take step {row['step']}: {type(exc).__name__}: {exc}")

    def close(self, ok: bool = True) -> None:
        for name, _, _, close in self.sinks:
            try:
                close(ok)
            except Exception as exc:
                self.log(f"warning: {name} did not close cleanly: {type(exc).__name__}: {exc}")
        self.sinks = []


def _scalars(row: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics.jsonl row, under their metrics.jsonl names (step is the x axis)."""
    return {k: float(v) for k, v in row.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}

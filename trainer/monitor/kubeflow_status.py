"""Progress in the TrainJob's status (Kubeflow Trainer KEP-2779, feature gate TrainJobStatus).

With the gate on, the Trainer controller injects into every trainer container the status endpoint
(`KUBEFLOW_TRAINER_SERVER_URL`, `.../namespaces/{ns}/trainjobs/{name}/status`), the path of its CA
certificate (`KUBEFLOW_TRAINER_SERVER_CA_CERT`) and the path of a projected service-account token that
the kubelet rotates (`KUBEFLOW_TRAINER_SERVER_TOKEN`). Rank 0 POSTs
`{"trainerStatus": {progressPercentage, estimatedRemainingSeconds, metrics: [{name, value}],
lastUpdatedTime}}` with the token as a bearer; `kubectl get trainjob -o yaml` then shows it.

Why not transformers' KubeflowCallback: it is a Trainer callback and this loop is not the HF Trainer. The
conventions are its own: off with `DISABLE_KUBEFLOW_INTEGRATION=TRUE`, at most one update per 5 s
(the last one always sent), a 5 s timeout, failures never raised. Unlike it, the request runs on a
background thread (a slow server never holds a training step) and the token file is read again for
every request (projected tokens rotate). A server that is down or slow costs one warning per outage.
"""

from __future__ import annotations

import json
import os
import ssl
import threading
import time
import urllib.request
from datetime import datetime, timezone
from typing import Any, Callable, Mapping, Optional

ENV_URL = "KUBEFLOW_TRAINER_SERVER_URL"
ENV_CA = "KUBEFLOW_TRAINER_SERVER_CA_CERT"
ENV_TOKEN = "KUBEFLOW_TRAINER_SERVER_TOKEN"
ENV_DISABLE = "DISABLE_KUBEFLOW_INTEGRATION"
MIN_INTERVAL = 5.0
TIMEOUT = 5.0
# The rows' keys reported as metrics (the CRD: at most 256, names and values 1-64 characters, strings).
METRICS = ("loss", "eval_loss", "tokens_per_second", "learning_rate")


def from_env(log: Callable[[str], None], env: Optional[Mapping[str, str]] = None) -> Optional["StatusReporter"]:
    """A reporter when the controller injected the endpoint and the user did not turn it off."""
    env = os.environ if env is None else env
    if not env.get(ENV_URL) or env.get(ENV_DISABLE, "FALSE").upper() == "TRUE":
        return None
    return StatusReporter(env[ENV_URL], env.get(ENV_CA), env.get(ENV_TOKEN), log)


def body(step: int, total_steps: int, eta_seconds: Optional[float], metrics: Mapping[str, Any]) -> dict:
    """The request body: progress, time left and metrics as the TrainJob CRD's trainerStatus holds them."""
    status: dict[str, Any] = {
        "progressPercentage": max(0, min(100, int(100 * step / max(1, total_steps)))),
        "lastUpdatedTime": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    if eta_seconds is not None:
        status["estimatedRemainingSeconds"] = max(0, min(2**31 - 1, int(round(eta_seconds))))
    rows = [{"name": "step", "value": f"{step}/{total_steps}"}]
    rows += [{"name": k, "value": _value(v)} for k, v in metrics.items() if isinstance(v, (int, float))]
    status["metrics"] = rows[:256]
    return {"trainerStatus": status}


def _value(v: float) -> str:
    return str(v) if isinstance(v, int) else f"{v:.6g}"


class StatusReporter:
    """Posts the newest progress from a background thread; `update` never blocks or raises."""

    def __init__(self, url: str, ca_file: Optional[str], token_file: Optional[str], log: Callable[[str], None]):
        self.url, self.ca_file, self.token_file, self.log = url, ca_file, token_file, log
        self._pending: Optional[dict] = None
        self._last_sent = -MIN_INTERVAL
        self._lock = threading.Condition()
        self._closing = False
        self._failing = False
        self.sent = 0
        self._thread = threading.Thread(target=self._run, name="trainjob-status", daemon=True)
        self._thread.start()

    def update(
        self, step: int, total_steps: int, eta_seconds: Optional[float], row: Mapping[str, Any], final: bool = False
    ) -> None:
        """Queue the newest state; sent at once if 5 s have passed since the last request (always when
        final), else dropped in favour of a later one."""
        now = time.monotonic()
        if not final and now - self._last_sent < MIN_INTERVAL:
            return
        self._last_sent = now
        payload = body(step, total_steps, eta_seconds, {k: row[k] for k in METRICS if row.get(k) is not None})
        with self._lock:
            self._pending = payload
            self._lock.notify()

    def close(self, timeout: float = TIMEOUT + 1) -> None:
        """Send what is queued (bounded by `timeout`), then stop the thread."""
        with self._lock:
            self._closing = True
            self._lock.notify()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._lock:
                while self._pending is None and not self._closing:
                    self._lock.wait()
                payload, self._pending = self._pending, None
                if payload is None:
                    return
            self._post(payload)

    def _post(self, payload: dict) -> None:
        try:
            with open(self.token_file or "", encoding="utf-8") as f:  # read each time: projected tokens rotate
                token = f.read().strip()
            context = ssl.create_default_context(cafile=self.ca_file) if self.ca_file else None
            req = urllib.request.Request(
                self.url,
                data=json.dumps(payload).encode(),
                method="POST",
                headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            )
            with urllib.request.urlopen(req, timeout=TIMEOUT, context=context) as resp:
                if resp.status != 200:
                    raise OSError(f"HTTP {resp.status}")
            self.sent += 1
            if self._failing:
                self.log("TrainJob status: reporting again")
            self._failing = False
        except Exception as e:  # never fail or slow the run: one warning per outage
            if not self._failing:
                self.log(
                    f"warning: TrainJob status not updated ({type(e).__name__}: {e}); training goes on, "
                    f"progress stays in the logs and progress.txt (set {ENV_DISABLE}=TRUE to stop trying)"
                )
            self._failing = True

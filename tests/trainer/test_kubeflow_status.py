"""Progress in the TrainJob's status, against a real local HTTPS server with a CA of its own that checks
the path, the bearer token (re-read: projected tokens rotate) and the body against the TrainJob CRD's
trainerStatus schema and CEL rule; and a server that is down or slow never fails or slows a run."""

from __future__ import annotations

import datetime
import http.server
import json
import socket
import ssl
import time
from pathlib import Path

import jsonschema
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.conftest import write_config
from tests.infra import cel
from tests.local_http import serving
from trainer.monitor import kubeflow_status
from trainer.config import load_config
from trainer.train import finetune

PATH = "/apis/trainer.kubeflow.org/v1alpha1/namespaces/ml/trainjobs/tj/status"


def _certificates(root: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1 signed by it (what the Trainer's webhook secret holds)."""
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test trainer CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(hours=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    import ipaddress

    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "status")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = root / "ca.crt", root / "tls.crt", root / "tls.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return paths


def _schema() -> dict:
    status = cel.schema("TrainJob")["properties"]["status"]["properties"]["trainerStatus"]
    return {"type": "object", "required": ["trainerStatus"], "additionalProperties": False,
            "properties": {"trainerStatus": _strict(status)}}


def _strict(node):
    if isinstance(node, dict):
        node = {k: _strict(v) for k, v in node.items()}
        if "properties" in node:
            node["additionalProperties"] = False
    return node


class StatusServer:
    """The Trainer's status endpoint, as far as a client can tell: POST on the TrainJob's status path,
    the current token as a bearer, a body the CRD accepts (else 403/404/422, as the real server)."""

    def __init__(self, root: Path, token_file: Path, delay: float = 0.0):
        self.ca, cert, key = _certificates(root)
        self.token_file, self.delay = token_file, delay
        self.bodies: list[dict] = []
        self.tokens: list[str] = []
        self.rejected: list[str] = []
        schema, server = _schema(), self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (the stdlib's name)
                time.sleep(server.delay)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                code = 200
                token = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
                if self.path != PATH:
                    code = 404
                elif token != server.token_file.read_text().strip():
                    code = 403
                else:
                    try:
                        doc = json.loads(body)
                        jsonschema.validate(doc, schema)
                        status = doc["trainerStatus"]
                        # The CRD's CEL rule on trainerStatus, evaluated as the API server would.
                        violations = cel.validate("TrainJob", {"metadata": {"name": "tj"}, "spec": {},
                                                               "status": {"trainerStatus": status}})
                        assert violations == [], violations
                        server.bodies.append(doc)
                        server.tokens.append(token)
                    except Exception as e:  # the real server answers 422 Invalid
                        server.rejected.append(str(e))
                        code = 422
                if code != 200:
                    server.rejected.append(f"{code} {self.path}")
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body if code == 200 else b"{}")

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.httpd.server_address[1]}{PATH}"



def _env(server: StatusServer, token_file: Path) -> dict:
    return {kubeflow_status.ENV_URL: server.url, kubeflow_status.ENV_CA: str(server.ca),
            kubeflow_status.ENV_TOKEN: str(token_file)}


def _wait(predicate, seconds=15.0):
    end = time.monotonic() + seconds
    while time.monotonic() < end and not predicate():
        time.sleep(0.05)
    return predicate()


def test_a_training_run_reports_progress_loss_and_time_left(tmp_path, tiny_model, flashcards_file, monkeypatch):
    token = tmp_path / "token"
    token.write_text("projected-token-1\n")
    with serving(StatusServer(tmp_path, token)) as server:
        for k, v in _env(server, token).items():
            monkeypatch.setenv(k, v)
        monkeypatch.setattr(kubeflow_status, "MIN_INTERVAL", 0.0)  # every logged row, for the test
        cfg = write_config(tmp_path / "c.yaml", tiny_model, flashcards_file, tmp_path / "out",
                           training={"max_steps": 10, "logging_steps": 5, "save_steps": 100, "eval_steps": 5})
        finetune(load_config(cfg))
        assert server.rejected == []
        statuses = [b["trainerStatus"] for b in server.bodies]
        assert [s["progressPercentage"] for s in statuses] == [50, 100, 100]
        metrics = [{m["name"]: m["value"] for m in s["metrics"]} for s in statuses]
        assert metrics[0]["step"] == "5/10" and metrics[-1]["step"] == "10/10"
        assert float(metrics[0]["loss"]) > 0 and float(metrics[0]["tokens_per_second"]) > 0
        assert "eval_loss" in metrics[-1] and statuses[-1]["estimatedRemainingSeconds"] == 0
        assert "estimatedRemainingSeconds" in statuses[0]


def test_rate_limit_the_final_update_and_a_rotated_token(tmp_path, monkeypatch):
    token = tmp_path / "token"
    token.write_text("first")
    logs: list[str] = []
    with serving(StatusServer(tmp_path, token)) as server:
        reporter = kubeflow_status.from_env(logs.append, _env(server, token))
        assert reporter is not None
        reporter.update(1, 100, 99.0, {"loss": 2.5})
        assert _wait(lambda: len(server.bodies) == 1)
        for step in range(2, 20):  # within 5 s of the first: dropped
            reporter.update(step, 100, 50.0, {"loss": 2.0})
        token.write_text("second")  # the kubelet rotated the projected token
        reporter.update(20, 100, 0.0, {"loss": 1.5}, final=True)
        reporter.close()
        assert [b["trainerStatus"]["progressPercentage"] for b in server.bodies] == [1, 20]
        assert server.tokens == ["first", "second"] and server.rejected == [] and logs == []


def test_disabled_the_way_transformers_is():
    env = {kubeflow_status.ENV_URL: "https://x", kubeflow_status.ENV_DISABLE: "true"}
    assert kubeflow_status.from_env(print, env) is None
    assert kubeflow_status.from_env(print, {}) is None


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_server_that_is_down_costs_one_warning_and_no_time(tmp_path):
    token = tmp_path / "token"
    token.write_text("t")
    logs: list[str] = []
    reporter = kubeflow_status.StatusReporter(f"https://127.0.0.1:{_closed_port()}{PATH}", None, str(token),
                                              logs.append)
    start = time.monotonic()
    for step in range(3):
        reporter.update(step, 3, 1.0, {"loss": 1.0}, final=True)
        time.sleep(0.2)
    reporter.close()
    assert time.monotonic() - start < 5
    assert len(logs) == 1 and "TrainJob status not updated" in logs[0] and "training goes on" in logs[0]


def test_a_slow_server_never_holds_a_step(tmp_path):
    token = tmp_path / "token"
    token.write_text("t")
    logs: list[str] = []
    with serving(StatusServer(tmp_path, token, delay=kubeflow_status.TIMEOUT + 3)) as server:
        reporter = kubeflow_status.from_env(logs.append, _env(server, token))
        start = time.monotonic()
        reporter.update(1, 10, 9.0, {"loss": 1.0}, final=True)
        reporter.update(2, 10, 8.0, {"loss": 1.0}, final=True)
        assert time.monotonic() - start < 0.5  # the caller never waits for the network
        close_start = time.monotonic()
        reporter.close(timeout=1.0)
        assert time.monotonic() - close_start < 2.0  # close is bounded too
        assert _wait(lambda: logs, kubeflow_status.TIMEOUT + 3)
        assert "timed out" in logs[0] or "TimeoutError" in logs[0]


@pytest.mark.parametrize("bad", [{"progressPercentage": 101}, {"metrics": [{"name": "", "value": "1"}]}])
def test_the_server_model_rejects_what_the_crd_rejects(tmp_path, bad):
    status = kubeflow_status.body(5, 10, 3.0, {"loss": 1.0})["trainerStatus"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"trainerStatus": {**status, **bad}}, _schema())
    without_time = {k: v for k, v in status.items() if k != "lastUpdatedTime"}
    found = cel.validate("TrainJob", {"metadata": {"name": "tj"}, "spec": {}, "status": {"trainerStatus": without_time}})
    assert [v.path for v in found] == [".status.trainerStatus"]

"""`make demo`'s program on a smaller dataset: the whole pipeline leaves every promised artefact."""

import json
import shutil
import subprocess
import sys

from tests.integration.procs import ROOT, env


def test_demo_pipeline_end_to_end(tmp_path):
    rendezvous = "etcd" if shutil.which("etcd") else "c10d"
    result = subprocess.run([sys.executable, "-m", "trainer.demo", "--out", str(tmp_path), "--examples", "400",
                             "--rendezvous", rendezvous], capture_output=True, text=True, env=env(), cwd=ROOT,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = tmp_path / "output"
    for artefact in ("final/config.json", "final/model.safetensors", "quantized/config.json", "report.json",
                     "report.md", "loss_curve.png", "quantization.png", "metrics.jsonl"):
        assert (out / artefact).exists(), artefact
    assert "world 2" in result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["quantize"]["size_bytes_after"] < report["quantize"]["size_bytes_before"]
    assert "fine-tuned model" in result.stdout and "quantization" in result.stdout
    # The config the demo ran is the format the stack renders: it parses with the same module.
    from trainer.config import load_config

    assert load_config(tmp_path / "config.yaml").output_dir == str(out)
    summary = subprocess.run([sys.executable, "-m", "trainer", "report", str(out)], capture_output=True, text=True,
                             env=env(), cwd=ROOT, timeout=300)
    assert summary.returncode == 0 and "| perplexity |" in summary.stdout and "loss_curve.png" in summary.stdout

"""bench/gpu.py's CPU mode, so the GPU bench keeps working between the sessions that have a GPU:
every run of both shapes completes (ours, the Hugging Face Trainer padded and flattened) and every
figure the table shows is there and finite. Nothing here asserts a timing."""

import json
import math
import subprocess
import sys

from tests.integration.procs import ROOT, env


def test_the_gpu_bench_runs_in_tiny_cpu_mode(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run([sys.executable, "bench/gpu.py", "--tiny", "--steps", "3", "--examples", "120",
                           "--work", str(tmp_path / "work"), "--out", str(out)],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["tiny"] and result["device"] == "cpu" and result["matmul_tflops_measured"] > 0
    assert set(result["shapes"]) == {"full1b", "lora7b"}
    for shape, r in result["shapes"].items():
        assert r["flops_per_token"] > 0 and r["mean_tokens"] > 0 and r["longest"] <= result["row_tokens"]
        assert (r["trainable"] < r["parameters"]) == r["lora"]
        assert set(r["runs"]) == {"ours", "hf-padded", "hf-flatten"}
        for name, run in r["runs"].items():
            assert "error" not in run, (shape, name, run)
            for key in ("tokens_per_second", "first_step_seconds", "tflops", "mfu_measured"):
                assert math.isfinite(run[key]) and run[key] > 0, (shape, name, key, run)
            assert run["steps"] == 3
        assert r["runs"]["ours"]["packing"].startswith("packed")  # ours packed the long-tailed examples
    table = proc.stdout[proc.stdout.rindex("| shape |"):]
    assert table.count("\n| full1b |") == 3 and table.count("\n| lora7b |") == 3

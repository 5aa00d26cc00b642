"""Input errors end in one line and exit 2 on every documented command (the launcher, locally and in
pods), never a restart or a traceback through this project's code; bad bytes are refused or skipped
and counted the same way in every format; skipped records are counted per split; one Fix: a message."""

import csv
import io
import json
import re
import subprocess
import sys

import pytest

from tests.conftest import write_config
from tests.integration.procs import ROOT, env, torchrun

FORMATS = [".jsonl", ".json", ".csv", ".parquet"]
GOOD = {"instruction": "Answer this question truthfully", "input": "What does insulin do?",
        "output": "Insulin lowers blood glucose."}


def write_records(path, records, bad_bytes_at=()):
    """`records` in the format of `path`'s suffix; the records at `bad_bytes_at` get a byte that is not
    UTF-8 (0xe9, Latin-1's é) in their output."""
    mark = "@@BAD@@"
    rows = [dict(r, output=r["output"] + mark) if i in bad_bytes_at else r for i, r in enumerate(records)]

    def encode(text: str) -> bytes:
        return text.encode().replace(mark.encode(), b" caf\xe9")

    if path.suffix == ".jsonl":
        path.write_bytes(b"".join(encode(json.dumps(r, ensure_ascii=False)) + b"\n" for r in rows))
    elif path.suffix == ".json":
        path.write_bytes(encode(json.dumps(rows, ensure_ascii=False, indent=1)))
    elif path.suffix == ".csv":
        out = io.StringIO()
        w = csv.DictWriter(out, fieldnames=list(GOOD))
        w.writeheader()
        w.writerows(rows)
        path.write_bytes(encode(out.getvalue()))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        # Bytes that are not UTF-8 can only sit in a binary column: the reader decodes such columns.
        columns = {k: [encode(r[k]) for r in rows] if bad_bytes_at else [r[k] for r in rows] for k in GOOD}
        pq.write_table(pa.table({k: pa.array(v, type=pa.binary() if bad_bytes_at else pa.string())
                                 for k, v in columns.items()}), path)
    return path


def _records(n=60, empty_at=()):
    return [dict(GOOD, output="") if i in empty_at else dict(GOOD, input=f"{GOOD['input']} ({i})") for i in range(n)]


# ---- one line, exit 2, no traceback, no restart ------------------------------------------------------

def _run(cmd, tmp_path, timeout=240):
    run_env = {**env(), "LLM_FINETUNE_RUN_DIR": str(tmp_path / "run")}
    return subprocess.run(cmd, capture_output=True, text=True, env=run_env, cwd=ROOT, timeout=timeout)


KINDS = {"empty-field": "field 'output' is empty", "bad-bytes": "not UTF-8 text"}


def _bad_file(tmp_path, suffix, kind):
    if kind == "empty-field":
        return write_records(tmp_path / f"data{suffix}", _records(empty_at=(40,)))
    return write_records(tmp_path / f"data{suffix}", _records(), bad_bytes_at=(40,))


# The command path (one line, exit 2, no restart) does not depend on the format or the kind of error,
# which the in-process tests below cover for every format: each (format, kind) is run once, under one of
# the two commands in turn, so each command meets every format and both kinds (a pairwise cover).
PAIRS = [(suffix, kind) for i, suffix in enumerate(FORMATS) for kind in [list(KINDS)[i % 2]]]
OTHER_PAIRS = [(suffix, kind) for i, suffix in enumerate(FORMATS) for kind in [list(KINDS)[(i + 1) % 2]]]


def _launcher(cfg):
    return [sys.executable, "-m", "trainer.runtime.launch", "--nproc-per-node", "2", "finetune", "--config", str(cfg)]


@pytest.mark.parametrize("suffix,kind", PAIRS)
def test_the_launcher_ends_an_input_error_with_one_line_and_exit_2(tmp_path, tiny_model, suffix, kind):
    data = _bad_file(tmp_path, suffix, kind)
    cfg = write_config(tmp_path / "c.yaml", tiny_model, data, tmp_path / "out")
    result = _run(_launcher(cfg), tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    both = result.stdout + result.stderr
    errors = [line for line in both.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and KINDS[kind] in errors[0], both[-3000:]
    assert result.stderr.strip().splitlines()[-1] == errors[0]  # it ends the output
    assert "Traceback" not in both and "SignalException" not in both and "ChildFailedError" not in both
    assert errors[0].count("Fix:") == 1
    assert not (tmp_path / "out" / "checkpoints").exists() and "step " not in both


@pytest.mark.parametrize("suffix,kind", OTHER_PAIRS)
def test_plain_torchrun_shows_our_line_first_and_never_restarts(tmp_path, tiny_model, suffix, kind):
    data = _bad_file(tmp_path, suffix, kind)
    cfg = write_config(tmp_path / "c.yaml", tiny_model, data, tmp_path / "out")
    result = _run(torchrun(2, "-m", "trainer", "finetune", "--config", str(cfg), max_restarts=3), tmp_path)
    assert result.returncode != 0
    both = result.stdout + result.stderr
    lines = result.stderr.splitlines()
    errors = [i for i, line in enumerate(lines) if line.startswith("error:")]
    assert len(errors) == 1, both[-3000:]
    tracebacks = [i for i, line in enumerate(lines) if line.startswith("Traceback")]
    assert all(errors[0] < t for t in tracebacks)  # ours first; torchrun's own report after it
    # Nothing of this project in any traceback, no restart spent, nothing trained.
    assert not re.search(r'File ".*/(trainer|infra|tests)/[^"]*\.py"', both), both[-3000:]
    assert "will restart worker group" not in both and "Restarting" not in both
    assert not (tmp_path / "out" / "checkpoints").exists() and "step " not in both


@pytest.mark.parametrize("suffix,command", [(suffix, ("launcher", "torchrun")[i % 2])
                                            for i, suffix in enumerate(FORMATS)])
def test_skip_invalid_trains_and_counts_per_split_under_both_commands(tmp_path, tiny_model, suffix, command):
    """Bad bytes and an empty field in training data, an empty field in the validation file: skipped,
    counted per split and named in report.json, under the launcher and plain torchrun alike."""
    train = write_records(tmp_path / f"train{suffix}", _records(empty_at=(3,)), bad_bytes_at=(11,))
    val = write_records(tmp_path / f"val{suffix}", _records(n=10, empty_at=(4,)))
    cfg = write_config(tmp_path / "c.yaml", tiny_model, train, tmp_path / "out",
                       data={"skip_invalid": True, "validation_file": str(val)},
                       training={"max_steps": 1, "save_steps": 1})
    args = ("finetune", "--config", str(cfg))
    result = _run(_launcher(cfg) if command == "launcher" else torchrun(2, "-m", "trainer", *args), tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "invalid skipped: 2 training, 1 validation" in result.stderr
    data = json.loads((tmp_path / "out" / "report.json").read_text())["training"]["data"]
    assert data["invalid_skipped"] == {"training": 2, "validation": 1}
    assert len(data["invalid_records"]["training"]) == 2 and len(data["invalid_records"]["validation"]) == 1


# ---- bad bytes: refused with file and line, or skipped and counted, in every format ------------------

def _prepare(tmp_path, tiny_model, data, **data_cfg):
    from trainer import data as D
    from trainer.config import load_config
    from trainer.model.modeling import load_tokenizer

    cfg = load_config(write_config(tmp_path / "c.yaml", tiny_model, data, tmp_path / "out", data=data_cfg))
    return D.for_config(cfg, load_tokenizer(str(tiny_model)), str(tiny_model))


@pytest.mark.parametrize("suffix", FORMATS)
def test_bad_bytes_are_refused_with_file_and_line_in_every_format(tmp_path, tiny_model, suffix):
    from trainer.errors import UserError

    data = write_records(tmp_path / f"data{suffix}", _records(), bad_bytes_at=(7,))
    with pytest.raises(UserError) as err:
        _prepare(tmp_path, tiny_model, data)
    message = str(err.value)
    assert "not UTF-8 text" in message and "0xe9" in message, message
    assert message.count("Fix:") == 1 and "re-encode the file as UTF-8" in message and "skip_invalid" in message
    if suffix in (".jsonl", ".csv"):
        assert f"{data}:{8 if suffix == '.jsonl' else 9}" in message  # record 8's line (after CSV's header)
    elif suffix == ".json":
        assert re.search(rf"{re.escape(str(data))}:\d+ \(record 8\)", message), message
    else:
        assert "row 8" in message


@pytest.mark.parametrize("suffix", FORMATS)
def test_bad_bytes_are_skipped_and_counted_with_skip_invalid_in_every_format(tmp_path, tiny_model, suffix):
    data = write_records(tmp_path / f"data{suffix}", _records(), bad_bytes_at=(7, 20))
    prepared = _prepare(tmp_path, tiny_model, data, skip_invalid=True, validation_fraction=0.0)
    assert prepared.invalid() == {"training": 2, "validation": 0}
    assert len(prepared.train) == 58
    named = prepared.invalid_named()["training"]
    assert len(named) == 2 and all("not UTF-8 text" in n for n in named)


def test_skipped_records_are_counted_per_split_and_named(tmp_path, tiny_model):
    train = write_records(tmp_path / "train.jsonl", _records(empty_at=(3, 9)))
    val = write_records(tmp_path / "val.jsonl", _records(n=10, empty_at=(4,)))
    prepared = _prepare(tmp_path, tiny_model, train, skip_invalid=True, validation_file=str(val))
    assert prepared.invalid() == {"training": 2, "validation": 1}
    assert prepared.invalid_named()["validation"] == [f"{val}:5: field 'output' is empty"]
    assert "invalid skipped: 2 training, 1 validation" in prepared.summary()


def test_a_held_out_split_counts_its_own_invalid_records(tmp_path, tiny_model):
    data = write_records(tmp_path / "d.jsonl", _records(n=200, empty_at=tuple(range(0, 200, 10))))
    prepared = _prepare(tmp_path, tiny_model, data, skip_invalid=True, validation_fraction=0.25)
    counts = prepared.invalid()
    assert counts["training"] + counts["validation"] == 20 and counts["validation"] > 0, counts
    assert len(prepared.invalid_named()["validation"]) == counts["validation"]


def test_counts_reach_the_report_and_the_prepare_command(tmp_path, tiny_model):
    from trainer.config import load_config
    from trainer.train import finetune

    train = write_records(tmp_path / "train.jsonl", _records(empty_at=(3, 9)), bad_bytes_at=(5,))
    val = write_records(tmp_path / "val.jsonl", _records(n=10, empty_at=(4,)))
    cfg = write_config(tmp_path / "c.yaml", tiny_model, train, tmp_path / "out",
                       data={"skip_invalid": True, "validation_file": str(val)}, training={"max_steps": 2})
    result = subprocess.run([sys.executable, "-m", "trainer", "prepare", "--config", str(cfg)], capture_output=True,
                            text=True, env=env(), cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "invalid records skipped: 3 training, 1 validation" in result.stderr
    assert result.stderr.count("skipped invalid validation record") == 1
    finetune(load_config(cfg))
    data = json.loads((tmp_path / "out" / "report.json").read_text())["training"]["data"]
    assert data["invalid_skipped"] == {"training": 3, "validation": 1}
    assert len(data["invalid_records"]["training"]) == 3


@pytest.mark.parametrize("line,words", [
    ('{"instruction": "x", "output"\n', "malformed JSON line"),
    (b'{"instruction": "x", "input": "", "output": "caf\xe9"}\n', "not UTF-8 text"),
])
def test_one_fix_per_message(tmp_path, tiny_model, line, words):
    from trainer.errors import UserError

    data = tmp_path / "d.jsonl"
    good = "".join(json.dumps(r) + "\n" for r in _records(n=5)).encode()
    data.write_bytes(good + (line if isinstance(line, bytes) else line.encode()))
    with pytest.raises(UserError) as err:
        _prepare(tmp_path, tiny_model, data)
    assert words in str(err.value) and str(err.value).count("Fix:") == 1, str(err.value)

"""Faults a shared volume and a busy team inflict, each reproduced for real (issue: checkpoint
integrity): damaged checkpoints, a torn metrics line, another run's output_dir, a full disk, a file
still being uploaded, a diverging run. The intact work is kept, the damaged refused in one line."""

import contextlib
import json
import os
import shutil
import subprocess
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import write_config
from trainer.config import load_config
from trainer.errors import UserError
from trainer.train import finetune

STEPS = {"max_steps": 15, "save_steps": 5, "logging_steps": 5}


class Crash(Exception):
    pass


def _crash_after(monkeypatch, crash_step):
    """The run dies right after checkpoint `crash_step` completes (as a killed pod would)."""
    from trainer.train.checkpoint import Checkpointer

    original = Checkpointer.save

    def save(self, step, *args, **kwargs):
        path = original(self, step, *args, **kwargs)
        if step == crash_step:
            raise Crash(f"killed after checkpoint {step}")
        return path

    monkeypatch.setattr(Checkpointer, "save", save)
    return original


def _final(out):
    return load_file(str(out / "final" / "model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model, flashcards_file):
    root = tmp_path_factory.mktemp("straight")
    finetune(load_config(write_config(root / "c.yaml", tiny_model, flashcards_file, root / "out", training=STEPS)))
    return _final(root / "out")


def _interrupted(tmp_path, tiny_model, flashcards_file, monkeypatch, crash_step=10, **sections):
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "c.yaml", tiny_model, flashcards_file, out,
                       training={**STEPS, **sections.pop("training", {})}, **sections)
    original = _crash_after(monkeypatch, crash_step)
    with pytest.raises(Crash):
        finetune(load_config(cfg))
    from trainer.train.checkpoint import Checkpointer

    monkeypatch.setattr(Checkpointer, "save", original)
    return cfg, out


# ---- 1. a checkpoint marked complete whose file is damaged -------------------------------------

@pytest.mark.parametrize("damage", ["truncated", "zeroed-metadata", "64k-zeroed-inside"])
def test_damaged_checkpoint_is_skipped_and_the_result_is_exactly_the_uninterrupted_one(
        tmp_path, tiny_model, flashcards_file, monkeypatch, capsys, uninterrupted, damage):
    cfg, out = _interrupted(tmp_path, tiny_model, flashcards_file, monkeypatch)
    step10 = out / "checkpoints" / "step-00000010"
    shard = next(step10.glob("*.distcp"))
    if damage == "truncated":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
        named = shard.name
    elif damage == "zeroed-metadata":
        meta = step10 / ".metadata"
        meta.write_bytes(bytes(meta.stat().st_size))
        named = ".metadata"
    else:
        data = bytearray(shard.read_bytes())
        n = min(65536, len(data) // 2)
        data[len(data) // 4: len(data) // 4 + n] = bytes(n)
        shard.write_bytes(bytes(data))
        named = shard.name
    capsys.readouterr()
    finetune(load_config(cfg))
    log = capsys.readouterr().err
    assert f"skipping checkpoint step 10: {step10 / named}" in log, log
    assert "resumed from checkpoint step 5" in log
    after = _final(out)
    assert all(torch.equal(uninterrupted[k], after[k]) for k in uninterrupted)  # bit for bit


# ---- 2. a truncated last line in metrics.jsonl --------------------------------------------------

def test_torn_metrics_line_is_dropped_with_a_warning(tmp_path, tiny_model, flashcards_file, monkeypatch, capsys):
    cfg, out = _interrupted(tmp_path, tiny_model, flashcards_file, monkeypatch)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 11, "loss": 2.3')  # the crash hit mid-write
    capsys.readouterr()
    finetune(load_config(cfg))
    assert "dropped an incomplete last line" in capsys.readouterr().err
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [5, 10, 15]


# ---- 3. an output_dir left by another run --------------------------------------------------------

@pytest.mark.parametrize("change,words", [
    ({"lora": {"enabled": True}}, r"lora.enabled was False, now True"),
    ({"training": {"per_device_train_batch_size": 8}}, r"training.per_device_train_batch_size was 4, now 8"),
    ({"model": {"dtype": "pure-bf16"}}, r"model.dtype: the weights were torch.float32, now torch.bfloat16"),
])
def test_a_change_to_what_the_checkpoint_holds_is_refused_in_one_line(tmp_path, tiny_model, flashcards_file,
                                                                      monkeypatch, change, words):
    from trainer import envvars

    monkeypatch.setenv(envvars.CPU_BF16, "fast")  # pure bf16 is only taken where bf16 is fast
    cfg, out = _interrupted(tmp_path, tiny_model, flashcards_file, monkeypatch)
    changed = write_config(tmp_path / "c2.yaml", tiny_model, flashcards_file, out,
                           training={**STEPS, **change.get("training", {})},
                           **{k: v for k, v in change.items() if k != "training"})
    with pytest.raises(UserError, match=rf"cannot resume .*step-00000010: {words}\. .*Fix: set it back"):
        finetune(load_config(changed))
    assert (out / "checkpoints" / "step-00000010" / "COMPLETE").exists()  # nothing the user had is lost


def test_lora_rank_change_is_refused_not_a_size_mismatch(tmp_path, pretrained_model, flashcards_file, monkeypatch):
    cfg, out = _interrupted(tmp_path, pretrained_model, flashcards_file, monkeypatch, lora={"enabled": True, "r": 8})
    changed = write_config(tmp_path / "c2.yaml", pretrained_model, flashcards_file, out, training=STEPS,
                           lora={"enabled": True, "r": 16})
    with pytest.raises(UserError, match=r"cannot resume .*lora.r was 8, now 16"):
        finetune(load_config(changed))


def test_another_base_model_of_the_same_shapes_is_refused(tmp_path, tiny_model, flashcards_file, monkeypatch):
    from trainer.dev.tiny import corpus, flashcards, write_model

    cfg, out = _interrupted(tmp_path, tiny_model, flashcards_file, monkeypatch)
    twin = tmp_path / "twin"
    shutil.copytree(tiny_model, twin)
    other = write_model(tmp_path / "other", corpus(flashcards(50)), hidden=64, layers=2, seed=7)
    shutil.copy(other / "model.safetensors", twin / "model.safetensors")  # same shapes, other weights
    changed = write_config(tmp_path / "c2.yaml", twin, flashcards_file, out, training=STEPS)
    with pytest.raises(UserError, match=r"cannot resume .*the base model's weights changed \(fingerprint"):
        finetune(load_config(changed))


def test_a_new_learning_rate_is_applied_from_the_checkpoint_and_logged(tmp_path, tiny_model, flashcards_file,
                                                                       monkeypatch, capsys):
    cfg, out = _interrupted(tmp_path, tiny_model, flashcards_file, monkeypatch,
                            training={"learning_rate": 0.003, "lr_scheduler_type": "constant"})
    changed = write_config(tmp_path / "c2.yaml", tiny_model, flashcards_file, out,
                           training={**STEPS, "learning_rate": 0.01, "lr_scheduler_type": "constant"})
    capsys.readouterr()
    finetune(load_config(changed))
    assert "resume: training.learning_rate 0.003 -> 0.01, applied from step 10" in capsys.readouterr().err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["learning_rate"] for r in rows] == [0.003, 0.003, 0.01]


def test_starting_over_moves_the_previous_run_aside(tmp_path, tiny_model, flashcards_file, monkeypatch, capsys):
    cfg, out = _interrupted(tmp_path, tiny_model, flashcards_file, monkeypatch)
    capsys.readouterr()
    finetune(load_config(cfg, ["training.resume_from_checkpoint=null"]))
    assert "starting fresh: the previous results" in capsys.readouterr().err
    previous = next(out.glob("previous-*"))
    assert (previous / "checkpoints" / "step-00000010" / "COMPLETE").exists()
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [5, 10, 15]


# ---- 5. disk full ------------------------------------------------------------------------------------

@contextlib.contextmanager
def small_volume(path, size):
    """A real small filesystem (tmpfs) where this machine allows mounting (root), else None."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        yield None
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)]).returncode != 0:
        yield None
        return
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_volume_too_small_for_the_checkpoints_is_refused_before_training(tmp_path, tiny_model, flashcards_file,
                                                                          monkeypatch):
    with small_volume(tmp_path / "vol", "3m") as volume:
        if volume is None:  # no mount here: the free-space function says what a 3 MB volume would
            import shutil as sh

            real = sh.disk_usage
            monkeypatch.setattr("trainer.train.checkpoint.shutil.disk_usage",
                                lambda p: real(p)._replace(free=3 * 2**20))
        out = (volume or tmp_path / "vol") / "out"
        cfg = write_config(tmp_path / "c.yaml", tiny_model, flashcards_file, out, training=STEPS)
        with pytest.raises(UserError, match=r"not enough space on the volume .*each checkpoint 1\.\d+ MB "
                                            r"\(estimated\), 2 kept \+ 1 being written.*free \d\.\d+ MB.*Fix: "):
            finetune(load_config(cfg))
        assert not (out / "checkpoints").exists()


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(tmp_path, tiny_model, flashcards_file, monkeypatch):
    from trainer.train.checkpoint import Checkpointer

    with small_volume(tmp_path / "vol", "16m") as volume:
        if volume is None:
            pytest.skip("mounting a small filesystem needs root here")
        out = volume / "out"
        cfg = write_config(tmp_path / "c.yaml", tiny_model, flashcards_file, out, training=STEPS)
        original = Checkpointer.save

        def save(self, step, *args, **kwargs):
            if step == 10:  # someone else fills the volume between two saves
                with open(volume / "filler", "wb") as f:
                    with contextlib.suppress(OSError):
                        while True:
                            f.write(bytes(1 << 16))
            return original(self, step, *args, **kwargs)

        monkeypatch.setattr(Checkpointer, "save", save)
        with pytest.raises(UserError, match=r"saving checkpoint step 10 .*failed \(.*No space left on device.*\); "
                                            r"the partial checkpoint was removed and checkpoint step 5 is intact"):
            finetune(load_config(cfg))
        assert not (out / "checkpoints" / "step-00000010").exists()
        (volume / "filler").unlink()
        monkeypatch.setattr(Checkpointer, "save", original)
        assert Checkpointer(out / "checkpoints", 2, _single(), print).latest().name == "step-00000005"


def _single():
    from trainer.runtime.distributed import Dist

    return Dist(0, 0, 1, 1, None, torch.device("cpu"))


# ---- 6. a data file still being uploaded ------------------------------------------------------------

def test_a_file_still_growing_is_waited_for(tmp_path, tiny_model, flashcards_records, capsys):
    data = tmp_path / "cards.jsonl"
    lines = [json.dumps(r) + "\n" for r in flashcards_records[:400]]
    data.write_text("".join(lines[:200]))  # half uploaded when the run starts

    def upload_rest():
        time.sleep(1.5)
        with open(data, "a") as f:
            f.write("".join(lines[200:]))

    writer = threading.Thread(target=upload_rest)
    writer.start()
    try:
        cfg = write_config(tmp_path / "c.yaml", tiny_model, data, tmp_path / "out", data={"file_settle_seconds": 3.0},
                           training={"max_steps": 2, "save_steps": 100})
        finetune(load_config(cfg))
    finally:
        writer.join()
    assert "data: 400 records (instruction) -> 380 training examples" in capsys.readouterr().err  # all read, 20 held out


def test_a_file_that_keeps_growing_is_refused(tmp_path, flashcards_records, monkeypatch):
    import trainer.data.sources as data_module

    path = tmp_path / "cards.jsonl"
    path.write_text("")
    stop = threading.Event()

    def keep_writing():
        with open(path, "a") as f:
            while not stop.is_set():
                f.write(json.dumps(flashcards_records[0]) + "\n")
                f.flush()
                time.sleep(0.3)

    writer = threading.Thread(target=keep_writing)
    writer.start()
    try:
        with pytest.raises(UserError, match=r"is still being written .*Fix: upload to a temporary name and rename"):
            data_module.wait_until_complete(path, 4)
    finally:
        stop.set()
        writer.join()


# ---- 7. non-finite numbers ----------------------------------------------------------------------------

def test_a_diverging_run_stops_saves_nothing_non_finite_and_a_new_rate_trains(tmp_path, tiny_model,
                                                                            flashcards_file, capsys):
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "c.yaml", tiny_model, flashcards_file, out,
                       training={**STEPS, "learning_rate": 1e8})
    with pytest.raises(UserError, match=r"training diverged at step 5: \d step\(s\) in a row had a non-finite "
                                        r"loss .*Nothing non-finite was saved; no checkpoint was written\. "
                                        r"Fix: a lower training.learning_rate \(now 1e\+08\)"):
        finetune(load_config(cfg))
    assert not (out / "final").exists()
    assert not any((out / "checkpoints").glob("step-*/COMPLETE")) if (out / "checkpoints").exists() else True
    finetune(load_config(cfg, ["training.learning_rate=0.001"]))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["learning_rate"] <= 0.001 and r["skipped_steps"] == 0 for r in rows)
    assert all(torch.isfinite(t).all() for t in _final(out).values())

import torch

from trainer.checkpoint import MARKER, Checkpointer


def _ck(tmp_path, keep=2, logs=None):
    return Checkpointer(tmp_path / "checkpoints", keep, rank=0, barrier=lambda: None,
                        log=(logs.append if logs is not None else (lambda m: None)))


def _save(ck, step):
    return ck.save(step, {"w": torch.full((2,), float(step))}, {"state": {}, "param_groups": []}, {"last": step},
                   {"step": step, "tokens_seen": step * 10})


def test_save_load_roundtrip(tmp_path):
    ck = _ck(tmp_path)
    path = _save(ck, 5)
    assert (path / MARKER).exists()
    model, optim, sched, state = ck.load(ck.latest())
    assert torch.equal(model["w"], torch.full((2,), 5.0)) and sched == {"last": 5} and state["tokens_seen"] == 50


def test_incomplete_checkpoint_is_ignored_and_reported(tmp_path):
    logs = []
    ck = _ck(tmp_path, logs=logs)
    _save(ck, 10)
    broken = tmp_path / "checkpoints" / "step-00000020"
    broken.mkdir()
    (broken / "model.pt").write_bytes(b"\x80truncated")  # a crash mid-save
    assert ck.latest().name == "step-00000010"
    assert any("ignoring incomplete checkpoint" in m and "step-00000020" in m for m in logs)
    # Saving the same step again replaces the broken directory.
    _save(ck, 20)
    assert ck.latest().name == "step-00000020"


def test_keeps_the_last_few_and_cleans_older_incomplete(tmp_path):
    ck = _ck(tmp_path, keep=2)
    (tmp_path / "checkpoints" / "step-00000001").mkdir(parents=True)
    for s in (10, 20, 30):
        _save(ck, s)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-00000020", "step-00000030"]


def test_rng_is_restored(tmp_path):
    ck = _ck(tmp_path)
    torch.manual_seed(3)
    _save(ck, 1)
    expected = torch.rand(3)
    torch.manual_seed(99)
    ck.load(ck.latest())
    assert torch.equal(torch.rand(3), expected)

"""The checkpointer on its own: DCP round trip, verified manifests, damage skipped, pruning, RNG."""

import json

import pytest
import torch

from trainer.train.checkpoint import MARKER, Checkpointer, NonFiniteState, finite
from trainer.runtime.distributed import Dist

SINGLE = Dist(0, 0, 1, 1, None, torch.device("cpu"))


def _model(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 8)).sum().backward()
    optim.step()
    return model, optim


def _ck(tmp_path, keep=2, logs=None):
    return Checkpointer(tmp_path / "checkpoints", keep, SINGLE, logs.append if logs is not None else (lambda m: None))


def test_save_verify_load_roundtrip(tmp_path):
    ck = _ck(tmp_path)
    model, optim = _model()
    path = ck.save(5, model, optim, {"step": 5, "tokens_seen": 50})
    manifest = json.loads((path / MARKER).read_text())
    assert set(manifest["files"]) >= {".metadata", "state.json", "rng-rank00000.pt"}
    assert all(len(f["sha256"]) == 64 and f["size"] > 0 for f in manifest["files"].values())
    assert ck.problem(path) is None and ck.latest() == path
    other, other_optim = _model(seed=1)
    state = ck.load(path, other, other_optim)
    assert state["tokens_seen"] == 50
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters()))
    assert torch.equal(optim.state[next(model.parameters())]["exp_avg"], other_optim.state[next(other.parameters())]["exp_avg"])


@pytest.mark.parametrize("damage", ["truncate", "zero-64k", "flip-byte", "delete"])
def test_damaged_newest_checkpoint_is_named_and_skipped(tmp_path, damage):
    logs = []
    ck = _ck(tmp_path, logs=logs)
    model, optim = _model()
    ck.save(5, model, optim, {"step": 5})
    newest = ck.save(10, model, optim, {"step": 10})
    shard = max((p for p in newest.iterdir() if p.suffix == ".distcp"), key=lambda p: p.stat().st_size)
    data = bytearray(shard.read_bytes())
    if damage == "truncate":
        shard.write_bytes(data[: len(data) // 2])
    elif damage == "zero-64k":  # same size, 64 KB (or all of it, if smaller) zeroed inside
        n = min(65536, len(data) // 2)
        data[len(data) // 4: len(data) // 4 + n] = bytes(n)
        shard.write_bytes(bytes(data))
    elif damage == "flip-byte":
        data[len(data) // 2] ^= 0x01
        shard.write_bytes(bytes(data))
    else:
        shard.unlink()
    assert ck.latest().name == "step-00000005"
    assert any("skipping checkpoint step 10" in m and shard.name in m for m in logs), logs


def test_incomplete_checkpoint_is_ignored_and_reported(tmp_path):
    logs = []
    ck = _ck(tmp_path, logs=logs)
    model, optim = _model()
    ck.save(10, model, optim, {"step": 10})
    broken = tmp_path / "checkpoints" / "step-00000020"
    broken.mkdir()
    (broken / "__0_0.distcp").write_bytes(b"\x80truncated")  # a crash mid-save: no marker
    assert ck.latest().name == "step-00000010"
    assert any("ignoring incomplete checkpoint" in m and "step-00000020" in m for m in logs)
    ck.save(20, model, optim, {"step": 20})  # the same step again replaces the debris
    assert ck.latest().name == "step-00000020"


def test_keeps_the_last_few_cleans_older_debris_and_never_less_than_one(tmp_path):
    ck = _ck(tmp_path, keep=2)
    model, optim = _model()
    (tmp_path / "checkpoints" / "step-00000001").mkdir(parents=True)
    for s in (10, 20, 30):
        ck.save(s, model, optim, {"step": s})
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000020", "step-00000030"]
    one = _ck(tmp_path / "one", keep=0)  # a keep of 0 still keeps the newest
    one.save(1, model, optim, {"step": 1})
    one.save(2, model, optim, {"step": 2})
    assert [p.name for _, p in one.complete()] == ["step-00000002"]


def test_a_non_finite_state_is_never_written(tmp_path):
    ck = _ck(tmp_path)
    model, optim = _model()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteState, match="step 3 are not finite"):
        ck.save(3, model, optim, {"step": 3})
    assert not (tmp_path / "checkpoints" / "step-00000003").exists()
    assert not finite({"w": torch.tensor([1.0, float("inf")])}, {})


def test_rng_is_restored(tmp_path):
    ck = _ck(tmp_path)
    model, optim = _model()
    torch.manual_seed(3)
    ck.save(1, model, optim, {"step": 1})
    expected = torch.rand(3)
    torch.manual_seed(99)
    ck.load(ck.latest(), model, optim)
    assert torch.equal(torch.rand(3), expected)

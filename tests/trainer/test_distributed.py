import pytest
import torch

from trainer.distributed import choose_backend, choose_dtype, cpu_has_fast_bf16, default_threads


@pytest.mark.parametrize("requested,cuda,ccl,expected", [
    (None, False, False, "gloo"),
    (None, True, False, "nccl"),
    (None, False, True, "ccl"),
    (None, True, True, "nccl"),  # GPUs win: NCCL over oneCCL for CUDA tensors
    ("gloo", True, True, "gloo"),
    ("ccl", False, True, "ccl"),
])
def test_backend_choice(requested, cuda, ccl, expected):
    assert choose_backend(requested, cuda, ccl) == expected


def test_backend_override_that_cannot_work_is_refused():
    with pytest.raises(RuntimeError, match="nccl needs CUDA"):
        choose_backend("nccl", cuda=False, ccl=False)
    with pytest.raises(RuntimeError, match="oneccl_bindings_for_pytorch"):
        choose_backend("ccl", cuda=False, ccl=False)


def test_bf16_where_the_hardware_has_it():
    assert cpu_has_fast_bf16("flags : fpu avx512f amx_bf16 amx_tile") is True
    assert cpu_has_fast_bf16("flags : fpu avx2 avx512f") is False
    assert choose_dtype("auto", cuda=True, cuda_bf16=True) == torch.bfloat16
    assert choose_dtype("auto", cuda=True, cuda_bf16=False) == torch.float32
    assert choose_dtype("auto", cuda=False, cpu_bf16=True) == torch.bfloat16
    assert choose_dtype("auto", cuda=False, cpu_bf16=False) == torch.float32
    assert choose_dtype("fp32", cuda=True, cuda_bf16=True) == torch.float32


def test_threads_split_cores_between_local_processes():
    assert default_threads(2, cores=16) == 8
    assert default_threads(4, cores=2) == 1


class FakeDist:
    def __init__(self, rank):
        self.rank, self.is_main, self.events = rank, rank == 0, []

    def barrier(self):
        self.events.append("barrier")


def test_main_first_runs_rank0_before_the_others_and_never_strands_them():
    from trainer.errors import UserError
    from trainer.distributed import main_first

    for rank in (0, 1):
        d = FakeDist(rank)
        assert main_first(d, lambda: d.events.append("work") or "ok") == "ok"
        assert d.events == (["work", "barrier"] if rank == 0 else ["barrier", "work"])

    def fail():
        raise UserError("bad data")

    d = FakeDist(0)
    with pytest.raises(UserError, match="bad data"):
        main_first(d, fail)
    assert d.events == ["barrier"]  # rank 0 reached the barrier before raising: others are released

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

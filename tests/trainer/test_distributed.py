import pytest
import torch

from trainer.distributed import Precision, choose_backend, choose_precision, cpu_has_fast_bf16, default_threads


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


def test_bf16_where_the_hardware_has_it_always_with_fp32_master_weights():
    fp32, bf16 = torch.float32, torch.bfloat16
    assert cpu_has_fast_bf16("flags : fpu avx512f amx_bf16 amx_tile") is True
    assert cpu_has_fast_bf16("flags : fpu avx512f avx512_bf16") is True
    assert cpu_has_fast_bf16("flags : fpu avx2 avx512f") is False
    assert choose_precision("auto", cuda=True, cuda_bf16=True) == Precision(bf16, fp32)
    assert choose_precision("auto", cuda=True, cuda_bf16=False) == Precision(fp32, fp32)
    assert choose_precision("auto", cuda=False, cpu_bf16=True) == Precision(bf16, fp32)
    assert choose_precision("auto", cuda=False, cpu_bf16=False) == Precision(fp32, fp32)
    assert choose_precision("fp32", cuda=True, cuda_bf16=True) == Precision(fp32, fp32)
    assert choose_precision("bf16", cuda=False, cpu_bf16=False) == Precision(bf16, fp32)  # works anywhere, slower
    pure = choose_precision("pure-bf16", cuda=False, cpu_bf16=True)
    assert pure == Precision(bf16, bf16) and not pure.mixed and "pure bf16" in pure.describe()
    assert Precision(bf16, fp32).mixed and "fp32 master weights" in Precision(bf16, fp32).describe()


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


def test_llm_finetune_device_picks_or_insists_on_the_device(monkeypatch):
    import torch

    from trainer import distributed
    from trainer.errors import UserError

    monkeypatch.setenv("LLM_FINETUNE_DEVICE", "cpu")
    assert distributed.use_cuda() is False  # even where a GPU is visible: the suite runs as CI does
    monkeypatch.setenv("LLM_FINETUNE_DEVICE", "cuda")
    if torch.cuda.is_available():
        assert distributed.use_cuda() is True
    else:
        with pytest.raises(UserError, match="LLM_FINETUNE_DEVICE=cuda but torch sees no CUDA device"):
            distributed.use_cuda()
    monkeypatch.delenv("LLM_FINETUNE_DEVICE")
    assert distributed.use_cuda() == torch.cuda.is_available()

import pytest
import torch

from trainer.model.compute import MatmulRates
from trainer.runtime.distributed import Precision, choose_backend, choose_precision, default_threads, frozen_storage
from trainer.errors import UserError

FAST, SLOW = MatmulRates(100.0, 180.0), MatmulRates(166.0, 0.3)  # AMX-like, AVX2-only (issue 28's figures)


@pytest.mark.parametrize("requested,cuda,expected", [
    (None, False, "gloo"),
    (None, True, "nccl"),
    ("gloo", True, "gloo"),
])
def test_backend_choice(requested, cuda, expected):
    assert choose_backend(requested, cuda) == expected


def test_backend_override_that_cannot_work_is_refused():
    with pytest.raises(RuntimeError, match="nccl needs CUDA"):
        choose_backend("nccl", cuda=False)


def test_bf16_compute_where_the_hardware_is_fast_at_it_always_with_fp32_master_weights():
    fp32, bf16 = torch.float32, torch.bfloat16
    assert choose_precision("auto", cuda=True, cuda_bf16=True) == Precision(bf16, fp32)
    assert choose_precision("auto", cuda=True, cuda_bf16=False) == Precision(fp32, fp32)
    assert choose_precision("auto", cuda=False, rates=FAST) == Precision(bf16, fp32)
    assert choose_precision("auto", cuda=False, rates=SLOW) == Precision(fp32, fp32)
    assert choose_precision("fp32", cuda=True, cuda_bf16=True) == Precision(fp32, fp32)
    assert choose_precision("bf16", cuda=False, rates=FAST) == Precision(bf16, fp32)
    pure = choose_precision("pure-bf16", cuda=False, rates=FAST)
    assert pure == Precision(bf16, bf16) and not pure.mixed and "pure bf16" in pure.describe()
    assert Precision(bf16, fp32).mixed and "fp32 master weights" in Precision(bf16, fp32).describe()


def test_bf16_on_a_cpu_without_fast_bf16_computes_in_fp32_and_says_why():
    p = choose_precision("bf16", cuda=False, rates=SLOW)
    assert (p.compute, p.params) == (torch.float32, torch.float32)
    assert "compute fp32: this CPU: bf16 matmul 0.3 GFLOP/s a core, fp32 166" in p.describe()
    # Its LoRA base stays in bf16 (the user's storage choice); auto keeps fp32 where it fits.
    assert frozen_storage(p, "bf16", lora=True, cuda=False)[0] == [torch.bfloat16]
    auto = choose_precision("auto", cuda=False, rates=SLOW)
    assert frozen_storage(auto, "auto", lora=True, cuda=False)[0] == [torch.float32, torch.bfloat16]
    assert frozen_storage(choose_precision("bf16", cuda=False, rates=FAST), "bf16", True, False)[0] == [torch.bfloat16]
    assert frozen_storage(auto, "auto", lora=False, cuda=False)[0] == [torch.float32]


def test_bf16_compute_insisted_on_or_pure_bf16_is_refused_where_it_would_crawl():
    with pytest.raises(UserError, match=r"model.compute_dtype: bf16, .*bf16 matmul 0.3 GFLOP/s a core, fp32 166.*553x.*"
                                        r"Fix: model.compute_dtype: auto"):
        choose_precision("bf16", cuda=False, rates=SLOW, compute="bf16")
    with pytest.raises(UserError, match=r"pure-bf16 .*Fix: model.dtype: bf16"):
        choose_precision("pure-bf16", cuda=False, rates=SLOW)
    assert choose_precision("bf16", cuda=False, rates=FAST, compute="bf16").compute == torch.bfloat16


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
    from trainer.runtime.distributed import main_first

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

    from trainer.runtime import distributed
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

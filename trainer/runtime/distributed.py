"""Everything distributed lives here: torchrun's environment, backend choice, wrapping, collectives.

Trusts torchrun (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT); a plain `python -m trainer`
is a world of one. Rank 0 alone logs and writes shared files.
"""

from __future__ import annotations

import datetime
import os
import sys
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from trainer import envvars
from trainer.model.compute import MatmulRates
from trainer.model.compute import rates as compute_rates
from trainer.errors import UserError


def choose_backend(requested: Optional[str], cuda: bool) -> str:
    """nccl on CUDA, else gloo; overridable."""
    if requested:
        if requested == "nccl" and not cuda:
            raise RuntimeError("training.ddp_backend nccl needs CUDA GPUs; use gloo")
        return requested
    return "nccl" if cuda else "gloo"


@dataclass(frozen=True)
class Precision:
    """Compute dtype (matmuls under autocast) and the dtype of the weights the optimizer updates;
    `note` says why the compute dtype is not what model.dtype names (a CPU without fast bf16)."""

    compute: torch.dtype
    params: torch.dtype
    note: str = ""

    @property
    def mixed(self) -> bool:
        return self.compute != self.params

    def autocast(self, device: torch.device):
        """The forward's context: bf16 autocast in mixed precision, nothing otherwise."""
        return torch.autocast(device_type=device.type, dtype=self.compute, enabled=self.mixed)

    def describe(self) -> str:
        if self.mixed:
            text = f"mixed precision: {_short(self.compute)} compute, {_short(self.params)} master weights and optimizer"
        else:
            text = f"{_short(self.params)} weights and compute" + (
                " (pure bf16: small updates can be lost)" if self.params == torch.bfloat16 else ""
            )
        return text + (f" ({self.note})" if self.note else "")


def _short(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def choose_precision(
    requested: str, cuda: bool, cuda_bf16: bool = False, rates: Optional[MatmulRates] = None, compute: str = "auto"
) -> Precision:
    """bf16 is always mixed precision (fp32 master weights and optimizer state, as the Hugging Face
    Trainer's bf16=True, torchtitan and FSDP's MixedPrecisionPolicy do): pure bf16 weights lose
    updates smaller than their rounding step. Pure bf16 only when asked for by name.

    On a CPU, bf16 compute only where this node's bf16 matmul is fast (`rates`, measured when not
    given): elsewhere bf16 (by name) keeps its bf16 storage and computes in fp32, saying so, and
    model.compute_dtype: bf16 by name is refused with the measured rates."""
    fp32, bf16 = torch.float32, torch.bfloat16
    if requested == "fp32":
        return Precision(fp32, fp32)
    if cuda:
        if requested == "auto":
            return Precision(bf16 if cuda_bf16 else fp32, fp32)
        return Precision(bf16, bf16 if requested == "pure-bf16" else fp32)
    measured = rates or compute_rates()
    if measured.bf16_fast:
        return Precision(bf16, bf16 if requested == "pure-bf16" else fp32)
    if compute == "bf16":
        raise UserError(
            f"model.compute_dtype: bf16, but bf16 matmuls are slow here ({measured.describe()}): a step "
            "would take about {:.0f}x as long as in fp32. Fix: model.compute_dtype: auto (bf16 weights "
            "stay bf16 where memory needs it, computed in fp32), or nodes with AMX or AVX512-BF16 "
            "(resources.nodeSelector)".format(measured.fp32 / max(measured.bf16, 1e-9))
        )
    if requested == "pure-bf16":
        raise UserError(
            f"model.dtype: pure-bf16 trains bf16 weights with bf16 matmuls, slow here ({measured.describe()}). "
            "Fix: model.dtype: bf16 (fp32 master weights; a LoRA base stays in bf16 and is computed in "
            "fp32), or nodes with AMX or AVX512-BF16"
        )
    note = f"compute fp32: {measured.describe()}" if requested == "bf16" else ""
    return Precision(fp32, fp32, note)


def frozen_storage(precision: Precision, requested: str, lora: bool, cuda: bool) -> tuple[list[torch.dtype], str]:
    """The dtypes a LoRA run may hold its frozen base in, widest first (the memory plan takes the first
    that fits), and why: the compute dtype under mixed precision; bf16 where model.dtype says so (computed
    in fp32 on a CPU without fast bf16); fp32, or bf16 where memory needs it, for `auto` on such a CPU."""
    fp32, bf16 = torch.float32, torch.bfloat16
    if not lora:
        return [precision.params], "trained"
    if precision.mixed or precision.params == bf16:
        return [precision.compute], "the compute dtype"
    if requested == "bf16":
        return [bf16], "model.dtype: bf16"
    if requested == "auto" and not cuda:
        return [fp32, bf16], "memory"  # which one, and why, is the memory plan's (trainer/train/placement.py, cli plan)
    return [fp32], f"model.dtype: {requested}"


def default_threads(local_world_size: int, cores: Optional[int] = None) -> int:
    """Split the cores of this pod/machine between its local processes (no oversubscription)."""
    cores = cores or len(os.sched_getaffinity(0))
    return max(1, cores // max(1, local_world_size))


@dataclass
class Dist:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    backend: Optional[str]
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sum floats over ranks (one collective)."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._collective_device)
        dist.all_reduce(t)
        return t.tolist()

    def all_gather_object(self, obj) -> list:
        """Every rank's object, in rank order."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def all_true(self, flag: bool) -> bool:
        """True on every rank only when it is true on every rank (one small collective)."""
        if not self.enabled:
            return bool(flag)
        t = torch.tensor([0.0 if flag else 1.0], device=self._collective_device)
        dist.all_reduce(t)
        return float(t) == 0.0

    def any_async(self, flag: bool) -> "_Vote":
        """Start an all-reduce of `flag` (true on any rank?); read it later with .result()."""
        return _Vote(self, flag)

    def broadcast_object(self, obj):
        """Rank 0's object on every rank (a decision taken once)."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self._collective_device)
        return box[0]

    @property
    def _collective_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


class _Vote:
    def __init__(self, d: "Dist", flag: bool):
        self.flag = bool(flag)
        self.work = None
        if d.enabled:
            self.tensor = torch.tensor([1.0 if flag else 0.0], device=d._collective_device)
            self.work = dist.all_reduce(self.tensor, async_op=True)

    def result(self) -> bool:
        if self.work is None:
            return self.flag
        self.work.wait()
        return float(self.tensor) > 0.0


def main_first(d: "Dist", fn):
    """Run fn on rank 0 first (it downloads into the shared cache), then on the others (cache hits).

    A rank-0 failure (a UserError) is raised only after the barrier, so the other ranks are never
    left waiting at it; they then fail the same way on their own."""
    from trainer.errors import UserError

    error = result = None
    if d.is_main:
        try:
            result = fn()
        except UserError as exc:
            error = exc
    d.barrier()
    if error is not None:
        raise error
    return result if d.is_main else fn()


def on_main(d: "Dist", fn):
    """Run fn on rank 0 alone and give every rank its result; a UserError on rank 0 is raised on
    every rank (same message), so no rank is left waiting at the next collective."""
    from trainer.errors import UserError

    outcome = None
    if d.is_main:
        try:
            outcome = ("ok", fn())
        except UserError as exc:
            outcome = ("error", str(exc))
    kind, value = d.broadcast_object(outcome)
    if kind == "error":
        raise UserError(value)
    return value


def use_cuda() -> bool:
    """CUDA when there is a GPU, unless LLM_FINETUNE_DEVICE=cpu (the test suite's default, so a GPU
    machine runs it as CI does; LLM_FINETUNE_DEVICE=cuda runs it on the GPU and insists on one)."""
    wanted = os.environ.get(envvars.DEVICE, "").strip().lower()
    if wanted == "cpu":
        return False
    if wanted.startswith("cuda") and not torch.cuda.is_available():
        from trainer.errors import UserError

        raise UserError(
            "LLM_FINETUNE_DEVICE=cuda but torch sees no CUDA device (a CPU build of torch, or no "
            "GPU visible). Fix: unset LLM_FINETUNE_DEVICE, or install the CUDA build of torch"
        )
    return torch.cuda.is_available()


def init(requested_backend: Optional[str], timeout_minutes: int = 60) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    cuda = use_cuda()
    if cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    backend = None
    if world > 1:
        backend = choose_backend(requested_backend, cuda)
        timeout = datetime.timedelta(minutes=timeout_minutes)
        dist.init_process_group(
            backend=backend,
            timeout=timeout,
            store=_attempt_store(rank, world, timeout),
            rank=rank,
            world_size=world,
            device_id=device if backend == "nccl" else None,
        )
    return Dist(rank, local_rank, world, local_world, backend, device)


def _attempt_store(rank: int, world: int, timeout: datetime.timedelta):
    """The store the process group rendezvous through.

    Run by trainer/runtime/launch.py (pods) or trainer/runtime/local.py (demo, tests), torchrun's agents do not share
    their rendezvous store with the workers (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1): every rendezvous
    round gets a new port and rank 0's worker hosts a fresh store, so no address of a previous round
    (a dead worker, a replaced pod) reaches gloo's connectFullMesh, whatever each agent's restart count.

    A plain torchrun shares the agent's store, whose keys outlive a round: the workers then use a
    prefix per restart count, which is right when every agent restarts together (one node) but not
    when one pod is replaced (its agent starts again at 0): that case needs the variable set.
    """
    agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world,
        is_master=(rank == 0 and not agent_hosts),
        timeout=timeout,
    )
    if not agent_hosts:
        return store
    if rank == 0 and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) > 0:
        print(
            "warning: torchrun shares its rendezvous store with the workers; set "
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 so a replaced pod can rejoin (the launcher does)",
            file=sys.stderr,
            flush=True,
        )
    return dist.PrefixStore(f"llm-finetune/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", store)


def wrap_model(model: torch.nn.Module, d: Dist, fsdp: bool, precision: Optional[Precision] = None) -> torch.nn.Module:
    """DDP (replicate) or FSDP2 (shard each decoder layer, then the root). In mixed precision FSDP2
    gathers bf16 copies of the fp32 shards for compute and reduces gradients in fp32."""
    if not d.enabled:
        return model
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = (
            MixedPrecisionPolicy(param_dtype=precision.compute, reduce_dtype=torch.float32)
            if precision is not None and precision.mixed
            else MixedPrecisionPolicy()
        )
        layers = decoder_layers(model)
        for layer in layers:
            fully_shard(layer, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    # LoRA freezes most parameters; static_graph lets DDP skip searching for unused ones every step.
    return DDP(
        model, device_ids=[d.local_rank] if d.device.type == "cuda" else None, gradient_as_bucket_view=True, static_graph=True
    )


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The HF (or peft) model inside DDP / torch.compile / the loss module."""
    for attr in ("module", "_orig_mod", "model"):
        inner = getattr(model, attr, None)
        if isinstance(inner, torch.nn.Module) and model.__class__.__name__ in (
            "DistributedDataParallel",
            "OptimizedModule",
            "CausalLMLoss",
        ):
            return unwrap(inner)
    return model


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    layers = []
    for module in model.modules():
        if module.__class__.__name__.endswith("DecoderLayer"):
            layers.append(module)
    return layers

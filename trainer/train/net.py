"""The model as the loop steps it: loaded in the placement's dtypes (quantized for QLoRA), LoRA applied
(adapters seeded by training.seed alone), frozen weights widened for compute where stored narrower,
wrapped in the loss, probed for the packing and loss paths, then in FSDP2 or DDP (and torch.compile).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from trainer.config import TrainerConfig
from trainer.model import modeling, probes
from trainer.runtime import distributed as D
from trainer.train import optim
from trainer.train.placement import Placement


@dataclass
class Net:
    base: torch.nn.Module  # the Hugging Face model (a PEFT model for LoRA): what final/ is saved from
    loss_module: modeling.CausalLMLoss  # base + the loss over trained tokens (evaluation runs it unwrapped)
    wrapped: torch.nn.Module  # in DDP or FSDP2: what checkpoints save and load
    model: torch.nn.Module  # what steps: wrapped, compiled where asked
    probe: probes.PackingPlan  # how rows are packed and the loss computed, measured at start-up
    arch: str  # the model's class
    trainable: list[torch.nn.Parameter]  # clipped every step

    @property
    def attention(self) -> str:
        return probes._hf(self.base).config._attn_implementation


@dataclass
class Loaded:
    base: Any  # a transformers PreTrainedModel (a peft PeftModel for LoRA)
    targets: Any  # LoRA's target modules (names, or peft's "all-linear"); None for a full fine-tune
    arch: str


def load(cfg: TrainerConfig, d: D.Dist, path: str, placement: Placement, log) -> Loaded:
    t = cfg.training
    model = modeling.load_model(path, placement.load_dtype, cfg.model.attn_implementation, d.device, placement.quantization(cfg))
    if cfg.lora.enabled and cfg.lora.base_bits:
        from trainer.model import qlora

        log(qlora.inspect(model, cfg.lora.base_bits).describe())
    if placement.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    targets = None
    if cfg.lora.enabled:
        torch.manual_seed(t.seed)  # the adapters' initial values follow training.seed alone
        model, targets = modeling.apply_lora(model, cfg.lora)
        modeling.trainable_fp32(model)
    compute = placement.precision.compute
    if placement.load_dtype.itemsize < compute.itemsize:
        from trainer.model.compute import widen

        log(
            f"frozen weights {D._short(placement.load_dtype)} ({placement.storage_reason}), compute "
            f"{D._short(compute)}: {widen(model, compute).describe()}"
        )
    trainable, total = modeling.trainable_parameters(model)
    arch = type(model.get_base_model() if hasattr(model, "get_base_model") else model).__name__
    tuned = f"LoRA r={cfg.lora.r} on {targets}" if targets else "full fine-tune"
    log(
        f"model {cfg.model.name_or_path} ({arch}): {total / 1e6:.1f}M parameters, "
        f"{trainable / 1e6:.2f}M trainable ({tuned}), attention {model.config._attn_implementation}, "
        f"{placement.precision.describe()}"
        + (f", frozen base in {placement.frozen_base(cfg.lora.base_bits)}" if cfg.lora.enabled else "")
        + f"; final/ saved as {D._short(placement.save_dtype)}"
    )
    return Loaded(model, targets, arch)


def lora_names(cfg: TrainerConfig, targets: Any) -> Optional[Any]:
    """The adapted modules as the run's identity records them (short names, or peft's keyword)."""
    if not cfg.lora.enabled:
        return None
    return sorted({n.rsplit(".", 1)[-1] for n in targets}) if isinstance(targets, list) else targets


def assemble(cfg: TrainerConfig, d: D.Dist, loaded: Loaded, placement: Placement, log) -> tuple[Net, torch.optim.Optimizer]:
    """The loss module, probed on rank 0 (milliseconds; every rank takes its answer), then FSDP2 (before
    the optimizer: it must see the sharded parameters) or DDP (after it), then torch.compile."""
    t = cfg.training
    loss_module = modeling.CausalLMLoss(loaded.base)
    model: Any = loss_module
    # Variable-length attention (Σ len², no dense mask) where transformers would build a block-diagonal
    # mask for packed rows: SDPA and eager. Flash-attention already runs packed rows as variable-length.
    varlen = cfg.model.attn_implementation == "auto" and loaded.base.config._attn_implementation in ("sdpa", "eager")
    probe = D.on_main(
        d, lambda: probes.run(loss_module, cfg.data.packing, d.device, varlen=varlen, longest=cfg.data.max_seq_length)
    )
    if probe.packing == probes.PACKED_VARLEN and not d.is_main:
        from trainer.model.attention import VARLEN, register

        register()
        probes._hf(loaded.base).set_attn_implementation(VARLEN)  # rank 0's probe switched its own copy
    loss_module.full_logits = probe.full_logits
    for line in probes.describe(probe, loaded.arch):
        log(line)
    if t.fsdp and d.enabled:
        model = D.wrap_model(model, d, fsdp=True, precision=placement.precision)
    opt = optim.optimizer(model, t)
    if not t.fsdp:
        model = D.wrap_model(model, d, fsdp=False)
    wrapped = model
    if t.torch_compile:
        model = torch.compile(model)
    trainable = [q for q in model.parameters() if q.requires_grad]
    return Net(loaded.base, loss_module, wrapped, model, probe, loaded.arch, trainable), opt


class Training:
    """The training model, its optimizer and schedule, held in one place so that they can be dropped
    at once (`release`: before final/ is rebuilt from the files or quantization runs in this process;
    at 7B each is as large as the model). Reading them after release is a bug, raised as one."""

    def __init__(self, net: Net, optimizer: torch.optim.Optimizer, scheduler: Any):
        self._net: Optional[Net] = net
        self._optimizer: Optional[torch.optim.Optimizer] = optimizer
        self.scheduler: Any = scheduler

    @property
    def net(self) -> Net:
        if self._net is None:
            raise RuntimeError("the training model was released")
        return self._net

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        if self._optimizer is None:
            raise RuntimeError("the optimizer was released")
        return self._optimizer

    @property
    def released(self) -> bool:
        return self._net is None

    def release(self) -> None:
        import gc

        self._net = self._optimizer = self.scheduler = None
        gc.collect()

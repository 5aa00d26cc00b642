"""Where a run's weights live and what computes them, decided before anything large is loaded: the
compute precision (on a CPU, bf16 only where rank 0 measures it fast), the frozen base's storage dtype
(the widest the memory plan fits), the dtypes of the base's files and of final/, and whether gradient
checkpointing is needed. Refused here, in one line naming the fixes, where nothing fits.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional

import torch

from trainer.config import TrainerConfig
from trainer.data import Prepared
from trainer.errors import UserError
from trainer.model import memplan, modeling
from trainer.runtime import distributed as D
from trainer.train.steps import StepPlan, micro_batch_tokens


@dataclass
class Placement:
    precision: D.Precision  # compute dtype, autocast, the trained parameters' dtype
    load_dtype: torch.dtype  # what the frozen base is held in
    storage_reason: str  # why that dtype (logged where weights are widened for compute)
    file_dtype: torch.dtype  # what the base's files hold (final/ re-reads them in it)
    save_dtype: torch.dtype  # what final/ is written in
    memory: memplan.Decision  # the plan that chose all this (logged, in report.json and the trackers)
    gradient_checkpointing: bool  # asked for, or turned on by the plan on some rank

    def frozen_base(self, base_bits: Optional[int]) -> str:
        """The frozen base as the log names it."""
        if not base_bits:
            return D._short(self.load_dtype)
        from trainer.model.qlora import short_name

        return f"{short_name(base_bits)} (embeddings, head and norms {D._short(self.load_dtype)})"

    def quantization(self, cfg: TrainerConfig) -> Any:
        """QLoRA (lora.base_bits): the BitsAndBytesConfig the base loads through; None for LoRA and full."""
        bits = cfg.lora.base_bits if cfg.lora.enabled else None
        if not bits:
            return None
        from trainer.model import qlora

        return qlora.quantization_config(bits, self.precision.compute)


def choose(cfg: TrainerConfig, d: D.Dist, path: str, data: Prepared, steps: StepPlan, log) -> Placement:
    precision, storage, reason = _precision(cfg, d)
    save_dtype = modeling.save_dtype(cfg.model.save_dtype, path)
    _check_quantization(cfg, path, save_dtype, log)
    # What the weights are held in: what the optimizer updates in fp32; a LoRA run's frozen base in
    # bf16 under mixed precision or model.dtype bf16, else in fp32 where the memory plan fits it.
    file_dtype = modeling.save_dtype("auto", path)
    decision, index, why, checkpointing = _plan_memory(cfg, d, path, data, steps, precision, storage, save_dtype)
    if why:
        reason = f"memory: {D._short(storage[0])} would {why}"
    log(decision.log_line())
    return Placement(precision, storage[index], reason, file_dtype, save_dtype, decision, checkpointing)


def _precision(cfg: TrainerConfig, d: D.Dist) -> tuple[D.Precision, list[torch.dtype], str]:
    """The compute dtype (on a CPU: bf16 only where rank 0 measures it fast, every rank taking its
    answer) and the frozen base's candidate storage dtypes, narrowest last."""
    cuda = d.device.type == "cuda"
    from trainer.model.compute import rates

    measured = None if cuda else D.on_main(d, rates)
    precision = D.choose_precision(
        cfg.model.dtype, cuda, cuda and torch.cuda.is_bf16_supported(), measured, cfg.model.compute_dtype
    )
    storage, reason = D.frozen_storage(precision, cfg.model.dtype, cfg.lora.enabled, cuda)
    return precision, storage, reason


def _check_quantization(cfg: TrainerConfig, path: str, save_dtype: torch.dtype, log) -> None:
    """Shapes only (meta device): a quantization that cannot shrink this model is refused now, not
    after hours of training."""
    if not cfg.quantize.enabled:
        return
    from trainer.post.quantize import also_config, preflight

    sizes = preflight(cfg.quantize, path, save_dtype)
    log(f"quantize after training: {sizes.explain()}")
    for fmt in cfg.quantize.also:
        preflight(also_config(cfg.quantize, fmt), path, save_dtype)


def _load_libraries(model_path: str) -> None:
    """Import what the run will import later (the model's modeling module, peft, checkpointing, the
    report's plotting), so the memory plan measures the whole runtime rather than part of it."""
    import matplotlib  # noqa: F401
    import peft  # noqa: F401
    import torch.distributed.checkpoint  # noqa: F401

    modeling.import_model_class(model_path)


def _plan_memory(
    cfg: TrainerConfig,
    d: D.Dist,
    path: str,
    data: Prepared,
    steps: StepPlan,
    precision: D.Precision,
    storage: list[torch.dtype],
    save_dtype: torch.dtype,
):
    """The memory plan (trainer/model/memplan.py) of this run against what each process can have, per
    candidate storage dtype of the frozen base, widest first: (the decision, the dtype's index, why a
    wider one was passed over, gradient checkpointing). Every rank plans; all take the same decision
    (the tightest rank's); refused in one line where nothing fits."""
    import psutil

    shape = memplan.read_shape(path)
    cuda = d.device.type == "cuda"
    _load_libraries(path)
    # The runtime as measured now, with every library of the run loaded, plus the kernels' working memory;
    # on a GPU the plan is the device's (the host holds the runtime) and quantization runs on the host.
    now = psutil.Process().memory_info().rss
    cuda_free = torch.cuda.mem_get_info(d.device)[0] if cuda else None
    budget, source = memplan.available_memory(d.local_world_size, now, cuda_free)
    plans = []  # per storage dtype: its setting, runtime, decision, every rank's answer
    for dtype in storage:
        setting = memplan.setting_for(
            cfg,
            shape,
            d.world_size,
            d.local_world_size,
            precision.mixed,
            cuda,
            tokens=micro_batch_tokens(data.train, steps.batches),
            save_bytes=torch.empty((), dtype=save_dtype).element_size(),
            compute_bytes=precision.compute.itemsize,
            frozen_bytes=dtype.itemsize,
        )
        runtime = 0 if cuda else now + memplan.workspace(setting.compute_bytes, cuda)
        if cuda:
            setting = replace(setting, quantize=False)
        decision = memplan.decide(shape, setting, runtime, budget, source)
        # One gather: every rank learns whether all fit, and the tightest rank's refusal.
        everyone = d.all_gather_object(
            (
                decision.fits,
                decision.turned_on_checkpointing is not None,
                decision.plan.peak - decision.budget,
                decision.refusal(memplan.fixes(cfg, setting, shape)),
            )
        )
        plans.append((setting, runtime, decision, everyone))
    index, why = memplan.pick([(all(e[0] for e in everyone), any(e[1] for e in everyone)) for _, _, _, everyone in plans])
    if index is None:
        everyone = plans[-1][3]  # the narrowest storage's refusal: the best plan there is
        raise UserError(max(everyone, key=lambda e: e[2])[3])
    setting, runtime, decision, everyone = plans[index]
    checkpointing = cfg.training.gradient_checkpointing or any(e[1] for e in everyone)
    if checkpointing and not decision.plan.setting.gradient_checkpointing:  # another rank's need
        decision = memplan.decide(shape, replace(setting, gradient_checkpointing=True), runtime, budget, source)
        decision.turned_on_checkpointing = memplan.estimate(shape, setting, runtime)
    return decision, index, why, checkpointing

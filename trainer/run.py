"""Building a fine-tune from its config: data, model, optimizer, schedule, checkpointer (the loop that
steps them is trainer/train.py). Also the step plan both share: which examples each rank takes at
each step (bench/hf_baseline.py replays it for the Hugging Face Trainer).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, replace
from typing import Any, Optional, cast

import numpy as np
import torch

from trainer import data as data_module
from trainer import distributed as D
from trainer import identity, modeling, probes
from trainer.checkpoint import Checkpointer, estimate_checkpoint_bytes
from trainer.config import TrainerConfig, world_problem
from trainer.data import Prepared, epoch_order, shard
from trainer.data.batches import BatchOrder
from trainer.data.cache import Split
from trainer.errors import UserError
from trainer.lock import OutputLock
from trainer.metrics import Logger, MetricsWriter
from trainer.preemption import StopRequest


@dataclass
class StepPlan:
    """Which micro-batches each rank runs, and the global label-token count of every step."""

    batches: BatchOrder
    label_counts: np.ndarray
    micro_per_epoch: int
    steps_per_epoch: int
    total_steps: int


def plan(split: Split, cfg: TrainerConfig, world: int) -> StepPlan:
    t = cfg.training
    batches = BatchOrder(len(split), t.per_device_train_batch_size, t.seed, split.lengths, t.tokens_per_micro_batch)
    micro_per_epoch = len(batches) // world
    steps_per_epoch = micro_per_epoch // t.gradient_accumulation_steps
    if steps_per_epoch == 0:
        raise UserError(f"data: {len(split)} training examples make {len(batches)} batches of "
                        f"{t.per_device_train_batch_size}, too few for {world} processes x "
                        f"{t.gradient_accumulation_steps} accumulation steps. Fix: more data, or smaller "
                        "training.per_device_train_batch_size / gradient_accumulation_steps")
    total = t.max_steps if t.max_steps > 0 else math.ceil(t.num_train_epochs * steps_per_epoch)
    # Labels are shifted by one inside the loss: an example's first token is never a target.
    return StepPlan(batches, batches.counts(split.trained), micro_per_epoch, steps_per_epoch, total)


def step_batches(p: StepPlan, cfg: TrainerConfig, step: int, rank: int, world: int) -> tuple[int, list[np.ndarray], int]:
    """(epoch, this rank's micro-batches, global label tokens) of optimizer step `step` (0-based).

    Every rank holds the same seeded order, so each can compute the global token count of a step
    locally: the loss is normalised without a collective per step."""
    accum = cfg.training.gradient_accumulation_steps
    epoch, index = divmod(step, p.steps_per_epoch)
    order = epoch_order(len(p.batches), cfg.training.seed, epoch)
    lo, hi = index * accum, (index + 1) * accum
    mine = None
    total = 0
    for r in range(world):
        ids = shard(order, r, world)[lo:hi]
        if r == rank:
            mine = [p.batches[int(b)] for b in ids]
        total += int(p.label_counts[ids].sum())
    assert mine is not None  # rank < world
    return epoch, mine, total


def micro_batch_tokens(split: Split, batches: BatchOrder) -> int:
    """Tokens of the largest micro-batch as the step computes it (padded to its longest example; a
    packed row is never longer): what activation memory scales with."""
    if len(batches) == 0 or len(split) == 0:
        return 1
    lengths = np.asarray(split.lengths)[batches.perm]
    starts = batches.starts[:-1]
    longest = np.maximum.reduceat(lengths, starts)
    sizes = np.diff(batches.starts)
    return int((longest * sizes).max())


def _load_libraries(model_path: str) -> None:
    """Import what the run will import later (the model's modeling module, peft, checkpointing, the
    report's plotting), so the memory plan measures the whole runtime rather than part of it."""
    import matplotlib  # noqa: F401
    import peft  # noqa: F401
    import torch.distributed.checkpoint  # noqa: F401

    modeling.import_model_class(model_path)


class Run:
    """Everything a fine-tune is built from, made from the config in one place: the process group,
    the output lock, the tokenizer and data, the memory plan, the model (LoRA applied, probed, wrapped
    in DDP or FSDP2), the optimizer, the schedule and the checkpointer. trainer/train.py steps it."""

    def __init__(self, cfg: TrainerConfig, dist: Optional[D.Dist] = None):
        self.cfg = cfg
        self.t = cfg.training
        self.dist = dist or D.init(self.t.ddp_backend)
        self.log = Logger(self.dist.is_main)
        self.lock: Optional[OutputLock] = None
        self.stop = StopRequest(self.dist.local_rank)
        self.gradient_checkpointing = cfg.training.gradient_checkpointing  # the memory plan may turn it on
        self.started = time.perf_counter()

    # ------------------------------------------------------------------------------------

    def setup(self) -> None:
        cfg, t, d = self.cfg, self.t, self.dist
        torch.manual_seed(t.seed)
        random.seed(t.seed)
        if d.device.type == "cpu":
            torch.set_num_threads(t.cpu_threads or D.default_threads(d.local_world_size))
        problem = world_problem(cfg, d.world_size)
        if problem:
            raise UserError(problem)
        if cfg.lora.enabled and cfg.lora.base_bits:
            from trainer import qlora

            qlora.require()
        # One writer per output_dir, before anything in it is read or written.
        self.lock = OutputLock(cfg.out, log=self.log) if d.is_main else None
        D.on_main(d, lambda: cast(OutputLock, self.lock).acquire())
        if t.trackers:  # a tracker that cannot be reached is refused now, not at step N
            from trainer import tracking

            D.on_main(d, lambda: tracking.check(cfg))
        token = modeling.read_token()
        path = modeling.resolve(cfg.model, token, d, data_module.cache_root(cfg), self.log)
        self.tokenizer = modeling.load_tokenizer(path)
        self.model_path = path
        self.log(f"world {d.world_size} (backend {d.backend or 'none'}, device {d.device.type}, "
                 f"{torch.get_num_threads()} threads/process)")
        self.data: Prepared = data_module.for_config(cfg, self.tokenizer, path, token, d, self.log)
        self.log(f"data: {self.data.summary()}; validation: {len(self.data.val)} examples "
                 f"({self.data.val_stats.records} records, {self.data.invalid()['validation']} invalid skipped)")
        if self.data.stats.truncated:
            self.log(f"data: {self.data.stats.truncated} examples longer than data.max_seq_length="
                     f"{cfg.data.max_seq_length} were truncated")
        self.data.log_invalid(self.log)
        self.plan = plan(self.data.train, cfg, d.world_size)

        self.precision = self._choose_precision()
        self.save_dtype = modeling.save_dtype(cfg.model.save_dtype, path)
        if cfg.quantize.enabled:
            # Shapes only (meta device): a quantization that cannot shrink this model is refused now,
            # not after hours of training.
            from trainer.quantize import preflight

            sizes = preflight(cfg.quantize, path, self.save_dtype)
            self.log(f"quantize after training: {sizes.explain()}")
            for fmt in cfg.quantize.also:
                from trainer.quantize import also_config

                preflight(also_config(cfg.quantize, fmt), path, self.save_dtype)
        # What the weights are held in: what the optimizer updates in fp32; a LoRA run's frozen base in
        # bf16 under mixed precision or model.dtype bf16, else in fp32 where the memory plan fits it.
        self.file_dtype = modeling.save_dtype("auto", path)
        self.memory = self._plan_memory(path)  # before anything large is loaded: refused here if it cannot fit
        model = modeling.load_model(path, self.load_dtype, cfg.model.attn_implementation, d.device,
                                    self._quantization())
        if cfg.lora.enabled and cfg.lora.base_bits:
            from trainer import qlora

            self.log(qlora.inspect(model, cfg.lora.base_bits).describe())
        if self.gradient_checkpointing:
            model.gradient_checkpointing_enable()
            model.enable_input_require_grads()
        targets = None
        if cfg.lora.enabled:
            torch.manual_seed(t.seed)  # the adapters' initial values follow training.seed alone
            model, targets = modeling.apply_lora(model, cfg.lora)
            modeling.trainable_fp32(model)
        if self.load_dtype.itemsize < self.precision.compute.itemsize:
            from trainer.compute import widen

            self.log(f"frozen weights {D._short(self.load_dtype)} ({self.storage_reason}), compute "
                     f"{D._short(self.precision.compute)}: {widen(model, self.precision.compute).describe()}")
        trainable, total = modeling.trainable_parameters(model)
        self.arch = type(model.get_base_model() if hasattr(model, "get_base_model") else model).__name__
        self.log(f"model {cfg.model.name_or_path} ({self.arch}): {total / 1e6:.1f}M parameters, "
                 f"{trainable / 1e6:.2f}M trainable ({f'LoRA r={cfg.lora.r} on {targets}' if targets else 'full fine-tune'}"
                 f"), attention {model.config._attn_implementation}, {self.precision.describe()}"
                 + (f", frozen base in {self._frozen_base()}" if cfg.lora.enabled else "")
                 + f"; final/ saved as {D._short(self.save_dtype)}")
        # What the checkpoints of this run hold (the resume guard compares it; rank 0 reads the files).
        fingerprints = (D.on_main(d, lambda: identity.weights_fingerprint(path)), self.data.content)
        lora_names = sorted({n.rsplit(".", 1)[-1] for n in targets}) if isinstance(targets, list) else targets
        self.identity = identity.guarded(cfg, fingerprints[0], fingerprints[1], str(self.precision.params),
                                         lora_names if cfg.lora.enabled else None)
        self.base = model
        model = self.loss_module = modeling.CausalLMLoss(model)
        # Rank 0 measures on the model (milliseconds) and every rank takes its answer.
        # Variable-length attention (Σ len², no dense mask) where transformers would build a block-diagonal
        # mask for packed rows: SDPA and eager. Flash-attention already runs packed rows as variable-length.
        varlen = cfg.model.attn_implementation == "auto" and self.base.config._attn_implementation in ("sdpa", "eager")
        self.probe = D.on_main(d, lambda: probes.run(model, cfg.data.packing, d.device, varlen=varlen,
                                                          longest=cfg.data.max_seq_length))
        if self.probe.packing == probes.PACKED_VARLEN and not d.is_main:
            from trainer.attention import VARLEN, register

            register()
            probes._hf(self.base).set_attn_implementation(VARLEN)  # rank 0's probe switched its own copy
        model.full_logits = self.probe.full_logits
        for line in probes.describe(self.probe, self.arch):
            self.log(line)
        if t.fsdp and d.enabled:
            model = D.wrap_model(model, d, fsdp=True, precision=self.precision)
        self.optimizer = self._optimizer(model)
        if not t.fsdp:
            model = D.wrap_model(model, d, fsdp=False)
        self.wrapped = model  # what checkpoints save and load (DDP or FSDP, before torch.compile)
        if t.torch_compile:
            model = torch.compile(model)
        self.model = model
        self.trainable = [q for q in model.parameters() if q.requires_grad]  # clipped every step
        # Fused AdamW can skip a non-finite step on the device (no host sync); others check on the host.
        self.skip_on_device = bool(self.optimizer.defaults.get("fused"))
        self.scheduler = self._scheduler(0)
        self.ckpt = Checkpointer(cfg.checkpoints_dir, t.save_total_limit, d, self.log)
        self.ckpt_estimate = estimate_checkpoint_bytes(self.base)
        self.outputs_estimate = self._outputs_bytes()
        self.log("space: " + D.on_main(d, lambda: self.ckpt.check_space(self.ckpt_estimate, self.outputs_estimate,
                                                                          measured=False)))
        self.metrics = MetricsWriter(cfg.metrics_path, d.is_main)

    def _quantization(self) -> Any:
        """QLoRA (lora.base_bits): the BitsAndBytesConfig the base loads through; None for LoRA and full."""
        bits = self.cfg.lora.base_bits if self.cfg.lora.enabled else None
        if not bits:
            return None
        from trainer import qlora

        return qlora.quantization_config(bits, self.precision.compute)

    def _frozen_base(self) -> str:
        bits = self.cfg.lora.base_bits
        if not bits:
            return D._short(self.load_dtype)
        from trainer.qlora import short_name

        return f"{short_name(bits)} (embeddings, head and norms {D._short(self.load_dtype)})"

    def _choose_precision(self) -> D.Precision:
        """The compute dtype (on a CPU: bf16 only where rank 0 measures it fast, every rank taking its
        answer) and the frozen base's candidate storage dtypes, narrowest last."""
        cfg, d = self.cfg, self.dist
        cuda = d.device.type == "cuda"
        from trainer.compute import rates

        measured = None if cuda else D.on_main(d, rates)
        precision = D.choose_precision(cfg.model.dtype, cuda, cuda and torch.cuda.is_bf16_supported(), measured,
                                       cfg.model.compute_dtype)
        self.storage, self.storage_reason = D.frozen_storage(precision, cfg.model.dtype, cfg.lora.enabled, cuda)
        self.load_dtype = self.storage[0]
        return precision

    def _plan_memory(self, path: str):
        """The memory plan (trainer/memplan.py) of this run against what each process can have; gradient
        checkpointing turned on where only that makes it fit; refused in one line where nothing does.
        Every rank plans; all take the same decision (the tightest rank's)."""
        import psutil

        from trainer import memplan

        cfg, d = self.cfg, self.dist
        shape = memplan.read_shape(path)
        cuda = d.device.type == "cuda"
        _load_libraries(path)
        # The runtime as measured now, with every library of the run loaded, plus the kernels' working memory;
        # on a GPU the plan is the device's (the host holds the runtime) and quantization runs on the host.
        now = psutil.Process().memory_info().rss
        cuda_free = torch.cuda.mem_get_info(d.device)[0] if cuda else None
        budget, source = memplan.available_memory(d.local_world_size, now, cuda_free)
        plans = []  # per storage dtype of the frozen base, widest first: its setting, runtime, decision, every rank's
        for storage in self.storage:
            setting = memplan.setting_for(cfg, shape, d.world_size, d.local_world_size, self.precision.mixed, cuda,
                                          tokens=micro_batch_tokens(self.data.train, self.plan.batches),
                                          save_bytes=torch.empty((), dtype=self.save_dtype).element_size(),
                                          compute_bytes=self.precision.compute.itemsize,
                                          frozen_bytes=storage.itemsize)
            runtime = 0 if cuda else now + memplan.workspace(setting.compute_bytes, cuda)
            if cuda:
                setting = replace(setting, quantize=False)
            decision = memplan.decide(shape, setting, runtime, budget, source)
            # One gather: every rank learns whether all fit, and the tightest rank's refusal.
            everyone = d.all_gather_object((decision.fits, decision.turned_on_checkpointing is not None,
                                            decision.plan.peak - decision.budget,
                                            decision.refusal(memplan.fixes(cfg, setting, shape))))
            plans.append((setting, runtime, decision, everyone))
        index, why = memplan.pick([(all(e[0] for e in everyone), any(e[1] for e in everyone))
                                   for _, _, _, everyone in plans])
        if index is None:
            everyone = plans[-1][3]  # the narrowest storage's refusal: the best plan there is
            raise UserError(max(everyone, key=lambda e: e[2])[3])
        if why:
            self.storage_reason = f"memory: {D._short(self.storage[0])} would {why}"
        self.load_dtype = self.storage[index]
        setting, runtime, decision, everyone = plans[index]
        self.gradient_checkpointing = self.t.gradient_checkpointing or any(e[1] for e in everyone)
        if self.gradient_checkpointing and not decision.plan.setting.gradient_checkpointing:  # another rank's need
            decision = memplan.decide(shape, replace(setting, gradient_checkpointing=True), runtime, budget, source)
            decision.turned_on_checkpointing = memplan.estimate(shape, setting, runtime)
        self.log(decision.log_line())
        return decision

    def release(self) -> None:
        """Drop the training model, optimizer and their state (before final/ is rebuilt or quantization
        runs in this process: at 7B each is as large as the model)."""
        import gc

        for name in ("model", "wrapped", "base", "loss_module", "optimizer", "scheduler", "trainable"):
            if hasattr(self, name):
                delattr(self, name)
        gc.collect()

    def _outputs_bytes(self) -> int:
        """final/ (in its dtype), adapter/ and quantized/ (about a third of final/)."""
        total = sum(modeling.weights(p) for p in self.base.parameters())
        width = torch.empty((), dtype=self.save_dtype).element_size()
        adapter = sum(p.numel() * 4 for p in self.base.parameters() if p.requires_grad) if self.cfg.lora.enabled else 0
        return int(total * width * (1.4 if self.cfg.quantize.enabled else 1.0)) + adapter

    def _optimizer(self, model) -> torch.optim.Optimizer:
        decay: list[torch.nn.Parameter] = []
        no_decay: list[torch.nn.Parameter] = []
        for p in model.parameters():
            if p.requires_grad:
                (no_decay if p.ndim < 2 else decay).append(p)
        groups = [{"params": decay, "weight_decay": self.t.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        fused = self.t.optim == "adamw_torch_fused"
        return torch.optim.AdamW(groups, lr=self.t.learning_rate, fused=fused or None)

    def _scheduler(self, step: int):
        """The learning-rate schedule of the current config, at `step`. Derived, never restored: a
        resumed run follows the schedule its config states (the resume guard's rule)."""
        from transformers import get_scheduler

        t = self.t
        for group, decay in zip(self.optimizer.param_groups, (t.weight_decay, 0.0)):
            group["lr"] = group["initial_lr"] = t.learning_rate
            group["weight_decay"] = decay
        ratio = t.warmup_steps if 0 < t.warmup_steps < 1 else t.warmup_ratio
        warmup = int(t.warmup_steps) if t.warmup_steps >= 1 else int(ratio * self.plan.total_steps)
        scheduler = get_scheduler(t.lr_scheduler_type, self.optimizer, num_warmup_steps=warmup,
                                  num_training_steps=self.plan.total_steps)
        if step:  # transformers' schedules are LambdaLR: lr = base * lambda(step)
            scheduler.last_epoch = step
            scheduler._step_count = step + 1
            lrs = [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
            for group, lr in zip(self.optimizer.param_groups, lrs):
                group["lr"] = lr
            scheduler._last_lr = lrs
        return scheduler

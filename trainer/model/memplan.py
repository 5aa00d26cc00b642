"""The memory plan: each process's peak memory, from the model's config.json and the trainer config,
before anything large is loaded.

    python -m trainer plan --config config.yaml      # the plan of this config on this machine

Pure Python (no torch), like trainer/config.py, so the Pulumi program runs the same function at
preview against `resources.memory`. The terms, per process:

- runtime: the interpreter with torch and transformers imported (measured by the trainer before it
  plans; a constant at preview);
- weights: a LoRA run's frozen base in the dtype it computes in (bf16 under mixed precision), its
  adapters in fp32; a full fine-tune's fp32 master weights; FSDP shards both over the world, plus the
  layers it gathers for compute and the unsharded gradients awaiting their reduce-scatter; at load time
  every process briefly holds the whole model unsharded;
- gradients (fp32) and AdamW's two moments (fp32) of the trainable parameters, sharded by FSDP;
- autocast's bf16 copies of fp32 matmul weights (full fine-tune in mixed precision, without FSDP);
- a bf16 frozen base computed in fp32 (CPUs without fast bf16): a chunk of a matrix widened at a time;
- activations autograd keeps for the largest micro-batch: measured per token and layer on Llama
  decoder layers with saved-tensor hooks (bench/README.md): LoRA 25h + 6I bytes in bf16, full 36h + 8I;
  with gradient checkpointing only each layer's input (3h, 6h) plus one layer recomputed;
- the loss's logits over the labelled positions (bf16 logits, their fp32 copy and its gradient);
- the quantize stage (rank 0 alone, after training): final/ in its saved dtype, one layer in fp32.

The estimate is checked against measured peaks in tests (tiny models) and bench/scale.py (7B, 13B). It
counts what is allocated: the trainer makes glibc return freed blocks to the kernel
(trainer/runtime/allocator.py); without that, the holes malloc kept were 2 GiB beyond it at 13B.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

GIB = 1 << 30
DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2, "fp32": 4, "bf16": 2, "fp16": 2}
# RSS of a process with torch, transformers, peft and datasets imported (measured: 0.36-0.6 GiB); the
# trainer measures its own instead, this is for preview.
DEFAULT_RUNTIME = int(0.65 * GIB)
# A frozen bf16 matrix computed in fp32 is widened this many bytes at a time (trainer/model/compute.py).
WIDEN_CHUNK_BYTES = 8 << 20
# A QLoRA run's final/ is written from the base's files in shards of this size (trainer/model/merge.py).
MERGE_SHARD_BYTES = 1 << 30


def workspace(compute_bytes: int, cuda: bool = False) -> int:
    """Host memory the kernels add during training beyond the libraries' own, measured on tiny models
    (peak RSS minus the RSS with every library loaded): in bf16 on CPUs, oneDNN keeps one JIT-compiled
    kernel per distinct matrix shape (packed rows vary in length) in a cache of up to 1024, ~0.2 GiB;
    fp32 runs take ~0.02 GiB."""
    if cuda:
        return 0
    return int((0.25 if compute_bytes == 2 else 0.05) * GIB)


# Activation bytes per token per decoder layer at 2-byte compute, as a*hidden + b*intermediate
# (fitted on Llama layers with torch.autograd.graph.saved_tensors_hooks; see bench/README.md).
_ACT = {("lora", False): (25, 6), ("full", False): (36, 8), ("lora", True): (3, 0), ("full", True): (6, 0)}
_LOSS_BYTES_PER_LOGIT = 10  # bf16 logits + their fp32 copy + its gradient


_SUFFIX = {
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
    "m": 1e-3,
}


def quantity_bytes(value: str) -> int:
    """A Kubernetes memory quantity (16Gi, 512Mi, 1e9, 2G) in bytes."""
    m = re.fullmatch(r"([+-]?(?:\d+(?:\.\d*)?|\.\d+))([eE][+-]?\d+|[A-Za-z]{0,2})", value.strip())
    if not m or not (m.group(2) in _SUFFIX or m.group(2) == "" or m.group(2)[:1] in ("e", "E")):
        raise ValueError(
            f"{value!r} is not a Kubernetes quantity; write it like 46Gi, 512Mi or 1e9 (suffixes {', '.join(_SUFFIX)})"
        )
    number, suffix = float(m.group(1)), m.group(2)
    if suffix[:1] in ("e", "E"):
        return int(number * 10 ** int(suffix[1:]))
    return int(number * _SUFFIX.get(suffix, 1))


def _first(config: dict, *names, default=None):
    for n in names:
        if config.get(n) is not None:
            return config[n]
    return default


@dataclass(frozen=True)
class Shape:
    """What memory depends on, read from config.json (no weights)."""

    hidden: int
    layers: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    params: int
    saved_bytes: int  # bytes per weight in the files (2 for bf16/fp16 checkpoints)
    largest_shard: int = 0  # bytes of the largest weight file (mapped while loading)

    @classmethod
    def from_config(cls, config: dict, weight_bytes: Optional[int] = None, largest_shard: int = 0) -> "Shape":
        config = config.get("text_config") or config  # multimodal wrappers keep the LM's shape there
        h = int(_first(config, "hidden_size", "n_embd", "d_model"))
        layers = int(_first(config, "num_hidden_layers", "n_layer", "num_layers"))
        inter = int(_first(config, "intermediate_size", "n_inner", "ffn_dim", default=None) or 4 * h)
        vocab = int(_first(config, "vocab_size", default=32000))
        heads = int(_first(config, "num_attention_heads", "n_head", default=max(1, h // 64)))
        kv = int(_first(config, "num_key_value_heads", default=heads) or heads)
        head_dim = int(_first(config, "head_dim", default=None) or h // heads)
        tied = bool(config.get("tie_word_embeddings", False))
        dtype = str(_first(config, "dtype", "torch_dtype", default="float32")).replace("torch.", "")
        saved = DTYPE_BYTES.get(dtype, 4)
        per_layer = h * heads * head_dim + 2 * h * kv * head_dim + heads * head_dim * h + 3 * h * inter + 2 * h
        formula = vocab * h * (1 if tied else 2) + layers * per_layer + h
        params = weight_bytes // saved if weight_bytes else formula
        return cls(h, layers, inter, vocab, heads, kv, head_dim, tied, params, saved, largest_shard)

    @property
    def layer_params(self) -> int:
        return max(1, (self.params - self.vocab * self.hidden * (1 if self.tied else 2)) // max(1, self.layers))


def read_shape(model_dir: str | Path) -> Shape:
    """The shape of a local model directory: config.json, and the weight files' sizes (exact params)."""
    root = Path(model_dir)
    config = json.loads((root / "config.json").read_text())
    files = sorted(root.glob("*.safetensors")) or sorted(root.glob("*.bin"))
    sizes = [f.stat().st_size for f in files]
    return Shape.from_config(config, sum(sizes) or None, max(sizes, default=0))


def lora_trainable(shape: Shape, r: int, targets: tuple[str, ...], modules_to_save: tuple[str, ...] = ()) -> int:
    """Adapter parameters: r x (in + out) per adapted projection, per layer."""
    h, kvd = shape.hidden, shape.kv_heads * shape.head_dim
    qd = shape.heads * shape.head_dim
    dims = {
        "q_proj": (h, qd),
        "k_proj": (h, kvd),
        "v_proj": (h, kvd),
        "o_proj": (qd, h),
        "gate_proj": (h, shape.intermediate),
        "up_proj": (h, shape.intermediate),
        "down_proj": (shape.intermediate, h),
    }
    names = list(targets)
    if names == ["auto"]:
        names = ["q_proj", "k_proj", "v_proj", "o_proj"]
    elif names == ["all-linear"]:
        names = list(dims)
    per_layer = sum(r * sum(dims.get(n, (h, h))) for n in names)
    extra = sum(shape.vocab * shape.hidden for m in modules_to_save if m in ("lm_head", "embed_tokens", "wte"))
    return per_layer * shape.layers + extra


@dataclass(frozen=True)
class Setting:
    """What the trainer config (and the launch) says about memory."""

    lora: bool
    lora_trainable: int
    mixed: bool  # bf16 compute, fp32 master weights
    compute_bytes: int  # 2 (bf16) or 4
    master_bytes: int  # bytes per trainable weight (4; 2 for pure bf16)
    frozen_bytes: int  # bytes per frozen weight (LoRA base)
    world: int
    local_processes: int
    fsdp: bool
    tokens: int  # the largest micro-batch, in tokens
    gradient_checkpointing: bool
    quantize: bool
    save_bytes: int
    cuda: bool = False
    quantize_bits: int = 4
    base_bits: int = 0  # QLoRA: the frozen base's linear layers in 4 or 8 bits (0: in frozen_bytes)


@dataclass
class MemoryPlan:
    """Bytes per term, for one process; `peak` is the largest of the load, train and quantize stages."""

    terms: dict[str, int]
    load: int
    train: int
    quantize: int
    setting: Setting
    final: int = 0  # QLoRA: final/ streamed from the base's files (a LoRA base is merged where it is held)

    @property
    def peak(self) -> int:
        return max(self.load, self.train, self.quantize, self.final)

    def describe(self) -> str:
        parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in self.terms.items() if v >= 0.005 * GIB)
        stages = (
            f"load {self.load / GIB:.1f}, train {self.train / GIB:.1f}"
            + (f", final/ {self.final / GIB:.1f}" if self.final else "")
            + (f", quantize {self.quantize / GIB:.1f}" if self.quantize else "")
        )
        return f"{self.peak / GIB:.1f} GiB per process ({stages}): {parts}"


def estimate(shape: Shape, s: Setting, runtime: int = DEFAULT_RUNTIME) -> MemoryPlan:
    n = shape.params
    shard = s.world if s.fsdp else 1
    trainable = s.lora_trainable if s.lora else n
    terms: dict[str, int] = {"runtime": runtime}
    quantized = _quantized_weights(shape) if s.lora and s.base_bits else 0
    if s.lora:
        terms["frozen weights"] = (n - quantized) * s.frozen_bytes // shard
        if quantized:
            terms.update(_qlora_terms(shape, s, quantized))
        terms["adapters"] = trainable * 4 // shard
    else:
        terms["weights"] = n * s.master_bytes // shard
    terms["gradients"] = trainable * s.master_bytes // shard
    terms["optimizer"] = 2 * trainable * s.master_bytes // shard
    if s.fsdp and s.world > 1:  # the layer being computed and the next one prefetched, unsharded
        terms["fsdp gathered layers"] = 2 * shape.layer_params * (s.compute_bytes if s.mixed else s.master_bytes)
        # During the backward the gradients wait unsharded in fp32 for their reduce-scatter: measured
        # +2.75 GiB a process at 1.1B on 2 processes (bench/README.md), the other ranks' share of them.
        terms["fsdp gradient reduction"] = trainable * 4 * (s.world - 1) // s.world
    elif s.mixed and not s.lora:  # autocast's bf16 copies of the fp32 weights, alive from forward to backward
        terms["autocast weight copies"] = (n - shape.vocab * shape.hidden) * s.compute_bytes
    if s.lora and s.frozen_bytes < s.compute_bytes:
        # bf16 storage computed in fp32 (trainer/model/compute.py): one chunk widened at a time, and the next
        # one's widening may start before the last is freed.
        terms["widened weights"] = 2 * WIDEN_CHUNK_BYTES
    kind = "lora" if s.lora else "full"
    scale = s.compute_bytes / 2

    def per_token(checkpointed: bool) -> float:
        a, b = _ACT[(kind, checkpointed)]
        return (a * shape.hidden + b * shape.intermediate) * scale

    # Backward holds about one more whole layer's worth (the activations' gradients; a recomputed layer).
    terms["activations"] = int(s.tokens * (shape.layers * per_token(s.gradient_checkpointing) + per_token(False)))
    terms["loss logits"] = int(s.tokens * shape.vocab * _LOSS_BYTES_PER_LOGIT * scale)
    train = sum(terms.values())
    # Loading: every process holds the whole model in its load dtype before FSDP shards it. Weights of
    # the files' own dtype are mapped from them, not copied; a conversion maps one file at a time.
    load_bytes = s.frozen_bytes if s.lora else s.master_bytes
    load = runtime + n * load_bytes + (0 if load_bytes == shape.saved_bytes else shape.largest_shard)
    final = 0
    if quantized:
        # Each weight is quantized as it is read (one file mapped at a time); final/ is then streamed from
        # the files (trainer/model/merge.py): a shard being written and the largest tensor with its fp32 merge.
        load = runtime + terms["frozen weights"] + terms["quantized weights"] + shape.largest_shard
        final = runtime + MERGE_SHARD_BYTES + 2 * 4 * shape.hidden * max(shape.vocab, shape.intermediate)
    quantize = quantize_bytes(shape, runtime, s.save_bytes, s.quantize_bits) if s.quantize else 0
    return MemoryPlan(terms, load, train, quantize, s, final)


# NF4 with double quantization (bitsandbytes): 4 bits a weight, an 8-bit absmax per block of 64 weights and
# an fp32 absmax per 256 blocks (the QLoRA paper's 4.127 bits a weight).
NF4_BLOCK = 64
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / NF4_BLOCK + 4 / (NF4_BLOCK * 256)


def quantized_bytes_per_weight(bits: int, in_features: int) -> float:
    """Bytes a QLoRA base's weight takes: NF4 with double quantization, or int8 with an fp32 scale per row."""
    return NF4_BYTES_PER_WEIGHT if bits == 4 else 1 + 4 / max(1, in_features)


def _quantized_weights(shape: Shape) -> int:
    """The weights a QLoRA base holds quantized: every decoder layer's linear layers (the embeddings,
    the head and the norms stay in the storage dtype)."""
    return shape.layers * (shape.layer_params - 2 * shape.hidden)


def _qlora_terms(shape: Shape, s: Setting, quantized: int) -> dict[str, int]:
    packed = int(quantized * quantized_bytes_per_weight(s.base_bits, shape.hidden))
    # bitsandbytes dequantizes a layer's whole weight for its matmul (forward, and again for the input's
    # gradient) into the dtype it was quantized from, then casts it to the compute dtype.
    largest = shape.hidden * max(shape.intermediate, shape.heads * shape.head_dim)
    width = s.frozen_bytes + (s.compute_bytes if s.compute_bytes != s.frozen_bytes else 0)
    return {"quantized weights": packed, "dequantized layer": largest * width}


def quantize_bytes(shape: Shape, runtime: int, save_bytes: int, bits: int = 4) -> int:
    """The quantize stage: final/ loaded in its saved dtype (pages mapped from its files, which stay
    resident while the file is mapped, also for layers already quantized), the packed layers
    accumulating beside it (bits/8 a weight plus a scale per group of 128), one decoder layer widened
    to fp32, and the evaluation's full logits (fp32, up to 2048 tokens, and their log-softmax)."""
    packed = shape.layers * shape.layer_params * (bits / 8 + 4 / 128)
    return int(runtime + shape.params * save_bytes + packed + shape.layer_params * 4 + 2 * 2048 * shape.vocab * 4)


def setting_for(
    cfg,
    shape: Shape,
    world: int,
    local_processes: int,
    mixed: bool,
    cuda: bool = False,
    tokens: Optional[int] = None,
    save_bytes: Optional[int] = None,
    compute_bytes: Optional[int] = None,
    frozen_bytes: Optional[int] = None,
) -> Setting:
    """The Setting of a TrainerConfig (trainer/config.py) on `world` processes. The compute and frozen
    storage widths are the trainer's choice where it has made one (a CPU without fast bf16 computes in
    fp32 and may keep the frozen base in bf16); by default, what model.dtype says."""
    t = cfg.training
    pure = cfg.model.dtype == "pure-bf16"
    compute = compute_bytes or (2 if (mixed or pure) else 4)
    master = 2 if pure else 4
    # LoRA's frozen base: the compute dtype under mixed precision, else the master dtype.
    frozen = frozen_bytes or (2 if (mixed or pure) else master)
    if tokens is None:
        tokens = t.tokens_per_micro_batch or t.per_device_train_batch_size * cfg.data.max_seq_length
    lt = lora_trainable(shape, cfg.lora.r, tuple(cfg.lora.target_modules), tuple(cfg.lora.modules_to_save))
    sb = save_bytes or {"bf16": 2, "fp16": 2, "fp32": 4}.get(cfg.model.save_dtype, shape.saved_bytes)
    return Setting(
        lora=cfg.lora.enabled,
        lora_trainable=lt,
        mixed=mixed,
        compute_bytes=compute,
        master_bytes=master,
        frozen_bytes=frozen,
        world=world,
        local_processes=local_processes,
        fsdp=t.fsdp and world > 1,
        tokens=tokens,
        gradient_checkpointing=t.gradient_checkpointing,
        quantize=cfg.quantize.enabled,
        save_bytes=sb,
        cuda=cuda,
        quantize_bits=cfg.quantize.bits,
        base_bits=(cfg.lora.base_bits or 0) if cfg.lora.enabled else 0,
    )


# ---- what a process can have --------------------------------------------------------------------


def _cgroup_limit(proc_cgroup: str = "/proc/self/cgroup", root: str = "/sys/fs/cgroup") -> Optional[tuple[int, str]]:
    """The tightest memory limit of this process's cgroup and its parents (v2 memory.max, v1
    memory.limit_in_bytes); None when unlimited or unreadable."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    best: Optional[tuple[int, str]] = None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # v2: the unified hierarchy (under unified/ on hybrid hosts)
            base = Path(root) if (Path(root) / "cgroup.controllers").exists() else Path(root) / "unified"
            name = "memory.max"
        elif "memory" in controllers.split(","):
            base, name = Path(root) / "memory", "memory.limit_in_bytes"
        else:
            continue
        here = base / path.lstrip("/")
        while True:
            try:
                text = (here / name).read_text().strip()
                if text != "max" and int(text) < (1 << 60):
                    limit = int(text)
                    if best is None or limit < best[0]:
                        best = (limit, str(here / name))
            except (OSError, ValueError):
                pass
            if here == base or here.parent == here:
                break
            here = here.parent
    return best


def available_memory(
    local_processes: int,
    current_rss: int,
    cuda_free: Optional[int] = None,
    proc_cgroup: str = "/proc/self/cgroup",
    cgroup_root: str = "/sys/fs/cgroup",
    meminfo: str = "/proc/meminfo",
) -> tuple[int, str]:
    """(bytes one process may use, where that figure comes from). The container's cgroup limit is
    shared by the pod's processes; without one, the node's available memory (plus what this process
    already holds) is."""
    if cuda_free is not None:
        return cuda_free, "the GPU's free memory"
    limit = _cgroup_limit(proc_cgroup, cgroup_root)
    if limit:
        return limit[0] // max(1, local_processes), f"the container's limit ({limit[1]}) / {local_processes} processes"
    try:
        info = dict(line.split(":", 1) for line in Path(meminfo).read_text().splitlines() if ":" in line)
        avail = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    return avail // max(1, local_processes) + current_rss, f"the node's available memory / {local_processes} processes"


@dataclass
class Decision:
    plan: MemoryPlan
    budget: int
    source: str
    fits: bool
    turned_on_checkpointing: Optional[MemoryPlan] = None  # the plan without checkpointing, when it was turned on

    def log_line(self) -> str:
        line = f"memory plan: {self.plan.describe()}; can have {self.budget / GIB:.1f} GiB ({self.source})"
        if self.turned_on_checkpointing is not None:
            line += (
                f"; gradient checkpointing turned on: without it {self.turned_on_checkpointing.peak / GIB:.1f} GiB would not fit"
            )
        return line

    def refusal(self, fixes: list[str]) -> str:
        return (
            f"memory plan: {self.plan.peak / GIB:.1f} GiB per process does not fit the {self.budget / GIB:.1f} GiB "
            f"it can have ({self.source}): {self.plan.describe()}. Fix: " + "; or ".join(fixes)
        )


def decide(shape: Shape, s: Setting, runtime: int, budget: int, source: str) -> Decision:
    """The plan, with gradient checkpointing turned on where only that makes it fit."""
    plan = estimate(shape, s, runtime)
    if plan.peak <= budget:
        return Decision(plan, budget, source, True)
    if not s.gradient_checkpointing:
        with_gc = estimate(shape, replace(s, gradient_checkpointing=True), runtime)
        if with_gc.peak <= budget:
            return Decision(with_gc, budget, source, True, turned_on_checkpointing=plan)
        plan = with_gc  # the refusal quotes the best plan
    return Decision(plan, budget, source, False)


def pick(options: list[tuple[bool, bool]]) -> tuple[Optional[int], str]:
    """Which of several plans to take (a LoRA base's storage dtypes, widest first), given for each
    whether it fits and whether only turning on gradient checkpointing made it fit: the first that fits
    as configured, else the first that fits at all (recomputing every layer costs ~1/3 more compute
    than a narrower storage widened per layer); None where none fits. With why the widest was passed
    over ("not fit", "need gradient checkpointing"; "" when it was taken)."""
    index = next(
        (i for i, (fits, checkpointing) in enumerate(options) if fits and not checkpointing),
        next((i for i, (fits, _) in enumerate(options) if fits), None),
    )
    why = "" if not index else ("need gradient checkpointing" if options[0][0] else "not fit")
    return index, why


def fixes(cfg, s: Setting, shape: Shape, where: str = "trainer config") -> list[str]:
    """What would make it fit, cheapest first, as config keys."""
    out = []
    if not s.lora:
        out.append("lora.enabled: true (trains adapters; the base stays frozen in bf16)")
    if s.world > 1 and not s.fsdp:
        out.append("training.fsdp: true (shards weights, gradients and optimizer state over the processes)")
    elif s.fsdp:
        out.append("more workers (FSDP shards over every process)")
    if s.local_processes > 1:
        out.append("fewer processes per worker (procsPerWorker)")
    if s.tokens > 256:
        out.append(f"training.tokens_per_micro_batch below {s.tokens} (or a smaller per_device_train_batch_size)")
    if (s.lora and s.frozen_bytes == 4) or (not s.lora and not s.mixed and s.compute_bytes == 4):
        out.append("model.dtype: bf16")
    out.append("a larger resources.memory (pulumi config set resources.memory ...)")
    return out


def as_dict(d: Decision) -> dict[str, Any]:
    return {
        "peak_gib": round(d.plan.peak / GIB, 3),
        "load_gib": round(d.plan.load / GIB, 3),
        "train_gib": round(d.plan.train / GIB, 3),
        "quantize_gib": round(d.plan.quantize / GIB, 3),
        "budget_gib": round(d.budget / GIB, 3),
        "source": d.source,
        "terms_gib": {k: round(v / GIB, 3) for k, v in d.plan.terms.items()},
        "gradient_checkpointing_turned_on": d.turned_on_checkpointing is not None,
    }

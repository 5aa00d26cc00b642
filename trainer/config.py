"""Trainer configuration: the one contract between the Pulumi program and the trainer.

The Pulumi program renders this YAML into a ConfigMap and validates it at preview time with this
module, so it must import nothing heavy (no torch, no transformers). The same file runs the trainer
locally:

    python -m trainer finetune --config config.yaml --set training.max_steps=20

Sections: ``model``, ``data``, ``training`` (Hugging Face ``TrainingArguments`` names), ``lora``,
``quantize`` and ``output_dir``. Every error names the key (and the file and line when the config
came from a file) and what would be valid.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional

import yaml

from trainer.errors import UserError


class ConfigError(UserError, ValueError):
    """A config value is wrong; the message names the key, where it came from and the fix."""


Location = dict[tuple[str, ...], int]


def _fail(path: tuple[str, ...], message: str, where: "_Where") -> typing.NoReturn:
    raise ConfigError(f"{where.describe(path)}{'.'.join(path) or '<config>'}: {message}")


@dataclass(frozen=True)
class _Where:
    """Where a raw config came from, so errors can say 'file:line'."""

    source: str = ""
    lines: Location = field(default_factory=dict)

    def describe(self, path: tuple[str, ...]) -> str:
        if not self.source:
            return ""
        # The deepest known ancestor's line is the best pointer for a missing or nested key.
        for depth in range(len(path), 0, -1):
            line = self.lines.get(path[:depth])
            if line is not None:
                return f"{self.source}:{line}: "
        return f"{self.source}: "


# --------------------------------------------------------------------------------------------
# Sections. Defaults live here and nowhere else (Pulumi.yaml documents the stack-level ones).
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfig:
    name_or_path: str = ""
    """Hub id (e.g. meta-llama/Llama-2-7b-hf), a local model directory, or a GGUF file: a local .gguf
    path or owner/repo/file.gguf on the hub (dequantized once into a model directory in the cache)."""
    gguf_file: Optional[str] = None
    """A GGUF file inside name_or_path (a directory or hub repo), as transformers' gguf_file; the
    fine-tune starts from its dequantized weights (what llama.cpp and Ollama run)."""
    dtype: Literal["auto", "bf16", "fp32", "pure-bf16"] = "auto"
    """Training precision. bf16: bf16 compute (autocast; FSDP's mixed-precision policy) with fp32 master
    weights and fp32 optimizer state, as the Hugging Face Trainer's bf16=True; a LoRA run's frozen base
    held in bf16. auto: bf16 where the hardware computes bf16 fast (CUDA with bf16; a CPU whose bf16
    matmul measures at least half its fp32 rate: AMX, AVX512-BF16), else fp32 compute with the frozen
    base in fp32 where it fits and in bf16 where memory needs it (trainer/model/compute.py). pure-bf16:
    weights and optimizer state in bf16 (half the memory; small updates are lost), only on explicit
    request, refused on CPUs without fast bf16."""
    compute_dtype: Literal["auto", "bf16"] = "auto"
    """auto: what model.dtype says where this node computes it fast; on a CPU whose bf16 matmul is slower
    than its fp32 one (measured at start-up: AVX2-only CPUs, no AMX or AVX512-BF16) bf16 weights stay
    bf16 and are computed in fp32, and the log says so. bf16: insist on bf16 compute; refused, with the
    measured rates, on such a CPU."""
    save_dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """dtype of final/. auto: the base model's own (its config.json dtype), fp32 when it names none."""
    revision: Optional[str] = None
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2", "flex_attention"] = "auto"
    """auto: what the model class supports (flash_attention_2 on CUDA when installed, else sdpa, else
    eager); an explicit choice the model does not support is refused with the ones it does."""

    def validate(self, check) -> None:
        check(
            bool(self.name_or_path.strip()),
            ("name_or_path",),
            "is required: a hub id such as meta-llama/Llama-2-7b-hf or a local model directory",
        )
        check(
            self.gguf_file is None or self.gguf_file.lower().endswith(".gguf"),
            ("gguf_file",),
            f"must name a .gguf file, got {self.gguf_file!r}",
        )
        check(
            self.gguf_file is None or not self.name_or_path.lower().endswith(".gguf"),
            ("gguf_file",),
            "is set, but name_or_path already names a .gguf file. Fix: one of the two",
        )


@dataclass(frozen=True)
class DataConfig:
    dataset: Optional[str] = None
    """Hub dataset id, e.g. medalpaca/medical_meadow_medical_flashcards (exclusive with file)."""
    dataset_config: Optional[str] = None
    split: str = "train"
    file: Optional[str] = None
    """Local file: .jsonl, .json (an array, JSON lines, or an object holding the records under `field`),
    .csv, .parquet or .txt, optionally compressed (.gz, .zst). Exclusive with dataset."""
    field: Optional[str] = None
    """For a JSON object file: the key holding the list of records (null: its one list-valued key)."""
    file_wait_seconds: int = 0
    """Wait this long for data.file to appear (uploaded after the job started) before failing."""
    file_settle_seconds: float = 3.0
    """A data file changed more recently than this is read only once its size and modification time
    have stayed the same this long (a file still being uploaded is not read half-way)."""
    format: Optional[Literal["instruction", "prompt-completion", "messages", "sharegpt", "text"]] = None
    """What a record is. null: detected from the columns (and named in the log). instruction:
    instruction/input/output (alpaca); prompt-completion: raw prompt and completion, no template;
    messages: [{role, content}] conversations (TRL); sharegpt: [{from, value}]; text: plain text."""
    template: Literal["alpaca", "chat", "text"] = "alpaca"
    """How instruction records become text: the Alpaca prompts, or the tokenizer's chat template (Llama 2
    [INST] form without one). text: train on data.text_column as plain text. Conversations always use
    the chat template; prompt-completion uses none."""
    max_seq_length: int = 512
    packing: Optional[bool] = None
    """null (auto): pack a micro-batch's examples into one padding-free sequence when a probe on the
    model proves packed examples stay isolated, else pad (logged). true: pack, refused on a model where
    examples would attend to each other. false: pad per micro-batch."""
    train_on_prompt: bool = False
    skip_invalid: bool = False
    """false: the first invalid record stops the run before training (file, line, field). true: invalid
    records are skipped and counted in the log and report."""
    validation_fraction: float = 0.05
    validation_file: Optional[str] = None
    """A file of validation records (same formats); replaces holding out validation_fraction."""
    validation_split: Optional[str] = None
    """A hub dataset's own split of this name instead of holding out validation_fraction."""
    validation_seed: int = 42
    """Seed of the held-out split; separate from training.seed, so a new seed keeps the same validation set."""
    max_examples: Optional[int] = None
    instruction_column: str = "instruction"
    input_column: str = "input"
    output_column: str = "output"
    text_column: str = "text"
    prompt_column: str = "prompt"
    completion_column: str = "completion"
    messages_column: str = "messages"
    conversations_column: str = "conversations"
    system_prompt: Optional[str] = None
    """chat template and conversations without a system turn: the system message. alpaca: replaces the
    preamble of both prompts."""
    prompt_with_input: Optional[str] = None
    """alpaca prompt for examples with input; placeholders {instruction} and {input}."""
    prompt_no_input: Optional[str] = None
    """alpaca prompt for examples without input; placeholder {instruction}."""
    cache_dir: Optional[str] = None
    """Where tokenized data is kept, one directory per (data, tokenizer, settings) fingerprint, shared by
    every rank and restart. null: a `cache` directory beside output_dir."""

    def validate(self, check) -> None:
        check(
            (self.dataset is None) != (self.file is None),
            ("dataset",),
            "set exactly one of data.dataset (a hub dataset id) and data.file (a file path); "
            + ("both are set" if self.dataset else "neither is set"),
        )
        for key in ("file", "validation_file"):
            path = getattr(self, key)
            if path is not None:
                kind = data_file_type(path)
                check(
                    kind is not None,
                    (key,),
                    f"unsupported file type {Path(path).name!r}; use one of {', '.join(DATA_FILE_TYPES)} "
                    "(optionally .gz or .zst compressed)",
                )
        check(
            not (self.file and self.validation_split),
            ("validation_split",),
            "names a split of a hub dataset, but data is a file. Fix: data.validation_file: <a file of "
            "validation records>, or data.validation_fraction",
        )
        check(
            not (self.validation_file and self.validation_split),
            ("validation_file",),
            "and data.validation_split are both set; use one",
        )
        check(self.max_seq_length >= 16, ("max_seq_length",), "must be at least 16 tokens")
        check(self.file_settle_seconds >= 0, ("file_settle_seconds",), "must be >= 0")
        check(
            0.0 <= self.validation_fraction < 0.5,
            ("validation_fraction",),
            "must be in [0, 0.5) (e.g. 0.05 holds out 5% of the examples)",
        )
        check(self.max_examples is None or self.max_examples > 0, ("max_examples",), "must be > 0 or null")
        if self.prompt_with_input is not None:
            for name in ("{instruction}", "{input}"):
                check(name in self.prompt_with_input, ("prompt_with_input",), f"must contain {name}")
        if self.prompt_no_input is not None:
            check("{instruction}" in self.prompt_no_input, ("prompt_no_input",), "must contain {instruction}")


DATA_FILE_TYPES = (".jsonl", ".json", ".csv", ".parquet", ".txt")
COMPRESSIONS = (".gz", ".zst")


def data_file_type(path: str) -> Optional[str]:
    """The record format of a data file name (".jsonl", ...), looking through .gz/.zst; None if unknown."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes = suffixes[:-1]
    if suffixes and suffixes[-1] in DATA_FILE_TYPES and not (suffixes[-1] == ".parquet" and path.endswith(COMPRESSIONS)):
        return suffixes[-1]
    return None


@dataclass(frozen=True)
class TrainingConfig:
    """Names follow Hugging Face ``TrainingArguments`` so users bring what they know."""

    num_train_epochs: float = 1.0
    max_steps: int = -1
    """Optimizer steps; overrides num_train_epochs when > 0."""
    learning_rate: float = 2e-4
    per_device_train_batch_size: int = 4
    tokens_per_micro_batch: int = 0
    """0: micro-batches of per_device_train_batch_size examples. N > 0: as many examples (in the random
    order) as fit N tokens, at least one, so micro-batches carry about the same work. On long-tailed
    data the short examples then share steps: an epoch takes fewer, fuller steps, and a learning rate
    chosen for fixed-size batches may need raising (as for any larger batch)."""
    per_device_eval_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    warmup_steps: float = 0
    """Steps of linear warm-up; a float in (0, 1) is a fraction of all steps (transformers 5 style)."""
    warmup_ratio: float = 0.0
    """Fraction of all steps for warm-up (transformers 4 name; same as a fractional warmup_steps)."""
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    optim: Literal["adamw_torch", "adamw_torch_fused"] = "adamw_torch_fused"
    """Fused AdamW kernel (CPU and CUDA): 4x faster optimizer steps than the for-loop one (bench/)."""
    logging_steps: int = 10
    save_steps: int = 100
    save_total_limit: int = 2
    eval_steps: Optional[int] = None
    """Evaluate every N steps (validation loss in metrics.jsonl); always once at the end."""
    eval_on_start: bool = True
    """Evaluate the base model before the first step (as the Hugging Face Trainer's eval_on_start) and answer
    quantize.sample_prompts held-out prompts with it, so the report shows what the fine-tune gained:
    validation loss before -> after (report.json training.eval_loss_before; the loss curve's step 0),
    answers before and after."""
    seed: int = 42
    gradient_checkpointing: bool = False
    ddp_backend: Optional[Literal["gloo", "nccl"]] = None
    """null: nccl on CUDA, else gloo."""
    fsdp: bool = False
    """Shard parameters, gradients and optimizer state (FSDP2) for models that do not fit a device."""
    torch_compile: bool = False
    """torch.compile the model (Inductor; its C++/OpenMP backend on CPUs). Off by default: measured for
    LoRA at the 7B shape on CPUs in docs/performance.md."""
    cpu_threads: Optional[int] = None
    """Intra-op threads per process on CPU; null: cores / local processes."""
    max_nonfinite_steps: int = 3
    """Steps in a row whose loss or gradient norm is NaN/inf that are skipped (no update) before the run
    stops with an error; a non-finite state is never saved (0: stop at the first)."""
    resume_from_checkpoint: Optional[str] = "auto"
    """auto: newest complete checkpoint in output_dir/checkpoints; null: start fresh; or a path."""
    report_to: tuple[str, ...] = ()
    """Experiment trackers that receive the rows of metrics.jsonl, by their Hugging Face names:
    tensorboard, mlflow, wandb (settings in the tracking section); empty or none: metrics.jsonl only."""

    def validate(self, check) -> None:
        for name in (
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "gradient_accumulation_steps",
            "logging_steps",
            "save_steps",
            "save_total_limit",
        ):
            check(getattr(self, name) >= 1, (name,), "must be >= 1")
        check(self.max_steps == -1 or self.max_steps > 0, ("max_steps",), "must be > 0, or -1 to use num_train_epochs")
        check(self.max_steps > 0 or self.num_train_epochs > 0, ("num_train_epochs",), "must be > 0 when max_steps is -1")
        check(self.learning_rate > 0, ("learning_rate",), "must be > 0")
        check(0.0 <= self.warmup_ratio < 1.0, ("warmup_ratio",), "must be in [0, 1)")
        check(
            self.warmup_steps >= 0 and (self.warmup_steps < 1 or float(self.warmup_steps).is_integer()),
            ("warmup_steps",),
            "must be a whole number of steps, or a fraction in (0, 1)",
        )
        check(self.max_grad_norm >= 0, ("max_grad_norm",), "must be >= 0 (0 disables clipping)")
        check(self.eval_steps is None or self.eval_steps >= 1, ("eval_steps",), "must be >= 1 or null")
        check(self.cpu_threads is None or self.cpu_threads >= 1, ("cpu_threads",), "must be >= 1 or null")
        check(self.max_nonfinite_steps >= 0, ("max_nonfinite_steps",), "must be >= 0")
        check(self.tokens_per_micro_batch >= 0, ("tokens_per_micro_batch",), "must be >= 0 (0: a fixed count)")
        for name in self.report_to:
            near = difflib.get_close_matches(name, REPORT_TO, n=1)
            check(
                name in REPORT_TO + ("none",),
                ("report_to",),
                f"unknown tracker {name!r}{f' (did you mean {near[0]!r}?)' if near else ''}; use any of "
                f"{', '.join(REPORT_TO)}, or none",
            )
        check(len(set(self.report_to)) == len(self.report_to), ("report_to",), "names a tracker twice")
        check("none" not in self.report_to or len(self.report_to) == 1, ("report_to",), "none cannot be combined with a tracker")

    @property
    def trackers(self) -> tuple[str, ...]:
        return tuple(n for n in self.report_to if n != "none")


REPORT_TO = ("tensorboard", "mlflow", "wandb")
# The environment variables naming each tracker's credential file: the stack sets them (paths only) where
# it mounts the Secret, and trainer/monitor/tracking.py reads the files.
CREDENTIAL_FILES = {"mlflow": "MLFLOW_TRACKING_TOKEN_FILE", "wandb": "WANDB_API_KEY_FILE"}


@dataclass(frozen=True)
class TrackingConfig:
    """Where training.report_to's trackers write. Credentials never appear here: the trainer reads them
    from files (MLFLOW_TRACKING_TOKEN_FILE, WANDB_API_KEY_FILE: the stack mounts them from a Secret) or
    from the tracker's own environment variables on a local machine."""

    run_name: Optional[str] = None
    """The run's name in every tracker; null: <output_dir's name>-<first 8 characters of its run id>."""
    mlflow_tracking_uri: Optional[str] = None
    """http(s)://host[:port] of an MLflow server (or databricks, or file:DIR for a local file store)."""
    mlflow_experiment: str = "llm-finetune"
    wandb_project: Optional[str] = None
    wandb_entity: Optional[str] = None
    wandb_mode: Literal["online", "offline"] = "online"
    """offline: the run is written under output_dir/wandb; `wandb sync` uploads it later."""


@dataclass(frozen=True)
class LoraConfig:
    enabled: bool = True
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("auto",)
    """auto: every projection of the model's attention blocks (q/k/v/o, fused qkv, GPT-2's c_attn...);
    all-linear: every linear layer but the output head (peft); or module names, checked against the
    model's own before training starts."""
    modules_to_save: tuple[str, ...] = ()
    """Modules trained fully and saved beside the adapter (e.g. lm_head, embed_tokens)."""
    base_bits: Optional[int] = None
    """QLoRA: the frozen base's linear layers quantized while they load (bitsandbytes): 4 (NF4 with double
    quantization, as in the QLoRA paper; ~0.52 bytes a weight) or 8 (LLM.int8); null: the base in model.dtype.
    The adapters, embeddings, norms and head stay as for LoRA; final/ merges into the base re-read from its files."""

    def validate(self, check) -> None:
        check(
            self.base_bits in (None, 4, 8),
            ("base_bits",),
            "must be 4 (NF4, QLoRA) or 8 (int8), or null for a base in model.dtype",
        )
        check(self.r >= 1, ("r",), "must be >= 1 (typical: 8 to 64)")
        check(self.alpha >= 1, ("alpha",), "must be >= 1 (typical: 2 x r)")
        check(0.0 <= self.dropout < 1.0, ("dropout",), "must be in [0, 1)")
        check(len(self.target_modules) > 0, ("target_modules",), "must name at least one module, e.g. [q_proj, v_proj]")


QUANT_BITS = (4, 8)
QUANT_ALGORITHMS = ("rtn", "opt-rtn", "gptq", "awq", "autoround")
# What quantized/ holds, and the engine that serves it (trainer/post/export.py):
#   compressed-tensors  a Hugging Face checkpoint (pack-quantized int weights) that transformers loads with
#                       from_pretrained and vLLM serves (llm-compressor's format, written by AutoRound);
#   auto-round          a Hugging Face checkpoint in AutoRound's format (transformers, vLLM, SGLang);
#   gguf:q4_k_m, gguf:q8_0  one GGUF file for llama.cpp and Ollama (CPU serving), written by AutoRound;
#   inc                 Intel Neural Compressor's own layout (its loader only; GPTQ and AWQ write this).
QUANT_FORMATS = ("compressed-tensors", "auto-round", "gguf:q4_k_m", "gguf:q8_0", "inc")


@dataclass(frozen=True)
class QuantizeConfig:
    enabled: bool = True
    bits: int = 4
    algorithm: str = "rtn"
    """rtn (round to nearest), opt-rtn (AutoRound's optimized RTN: each group's scale searched, no
    calibration; minutes for a small model, hours at 7B on 2 CPU cores; halves RTN's 4-bit perplexity cost
    on SmolLM2-135M, bench/real.py), autoround (Intel's AutoRound: sign-gradient rounding tuned on
    training examples), or gptq/awq (through Intel Neural Compressor: format inc only)."""
    format: str = "compressed-tensors"
    """What quantized/ holds: compressed-tensors (default: transformers from_pretrained and vLLM),
    auto-round, gguf:q4_k_m / gguf:q8_0 (llama.cpp, Ollama), or inc (INC's loader only)."""
    iters: int = 200
    """AutoRound's tuning steps per decoder block (algorithm autoround; rtn is AutoRound with 0)."""
    group_size: int = 128
    """Weights per quantization group; -1 for per-channel. Clamped to each layer's input width."""
    scheme: Literal["sym", "asym"] = "sym"
    calibration_samples: int = 32
    """Training examples used to calibrate GPTQ and AWQ (unused by RTN)."""
    eval_samples: int = 64
    """Validation examples for perplexity before/after (0: all)."""
    sample_prompts: int = 3
    max_new_tokens: int = 32
    allow_larger: bool = False
    """Write the quantized model even when it is not smaller than final/ (refused by default)."""
    also: tuple[str, ...] = ()
    """More served formats written after `format`, each into quantized-<format>/ (e.g. [gguf:q8_0]: a
    GGUF file for llama.cpp and Ollama beside the compressed-tensors model for vLLM), each measured in its
    engine; final/ is measured once. GGUF formats store their own bits (q8_0: 8, q4_k_m: 4)."""

    def validate(self, check) -> None:
        check(self.bits in QUANT_BITS, ("bits",), f"unsupported bits {self.bits}; use 4 or 8")
        check(
            self.algorithm in QUANT_ALGORITHMS,
            ("algorithm",),
            f"unsupported algorithm {self.algorithm!r}; use one of {', '.join(QUANT_ALGORITHMS)}",
        )
        near = difflib.get_close_matches(self.format, QUANT_FORMATS, n=1)
        check(
            self.format in QUANT_FORMATS,
            ("format",),
            f"unsupported format {self.format!r}{f' (did you mean {near[0]!r}?)' if near else ''}; use one of "
            f"{', '.join(QUANT_FORMATS)}",
        )
        check(
            self.algorithm not in ("gptq", "awq") or self.format == "inc",
            ("format",),
            f"{self.format} cannot hold a {self.algorithm.upper()} result: GPTQ and AWQ run through Intel Neural "
            "Compressor, whose checkpoints load with its own loader only. Fix: quantize.format: inc, or "
            "quantize.algorithm: rtn or autoround for a format that transformers, vLLM or llama.cpp serve",
        )
        check(
            self.algorithm not in ("autoround", "opt-rtn") or self.format != "inc",
            ("algorithm",),
            f"{self.algorithm} writes compressed-tensors, auto-round or gguf, not INC's format. Fix: quantize.format: "
            "compressed-tensors (or another served format), or quantize.algorithm: rtn",
        )
        check(
            not (self.format == "compressed-tensors" or "compressed-tensors" in self.also) or self.scheme == "sym",
            ("scheme",),
            "asym with compressed-tensors: AutoRound writes asymmetric compressed-tensors checkpoints that "
            "transformers cannot load (a zero-point shape mismatch, measured with transformers 5.23 and "
            "compressed-tensors 0.20), so the result would fail after training. Fix: quantize.scheme: sym, or "
            "quantize.format: auto-round or gguf:q4_k_m (asymmetric in llama.cpp's own way)",
        )
        if self.format.startswith("gguf:"):
            wants = 8 if self.format == "gguf:q8_0" else 4
            check(self.bits == wants, ("bits",), f"{self.format} stores {wants}-bit weights. Fix: quantize.bits: {wants}")
        for extra in self.also:
            near = difflib.get_close_matches(extra, QUANT_FORMATS, n=1)
            check(
                extra in QUANT_FORMATS and extra != "inc",
                ("also",),
                f"unsupported format {extra!r}{f' (did you mean {near[0]!r}?)' if near and near[0] != extra else ''}"
                f"; use served formats: {', '.join(f for f in QUANT_FORMATS if f != 'inc')}",
            )
            check(extra != self.format, ("also",), f"repeats quantize.format {extra}")
            check(
                self.algorithm in ("rtn", "opt-rtn", "autoround"),
                ("also",),
                f"needs quantize.algorithm rtn, opt-rtn or autoround (AutoRound writes the served formats), not {self.algorithm}",
            )
        check(len(set(self.also)) == len(self.also), ("also",), "names a format twice")
        check(self.iters >= 0, ("iters",), "must be >= 0 (0: round to nearest)")
        check(self.group_size == -1 or self.group_size >= 8, ("group_size",), "must be -1 (per channel) or >= 8")
        check(self.calibration_samples >= 1, ("calibration_samples",), "must be >= 1")
        check(self.eval_samples >= 0, ("eval_samples",), "must be >= 0 (0: whole validation split)")
        check(self.sample_prompts >= 0, ("sample_prompts",), "must be >= 0")
        check(self.max_new_tokens >= 1, ("max_new_tokens",), "must be >= 1")


@dataclass(frozen=True)
class TrainerConfig:
    model: ModelConfig
    data: DataConfig
    training: TrainingConfig = TrainingConfig()
    lora: LoraConfig = LoraConfig()
    quantize: QuantizeConfig = QuantizeConfig()
    tracking: TrackingConfig = TrackingConfig()
    output_dir: str = "./output"

    def validate(self, check) -> None:
        bits = self.lora.base_bits
        check(
            bits is None or self.lora.enabled,
            ("lora", "base_bits"),
            "quantizes the frozen base of a LoRA run, and lora.enabled is false. Fix: lora.enabled: true, or "
            "remove lora.base_bits for a full fine-tune",
        )
        # bitsandbytes' quantized weights (Params4bit, Int8Params) are not DTensors: FSDP2 cannot shard them.
        check(
            bits is None or not self.training.fsdp,
            ("training", "fsdp"),
            f"cannot shard the {bits}-bit base of lora.base_bits (bitsandbytes' weights are not shardable by "
            "FSDP2). Fix: training.fsdp: false (each process holds the quantized base: ~0.52 bytes a weight in "
            "4 bits), or remove lora.base_bits to shard a bf16 base",
        )
        trackers = self.training.trackers
        check(
            "mlflow" not in trackers or bool(self.tracking.mlflow_tracking_uri),
            ("tracking", "mlflow_tracking_uri"),
            "is required when training.report_to includes mlflow. Fix: set it to your server "
            "(http://mlflow.mlflow.svc:5000) or, for a local run, file:./output/mlruns",
        )
        check(
            "wandb" not in trackers or bool(self.tracking.wandb_project),
            ("tracking", "wandb_project"),
            "is required when training.report_to includes wandb. Fix: tracking.wandb_project: my-project",
        )

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = "", lines: Optional[Location] = None) -> "TrainerConfig":
        where = _Where(source, lines or {})
        return _build(cls, raw, (), where)

    def to_dict(self) -> dict[str, Any]:
        def plain(value):
            if isinstance(value, tuple):
                return [plain(v) for v in value]
            if isinstance(value, dict):
                return {k: plain(v) for k, v in value.items()}
            return value

        return plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    # ---- derived paths (the output layout DESIGN.md promises) --------------------------

    @property
    def out(self) -> Path:
        return Path(self.output_dir)

    @property
    def checkpoints_dir(self) -> Path:
        return self.out / "checkpoints"

    @property
    def final_dir(self) -> Path:
        return self.out / "final"

    @property
    def adapter_dir(self) -> Path:
        return self.out / "adapter"

    @property
    def quantized_dir(self) -> Path:
        return self.out / "quantized"

    def quantized_dir_for(self, fmt: str) -> Path:
        """quantized/ for quantize.format; quantized-<format>/ (gguf-q8_0) for each of quantize.also."""
        if fmt == self.quantize.format:
            return self.quantized_dir
        return self.out / ("quantized-" + fmt.replace(":", "-"))

    @property
    def metrics_path(self) -> Path:
        return self.out / "metrics.jsonl"

    @property
    def report_path(self) -> Path:
        return self.out / "report.json"


def world_problem(cfg: TrainerConfig, world: int) -> Optional[str]:
    """What the config asks of the number of processes that this world cannot give (None: fine). One
    process is a world of one: FSDP there would shard nothing, so it is refused, never ignored."""
    if cfg.training.fsdp and world == 1:
        return (
            "training.fsdp: true with a single process: FSDP shards weights, gradients and optimizer state "
            "over the processes, and with one there is nothing to shard over (it used to be ignored "
            "silently). Fix: training.fsdp: false for one process, or run 2 or more (python -m "
            "trainer.runtime.launch --nproc-per-node 2 ..., or workers/procsPerWorker in the stack)"
        )
    return None


# --------------------------------------------------------------------------------------------
# Generic dataclass builder: types from annotations, unknown keys with the nearest valid name.
# Hand-written because the alternatives (pydantic, omegaconf) would add a heavy dependency to the
# Pulumi program for ~80 lines, and neither reports YAML file:line for a nested key.
# --------------------------------------------------------------------------------------------


# Keys and values a release took away, with what to write instead (a key path, or a key path and value).
RETIRED = {
    ("training", "use_ipex"): "Intel Extension for PyTorch is discontinued (archived); the CPU path is upstream "
    "PyTorch (bf16 autocast through oneDNN where the CPU has AMX/AVX512-BF16). Fix: "
    "remove training.use_ipex",
    ("training", "ddp_backend", "ccl"): "the oneCCL bindings are discontinued with Intel Extension for PyTorch. "
    "Fix: training.ddp_backend: gloo (or leave it unset)",
}


def _build(cls, raw: Any, path: tuple[str, ...], where: _Where):
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        _fail(path, f"must be a mapping of keys, got {type(raw).__name__} {raw!r}", where)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in fields:
            if path + (str(key),) in RETIRED:
                _fail(path + (str(key),), RETIRED[path + (str(key),)], where)
            near = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            _fail(path + (str(key),), f"unknown key{hint} Valid keys here: {', '.join(fields)}", where)
        values[key] = _coerce(hints[key], value, path + (key,), where)
    for name, f in fields.items():
        no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if name not in values and no_default:
            sub = hints[name]
            if dataclasses.is_dataclass(sub):
                values[name] = _build(sub, {}, path + (name,), where)
            else:
                _fail(path + (name,), "is required", where)
    obj = cls(**values)
    validate = getattr(obj, "validate", None)
    if validate is not None:

        def check(ok: bool, sub: tuple[str, ...], message: str) -> None:
            if not ok:
                _fail(path + sub, message, where)

        validate(check)
    return obj


def _coerce(tp, value, path, where):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path, where)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, path, where)
    if value is None:
        _fail(path, "must not be null", where)
    if origin is Literal:
        if path + (str(value),) in RETIRED:
            _fail(path, RETIRED[path + (str(value),)], where)
        if value not in args:
            near = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            _fail(path, f"invalid value {value!r}{hint}; use one of {', '.join(map(str, args))}", where)
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            _fail(path, f"must be a list, got {value!r}", where)
        return tuple(_coerce(args[0], v, path, where) for v in value)
    if tp is bool:
        if not isinstance(value, bool):
            _fail(path, f"must be true or false, got {value!r}", where)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(path, f"must be an integer, got {value!r}", where)
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads 1e-4 (no dot) as a string; accept what users write for learning rates.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(path, f"must be a number, got {value!r}", where)
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            _fail(path, f"must be a string, got {value!r}", where)
        return str(value)
    raise TypeError(f"unsupported config type {tp!r} at {'.'.join(path)}")  # a bug in this module


# --------------------------------------------------------------------------------------------
# Files and --set overrides
# --------------------------------------------------------------------------------------------


def _yaml_with_lines(text: str, source: str) -> tuple[Any, Location]:
    """Parse YAML and remember the 1-based line of every mapping key path."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f"{source}:{mark.line + 1}: " if mark else f"{source}: "
        raise ConfigError(f"{at}not valid YAML: {getattr(exc, 'problem', exc)}") from None
    return data, key_lines(node)


def key_lines(node, prefix: tuple[str, ...] = ()) -> Location:
    """The 1-based line of every mapping key path under a composed YAML node."""
    lines: Location = {}
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = prefix + (str(k.value),)
            lines[key] = k.start_mark.line + 1
            lines.update(key_lines(v, key))
    return lines


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides (values parsed as YAML) to a raw config dict."""
    out = _deep_copy(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. --set training.max_steps=20")
        parts = key.strip().split(".")
        node = out
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {part} is not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(value) if value.strip() else ""
    return out


def _deep_copy(d):
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in (d or {}).items()}


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TrainerConfig:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    return load_config_text(text, str(path), overrides)


def load_config_text(text: str, source: str = "<config>", overrides: list[str] | tuple[str, ...] = ()) -> TrainerConfig:
    """A config from its YAML text; `source` names it in refusals (with the line of each key)."""
    raw, lines = _yaml_with_lines(text, source)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the config must be a mapping with sections model, data, training, ...")
    if overrides:
        raw = apply_overrides(raw, overrides)
    return TrainerConfig.from_dict(raw, source=source, lines=lines)

"""Data: load (hub or file), template, tokenize with prompt masking, pack, batch.

Packing (padding-free): the `per_device_train_batch_size` examples of a micro-batch are laid end to
end in one sequence, with `position_ids` restarting at 0 for every example, so no step computes
on padding. With no attention mask, transformers builds a block-diagonal causal mask from those
restarts (SDPA/eager) or uses variable-length kernels (flash-attention-2): packed examples never
attend to each other. The first token of every example gets label -100 (nothing of its own
precedes it). A step therefore sees the same examples as the padded recipe would, so training
converges the same way (same number and size of updates) with strictly less compute; packing into
fixed-length bins instead would put several times more examples into each step and, at the same
learning rate, make far fewer updates per epoch (bench/ measured it).
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from trainer.config import DataConfig
from trainer.errors import UserError

IGNORE = -100

ALPACA_PREAMBLE_INPUT = ("Below is an instruction that describes a task, paired with an input that provides "
                         "further context. Write a response that appropriately completes the request.")
ALPACA_PREAMBLE = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
ALPACA_WITH_INPUT = "{preamble}\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
ALPACA_NO_INPUT = "{preamble}\n\n### Instruction:\n{instruction}\n\n### Response:\n"


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def read_file(path: str | Path, wait_seconds: int = 0) -> list[dict[str, Any]]:
    """Records of a json / jsonl / csv / parquet / txt file. Malformed JSON names file and line."""
    path = Path(path)
    deadline = time.monotonic() + wait_seconds
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(min(10.0, max(0.1, deadline - time.monotonic())))
    if not path.exists():
        waited = f" after waiting {wait_seconds}s" if wait_seconds else ""
        raise UserError(f"data.file {path} does not exist{waited}. Fix: copy it there (the stack output "
                        "`commands.uploadDataset` has the kubectl cp command) or correct data.file")
    wait_until_complete(path, max(wait_seconds, MIN_GROWTH_WAIT))
    suffix = path.suffix.lower()
    if suffix in (".json", ".jsonl"):
        text = path.read_text(encoding="utf-8")
        if suffix == ".json" and text.lstrip().startswith("["):
            try:
                records = json.loads(text)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg}, column {exc.colno})") from None
        else:
            records = []
            for lineno, line in enumerate(text.splitlines(), start=1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise UserError(f"{path}:{lineno}: malformed JSON line ({exc.msg}, column {exc.colno}). "
                                    "Fix: one JSON object per line") from None
        for i, r in enumerate(records):
            if not isinstance(r, dict):
                raise UserError(f"{path}: record {i + 1} is {type(r).__name__}, expected a JSON object with named fields")
        return records
    # CSV, Parquet and text through the datasets library (its readers handle quoting, types, encodings).
    import datasets

    builder = {".csv": "csv", ".parquet": "parquet", ".txt": "text"}[suffix]
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as exc:  # the library raises many types; name the file either way
        raise UserError(f"{path}: cannot read as {builder}: {exc}") from None
    return ds.to_list()


STABLE_SECONDS = 3.0
MIN_GROWTH_WAIT = 30


def wait_until_complete(path: Path, wait_seconds: float) -> None:
    """Wait until a data file stops changing (size and modification time steady for a few seconds),
    so a file still being uploaded is not read half-way. A file last changed longer ago than that is
    read at once. Refused if it is still growing after `wait_seconds`."""
    deadline = time.monotonic() + wait_seconds
    st = path.stat()
    if time.time() - st.st_mtime >= STABLE_SECONDS:
        return
    seen, steady_since = (st.st_size, st.st_mtime_ns), time.monotonic()
    while time.monotonic() - steady_since < STABLE_SECONDS:
        if time.monotonic() > deadline:
            raise UserError(f"data.file {path} is still being written (it changed in the last {STABLE_SECONDS:.0f}s "
                            f"for {wait_seconds:.0f}s). Fix: upload to a temporary name and rename it when complete "
                            "(the stack's uploadDataset command does), or raise data.file_wait_seconds")
        time.sleep(0.25)
        st = path.stat()
        now = (st.st_size, st.st_mtime_ns)
        if now != seen:
            seen, steady_since = now, time.monotonic()


def load_records(cfg: DataConfig, token: Optional[str] = None) -> tuple[list[dict], Optional[list[dict]]]:
    """(train records, validation records or None when the validation split is held out later)."""
    if cfg.file:
        records = read_file(cfg.file, cfg.file_wait_seconds)
        where = f"data.file {cfg.file}"
        val = None
    else:
        import datasets

        try:
            ds = datasets.load_dataset(cfg.dataset, cfg.dataset_config, split=cfg.split, token=token)
            val = (datasets.load_dataset(cfg.dataset, cfg.dataset_config, split=cfg.validation_split, token=token)
                   .to_list() if cfg.validation_split else None)
        except Exception as exc:
            raise UserError(f"data.dataset {cfg.dataset!r} (split {cfg.split!r}) cannot be loaded: {exc}. "
                            "Fix: check the dataset id and split on the hub, or use data.file") from None
        records = ds.to_list()
        where = f"data.dataset {cfg.dataset} split {cfg.split}"
    if not records:
        raise UserError(f"{where} has no examples. Fix: point data at a non-empty file or split")
    if val is not None and not val:
        raise UserError(f"data.validation_split {cfg.validation_split!r} is empty")
    if cfg.max_examples:
        records = records[: cfg.max_examples]
    return records, val


def fingerprint(cfg: DataConfig) -> str:
    """What the data is: the file's content (SHA-256), or the hub dataset, config and split."""
    if cfg.file:
        import hashlib

        h = hashlib.sha256()
        with open(cfg.file, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        return h.hexdigest()[:16]
    return f"{cfg.dataset}:{cfg.dataset_config or ''}:{cfg.split}"


def split_validation(records: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    if fraction <= 0 or len(records) < 2:
        return records, []
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_val = max(1, int(round(len(records) * fraction)))
    val_idx = set(order[:n_val])
    return ([r for i, r in enumerate(records) if i not in val_idx], [records[i] for i in sorted(val_idx)])


# ----------------------------------------------------------------------------------------------
# Templates
# ----------------------------------------------------------------------------------------------


def required_columns(cfg: DataConfig) -> tuple[str, ...]:
    if cfg.template == "text":
        return (cfg.text_column,)
    return (cfg.instruction_column, cfg.output_column)


def check_columns(records: list[dict], cfg: DataConfig) -> None:
    found = list(records[0].keys())
    missing = [c for c in required_columns(cfg) if c not in found]
    if missing:
        keys = {cfg.instruction_column: "instruction_column", cfg.output_column: "output_column",
                cfg.text_column: "text_column"}
        raise UserError(f"data: template {cfg.template!r} needs column(s) {', '.join(missing)} but the data has "
                        f"{', '.join(found) or 'no columns'}. Fix: set data.{keys[missing[0]]} to one of the "
                        f"columns found, or choose another data.template")


def render(record: dict, cfg: DataConfig, tokenizer) -> tuple[str, str]:
    """(prompt text, response text) of one record for the configured template."""
    if cfg.template == "text":
        return "", str(record.get(cfg.text_column) or "")
    instruction = str(record.get(cfg.instruction_column) or "").strip()
    context = str(record.get(cfg.input_column) or "").strip()
    output = str(record.get(cfg.output_column) or "").strip()
    if cfg.template == "alpaca":
        if context:
            tpl = cfg.prompt_with_input or ALPACA_WITH_INPUT.replace(
                "{preamble}", cfg.system_prompt or ALPACA_PREAMBLE_INPUT)
            return tpl.format(instruction=instruction, input=context), output
        tpl = cfg.prompt_no_input or ALPACA_NO_INPUT.replace("{preamble}", cfg.system_prompt or ALPACA_PREAMBLE)
        return tpl.format(instruction=instruction), output
    # chat
    user = f"{instruction}\n\n{context}" if context else instruction
    messages = ([{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []) + \
        [{"role": "user", "content": user}]
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": output}], tokenize=False)
        if full.startswith(prompt):
            return prompt, full[len(prompt):]
        return prompt, output
    return llama2_chat_prompt(user, cfg.system_prompt), f" {output} "


def llama2_chat_prompt(user: str, system: Optional[str]) -> str:
    """The Llama 2 chat form ([INST] with an optional <<SYS>> block); BOS/EOS are added as ids."""
    if system:
        user = f"<<SYS>>\n{system}\n<</SYS>>\n\n{user}"
    return f"[INST] {user} [/INST]"


# ----------------------------------------------------------------------------------------------
# Tokenization
# ----------------------------------------------------------------------------------------------


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


@dataclass
class DataStats:
    examples: int = 0
    truncated: int = 0
    dropped_prompt_too_long: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    prompt_lengths: list[int] = field(default_factory=list, repr=False)

    def summary(self) -> str:
        return (f"{self.examples} examples, {self.tokens} tokens ({self.trained_tokens} trained), "
                f"{self.truncated} truncated to max_seq_length, "
                f"{self.dropped_prompt_too_long} dropped (prompt too long)")


def tokenize(records: Sequence[dict], cfg: DataConfig, tokenizer, stats: Optional[DataStats] = None) -> list[Example]:
    stats = stats if stats is not None else DataStats()
    prompts, responses = zip(*(render(r, cfg, tokenizer) for r in records)) if records else ((), ())
    # Batched calls into the fast (Rust) tokenizer; special tokens added by hand below so that the
    # prompt/response split is exact.
    p_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"] if records else []
    r_ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"] if records else []
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    limit = cfg.max_seq_length
    out = []
    for p, r in zip(p_ids, r_ids):
        prompt = p if p[:1] == bos else bos + p  # a chat template may have written BOS already
        response = r + eos
        stats.prompt_lengths.append(len(prompt))
        if len(prompt) >= limit:
            stats.dropped_prompt_too_long += 1
            continue
        ids = prompt + response
        if len(ids) > limit:
            ids = ids[:limit]
            stats.truncated += 1
        if cfg.train_on_prompt or cfg.template == "text":
            labels = list(ids)
        else:
            labels = [IGNORE] * len(prompt) + ids[len(prompt):]
        labels[0] = IGNORE  # nothing precedes the first token inside its own example
        stats.examples += 1
        stats.tokens += len(ids)
        stats.trained_tokens += sum(1 for x in labels[1:] if x != IGNORE)
        out.append(Example(ids, labels))
    return out


def check_lengths(stats: DataStats, total: int, cfg: DataConfig) -> None:
    """Refuse a max_seq_length that leaves most prompts without room for a response."""
    if total and stats.dropped_prompt_too_long * 2 > total:
        lengths = sorted(stats.prompt_lengths)
        median = lengths[len(lengths) // 2]
        suggest = 1 << max(6, math.ceil(math.log2(median + 64)))
        raise UserError(f"data.max_seq_length={cfg.max_seq_length} is too small for the prompts: "
                        f"{stats.dropped_prompt_too_long} of {total} examples have a prompt of at least that many "
                        f"tokens (median prompt {median}). Fix: set data.max_seq_length to {suggest} or more")


# ----------------------------------------------------------------------------------------------
# Packing and batching
# ----------------------------------------------------------------------------------------------


@dataclass
class Row:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


def rows_of(examples: Sequence[Example]) -> list[Row]:
    return [Row(e.input_ids, e.labels, list(range(len(e.input_ids)))) for e in examples]


def make_batches(rows: Sequence[Row], batch_size: int, seed: int) -> list[list[int]]:
    """Micro-batches of `batch_size` examples drawn at random (seeded), as the padded recipe's
    sampler would; their order is reshuffled every epoch by epoch_order."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def epoch_order(num_batches: int, seed: int, epoch: int) -> list[int]:
    order = list(range(num_batches))
    random.Random(seed * 1000003 + epoch).shuffle(order)
    return order


def shard(order: Sequence[int], rank: int, world: int) -> list[int]:
    """This rank's batches; every rank gets the same count (the remainder is dropped)."""
    per_rank = len(order) // world
    return list(order[rank * per_rank:(rank + 1) * per_rank]) if world > 1 else list(order)


def collate(rows: Sequence[Row], pad_id: int, packing: bool = True):
    """Tensors for one micro-batch: packed, one sequence of all its examples (no padding); else one
    row per example, shorter rows padded with a segment of their own position_ids (isolated like a
    packed example, so no attention mask is needed) and labels -100. Returns (tensors, real tokens)."""
    import torch

    if packing:
        ids = [t for r in rows for t in r.input_ids]
        return {
            "input_ids": torch.tensor([ids], dtype=torch.long),
            "labels": torch.tensor([[t for r in rows for t in r.labels]], dtype=torch.long),
            "position_ids": torch.tensor([[t for r in rows for t in r.position_ids]], dtype=torch.long),
        }, len(ids)
    width = max(len(r) for r in rows)
    ids, labels, pos = [], [], []
    real = 0
    for r in rows:
        pad = width - len(r)
        real += len(r)
        ids.append(r.input_ids + [pad_id] * pad)
        labels.append(r.labels + [IGNORE] * pad)
        pos.append(r.position_ids + list(range(pad)))
    return {
        "input_ids": torch.tensor(ids, dtype=torch.long),
        "labels": torch.tensor(labels, dtype=torch.long),
        "position_ids": torch.tensor(pos, dtype=torch.long),
    }, real


def label_tokens(rows: Iterable[Row]) -> int:
    """Tokens that contribute to the loss (labels shifted by one inside the model)."""
    return sum(sum(1 for x in r.labels[1:] if x != IGNORE) for r in rows)


@dataclass
class Prepared:
    train_rows: list[Row]
    val_rows: list[Row]
    train_stats: DataStats


def split_records(cfg: DataConfig, token: Optional[str] = None) -> tuple[list[dict], list[dict]]:
    """(training records, validation records): loaded, columns checked, validation held out."""
    records, val_records = load_records(cfg, token)
    check_columns(records, cfg)
    if val_records is None:
        return split_validation(records, cfg.validation_fraction, cfg.validation_seed)
    if val_records:
        check_columns(val_records, cfg)
    return records, val_records


def prepare(cfg: DataConfig, tokenizer, token: Optional[str] = None) -> Prepared:
    records, val_records = split_records(cfg, token)
    stats = DataStats()
    train = tokenize(records, cfg, tokenizer, stats)
    check_lengths(stats, len(records), cfg)
    if not train:
        raise UserError("data: no training examples are left after tokenization; check data.max_seq_length")
    val = tokenize(val_records, cfg, tokenizer) if val_records else []
    return Prepared(rows_of(train), rows_of(val), stats)

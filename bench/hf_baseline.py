"""The seed's recipe, faithfully: the Hugging Face Trainer on the same tokenized examples as ours,
either padded per batch (DataCollatorForSeq2Seq) or concatenated into blocks of max_seq_length
(group_texts).

Padded, it trains by default on exactly our trainer's batches (`--order ours`: the same examples in
the same micro-batch on the same rank at the same step, the Trainer's sequential sampler over rows laid
out in that order), so the two runs differ only in how each computes a step and their eval losses
compare like for like. The seed alone moves the eval loss by more than 10% here (bench/README.md);
`--order hf` keeps the Trainer's own random sampler.

Run by bench/run.py under torchrun with the same model, data, tokenization, batch size, learning
rate, schedule and process count as our trainer:
    torchrun --nproc-per-node 2 bench/hf_baseline.py --config CFG --mode padded|concat --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from trainer import data  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.model.modeling import load_tokenizer  # noqa: E402


def examples(cfg, tok):
    """Exactly our training examples: the same cache (same ids, same masks, same held-out split)."""
    prepared = data.for_config(cfg, tok, cfg.model.name_or_path)
    return prepared.train, [prepared.train.labels(i) for i in range(len(prepared.train))]


def our_order(split, cfg, world: int) -> Optional[list[list[int]]]:
    """Our trainer's micro-batches in the order the Trainer's data loader hands them out: accelerate
    gives global batch k to rank k % world, and a rank's steps take its batches in turn."""
    from trainer.train.steps import plan, step_batches

    p = plan(split, cfg, world)
    per_rank = [[step_batches(p, cfg, s, r, world)[1] for s in range(p.total_steps)] for r in range(world)]
    batches = []
    for s in range(p.total_steps):
        for a in range(cfg.training.gradient_accumulation_steps):
            for r in range(world):
                b = [int(j) for j in per_rank[r][s][a]]
                if len(b) != cfg.training.per_device_train_batch_size:  # the sampler cuts fixed-size batches
                    print(f"order: the Trainer's own: {len(split)} examples leave a micro-batch of {len(b)}, which "
                          "a sequential sampler cannot reproduce (use a multiple of the global batch)", flush=True)
                    return None
                batches.append(b)
    return batches


def concatenate(exs, block: int):
    """group_texts: one stream of tokens (labels carried along, prompt masks kept), cut into blocks."""
    ids = np.concatenate([i for i, _ in exs])
    labels = np.concatenate([lab for _, lab in exs])
    n = (len(ids) // block) * block
    return [{"input_ids": ids[i:i + block].tolist(), "labels": labels[i:i + block].tolist(), "attention_mask": [1] * block}
            for i in range(0, n, block)]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--mode", choices=("padded", "concat", "flatten", "trl"), required=True)
    p.add_argument("--attn", default="sdpa", help="attn_implementation (flash_attention_2 where installed)")
    p.add_argument("--out", required=True)
    p.add_argument("--order", choices=("ours", "hf"), default="ours")
    args = p.parse_args()
    from datasets import Dataset
    from transformers import (AutoModelForCausalLM, DataCollatorForSeq2Seq, DataCollatorWithFlattening, Trainer,
                              TrainerCallback, TrainingArguments, default_data_collator)

    cfg = load_config(args.config)
    t = cfg.training
    tok = load_tokenizer(cfg.model.name_or_path)
    split, exs = examples(cfg, tok)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    batches = our_order(split, cfg, world) if args.mode == "padded" and args.order == "ours" else None
    if args.mode == "padded":
        rows = [{"input_ids": i.tolist(), "labels": lab.tolist(), "attention_mask": [1] * len(i)} for i, lab in exs]
        if batches:
            rows = [rows[j] for b in batches for j in b]
        collator = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    elif args.mode == "trl":  # TRL's SFTTrainer with packing, on our tokenized examples and labels
        rows = [{"input_ids": i.tolist(), "labels": lab.tolist()} for i, lab in exs]
        collator = None
    elif args.mode == "flatten":  # padding-free: a batch's examples in one row, position ids restarting
        rows = [{"input_ids": i.tolist(), "labels": lab.tolist()} for i, lab in exs]
        collator = DataCollatorWithFlattening(return_position_ids=True)
    else:
        rows = concatenate(exs, cfg.data.max_seq_length)
        collator = default_data_collator
    dataset = Dataset.from_list(rows)
    bf16 = cfg.model.dtype == "bf16"
    cuda = torch.cuda.is_available()
    # As Hugging Face users do: a LoRA base loaded in bf16 (PEFT keeps the adapters in fp32), a full
    # fine-tune in fp32 master weights; bf16=True autocasts the compute in both.
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    quantized = {}
    setting = None
    if cfg.lora.enabled and cfg.lora.base_bits:  # QLoRA as the Hugging Face docs show it (bitsandbytes)
        from transformers import BitsAndBytesConfig

        from trainer.model.compute import rates

        if bf16 and not cuda and not rates().bf16_fast:
            # bf16 crawls on this CPU (a bf16 head and norms took 165 s a step for two 7B layers): the
            # Hugging Face user's way out is fp32 for everything bitsandbytes does not quantize.
            bf16 = False
            setting = f"compute fp32, unquantized weights fp32 ({rates().describe()})"
        compute = torch.bfloat16 if bf16 else torch.float32
        q = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=compute) if cfg.lora.base_bits == 4
             else BitsAndBytesConfig(load_in_8bit=True))
        quantized = {"quantization_config": q, "device_map": {"": device}}
    model = AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path,
                                                 dtype=torch.bfloat16 if bf16 and cfg.lora.enabled else torch.float32,
                                                 attn_implementation=args.attn, **quantized)
    if cuda and not quantized:
        model.to(device)
    model.config.use_cache = False
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    if cfg.lora.enabled:
        from peft import LoraConfig, get_peft_model

        targets = list(cfg.lora.target_modules)
        torch.manual_seed(t.seed)  # the adapters' initial values as ours (trainer/train/model.py seeds them the same way)
        model = get_peft_model(model, LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                                                 target_modules="all-linear" if targets == ["all-linear"] else targets,
                                                 task_type="CAUSAL_LM"))

    class Clock(TrainerCallback):
        first_step = None
        computed = 0

        def __init__(self):
            self.steps = []

        def on_train_begin(self, a, state, control, **kw):
            self.start = self.last = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            now = time.perf_counter()
            self.steps.append(now - self.last)
            self.last = now
            if self.first_step is None:
                self.first_step = now - self.start

    clock = Clock()
    if args.mode == "trl":
        from trl import SFTConfig, SFTTrainer

        arguments, trainer_class = SFTConfig, SFTTrainer
        # A packed row holds max_length tokens, several examples: as many rows per step as carry the tokens
        # of our per_device_train_batch_size examples, so both see about the same tokens per step.
        mean = sum(len(i) for i, _ in exs) / max(1, len(exs))
        rows_per_step = max(1, round(t.per_device_train_batch_size * mean / cfg.data.max_seq_length))
        extra = {"packing": True, "max_length": cfg.data.max_seq_length, "dataset_num_proc": None}
    else:
        arguments, trainer_class, extra = TrainingArguments, Trainer, {}
    targs = arguments(
        output_dir=str(Path(args.out) / "hf"),
        per_device_train_batch_size=rows_per_step if args.mode == "trl" else t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps, learning_rate=t.learning_rate, lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_steps or t.warmup_ratio, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps, save_strategy="no", eval_strategy="no", report_to="none", seed=t.seed,
        ddp_backend=("nccl" if cuda else "gloo") if world > 1 else None, use_cpu=not cuda, bf16=bf16,
        dataloader_num_workers=0, disable_tqdm=True, optim="adamw_torch_fused",
        remove_unused_columns=False, include_num_input_tokens_seen="non_padding",
        train_sampling_strategy="sequential" if batches else "random", **extra,
        # training.fsdp: the Trainer's own FSDP2 (through accelerate), each decoder layer sharded as ours does.
        **({"fsdp": "full_shard auto_wrap", "fsdp_config": {"version": 2, "reshard_after_forward": True,
                                                            "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]}}
           if t.fsdp and world > 1 else {}))
    kwargs = {"processing_class": tok} if args.mode == "trl" else {"data_collator": collator}
    trainer = trainer_class(model=model, args=targs, train_dataset=dataset, callbacks=[clock], **kwargs)
    # Tokens computed per epoch, padding included: the padded collator pads each batch to its longest row.
    order = "ours" if batches else "hf"
    if batches is None and args.mode == "padded":  # the Trainer's order: this rank's batches, as many on every rank
        batches = [[int(j) for j in b] for b in trainer.get_train_dataloader().batch_sampler] * world
    lengths = [len(i) for i, _ in exs]
    result = trainer.train()
    if trainer.is_world_process_zero():
        saving = time.perf_counter()
        if quantized:  # the adapter alone: merging into a 4-bit base would round it (ours re-reads the files)
            trainer.model.save_pretrained(str(Path(args.out) / "adapter"))
        else:
            final = trainer.model.merge_and_unload() if cfg.lora.enabled else trainer.model
            final.save_pretrained(str(Path(args.out) / "final"))
            tok.save_pretrained(str(Path(args.out) / "final"))
        save_seconds = time.perf_counter() - saving
        real = int(sum(len(i) for i, _ in exs))
        computed = (sum(max(lengths[j] for j in b) * len(b) for b in batches) if batches
                    else sum(len(r["input_ids"]) for r in rows))
        summary = {"train_seconds": result.metrics["train_runtime"], "first_step_seconds": clock.first_step,
                   "steps": trainer.state.global_step,
                   "num_input_tokens_seen": int(trainer.state.num_input_tokens_seen or 0) or real,
                   "computed_tokens": computed, "real_tokens": real, "order": order,
                   "step_seconds": clock.steps, "final_save_seconds": save_seconds, "setting": setting,
                   "peak_device_memory_gib": torch.cuda.max_memory_allocated() / (1 << 30) if cuda else None}
        (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=1))
    # Leave together: a rank exiting while rank 0 still saves can abort in gloo's teardown.
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The seed's recipe, faithfully: the Hugging Face Trainer on Alpaca-style examples, either padded
per batch (DataCollatorForSeq2Seq) or concatenated into blocks of max_seq_length (group_texts).

Run by bench/run.py under torchrun with the same model, data, tokenization, batch size, learning
rate, schedule and process count as our trainer:
    torchrun --nproc-per-node 2 bench/hf_baseline.py --config CFG --mode padded|concat --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from trainer.config import load_config  # noqa: E402
from trainer.data import load_records, split_validation, tokenize  # noqa: E402


def concatenate(examples, block: int):
    """group_texts: one stream of tokens (labels carried along, prompt masks kept), cut into blocks."""
    ids, labels = [], []
    for ex in examples:
        ids += ex.input_ids
        labels += ex.labels
    n = (len(ids) // block) * block
    return [{"input_ids": ids[i:i + block], "labels": labels[i:i + block], "attention_mask": [1] * block}
            for i in range(0, n, block)]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--mode", choices=("padded", "concat"), required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    from datasets import Dataset
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainerCallback,
                              TrainingArguments, default_data_collator)

    cfg = load_config(args.config)
    t = cfg.training
    tok = AutoTokenizer.from_pretrained(cfg.model.name_or_path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    records, _ = load_records(cfg.data)
    train_records, _ = split_validation(records, cfg.data.validation_fraction, cfg.data.validation_seed)
    examples = tokenize(train_records, cfg.data, tok)
    if args.mode == "padded":
        rows = [{"input_ids": e.input_ids, "labels": e.labels, "attention_mask": [1] * len(e.input_ids)}
                for e in examples]
        collator = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
    else:
        rows = concatenate(examples, cfg.data.max_seq_length)
        collator = default_data_collator
    dataset = Dataset.from_list(rows)
    model = AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path, dtype=torch.float32,
                                                 attn_implementation=cfg.model.attn_implementation)
    model.config.use_cache = False

    class Clock(TrainerCallback):
        first_step = None

        def on_train_begin(self, a, state, control, **kw):
            self.start = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            if self.first_step is None:
                self.first_step = time.perf_counter() - self.start

    clock = Clock()
    targs = TrainingArguments(
        output_dir=str(Path(args.out) / "hf"), per_device_train_batch_size=t.per_device_train_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, num_train_epochs=t.num_train_epochs,
        max_steps=t.max_steps, learning_rate=t.learning_rate, lr_scheduler_type=t.lr_scheduler_type,
        warmup_steps=t.warmup_steps or t.warmup_ratio, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps, save_strategy="no", eval_strategy="no", report_to="none", seed=t.seed,
        ddp_backend="gloo", use_cpu=True, dataloader_num_workers=0, disable_tqdm=True,
        remove_unused_columns=False, include_num_input_tokens_seen="non_padding")
    trainer = Trainer(model=model, args=targs, train_dataset=dataset, data_collator=collator,
                      callbacks=[clock])
    result = trainer.train()
    if trainer.is_world_process_zero():
        trainer.save_model(str(Path(args.out) / "final"))
        tok.save_pretrained(str(Path(args.out) / "final"))
        real = sum(len(e.input_ids) for e in examples)
        summary = {"train_seconds": result.metrics["train_runtime"], "first_step_seconds": clock.first_step,
                   "steps": trainer.state.global_step,
                   "num_input_tokens_seen": int(trainer.state.num_input_tokens_seen or 0) or real,
                   "computed_tokens": sum(len(r["input_ids"]) for r in rows), "real_tokens": real}
        (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=1))
    # Leave together: a rank exiting while rank 0 still saves can abort in gloo's teardown.
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Evaluation of a model directory: perplexity on the validation split, size, latency, samples.

    python -m trainer evaluate --config config.yaml
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from trainer.config import TrainerConfig
from trainer.data import IGNORE, Example
from trainer.errors import UserError
from trainer.metrics import Logger, update_report

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


def dir_size(path: Path) -> int:
    """Bytes of the weight files of a model directory (what grows with the model)."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


@torch.no_grad()
def perplexity(model, examples: Sequence[Example]) -> tuple[float, float]:
    """(mean loss per trained token, perplexity) over examples, one forward each (no padding)."""
    model.eval()
    total, count = 0.0, 0
    for ex in examples:
        ids = torch.tensor([ex.input_ids])
        labels = torch.tensor([ex.labels])
        logits = model(input_ids=ids, use_cache=False).logits
        total += float(torch.nn.functional.cross_entropy(logits[0, :-1].float(), labels[0, 1:], ignore_index=IGNORE,
                                                         reduction="sum"))
        count += int((labels[0, 1:] != IGNORE).sum())
    if count == 0:
        raise UserError("evaluation: the validation examples have no trained tokens; set data.validation_fraction > 0")
    loss = total / count
    return loss, math.exp(min(loss, 50.0))


@torch.no_grad()
def latency_ms_per_token(model, prompt_ids: list[int], new_tokens: int, repeats: int = 3) -> float:
    """Median wall time per generated token (greedy, fixed length), after one warm-up run."""
    model.eval()
    ids = torch.tensor([prompt_ids])
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                  pad_token_id=model.config.pad_token_id or model.config.eos_token_id)
    model.generate(ids, **kwargs)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.generate(ids, **kwargs)
        times.append((time.perf_counter() - start) * 1000 / new_tokens)
    return statistics.median(times)


@torch.no_grad()
def generate(model, tokenizer, prompt: str, new_tokens: int) -> str:
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=True).input_ids
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


class EvalSet:
    """Validation examples and prompts of a config, tokenized once, shared by every model compared."""

    def __init__(self, cfg: TrainerConfig, tokenizer):
        from trainer.data import render, split_records, tokenize

        # Only the validation split is tokenized: evaluation never needs the training examples.
        train_records, val_records = split_records(cfg.data)
        examples = tokenize(val_records, cfg.data, tokenizer)
        self.examples = examples[: cfg.quantize.eval_samples or len(examples)]
        if not self.examples:
            raise UserError("evaluation needs a validation split: set data.validation_fraction > 0 "
                            "or data.validation_split")
        pairs = [render(r, cfg.data, tokenizer) for r in val_records[: cfg.quantize.sample_prompts]]
        self.prompts = [prompt for prompt, _ in pairs]
        self.references = [reference for _, reference in pairs]
        self.calibration = train_records[: cfg.quantize.calibration_samples]
        self.latency_prompt = self.examples[0].input_ids[:64]


def measure(model, tokenizer, path: Path, evalset: EvalSet, new_tokens: int) -> dict[str, Any]:
    loss, ppl = perplexity(model, evalset.examples)
    return {
        "path": str(path),
        "size_bytes": dir_size(path),
        "eval_loss": loss,
        "perplexity": ppl,
        "latency_ms_per_token": latency_ms_per_token(model, evalset.latency_prompt, new_tokens),
        "samples": [generate(model, tokenizer, p, new_tokens) for p in evalset.prompts],
        "eval_examples": len(evalset.examples),
    }


def load_final(cfg: TrainerConfig):
    from trainer.modeling import load_tokenizer

    final = cfg.final_dir
    if not (final / "config.json").exists():
        raise UserError(f"no fine-tuned model at {final}. Fix: run `python -m trainer finetune --config FILE` "
                        "first (it writes final/), or set output_dir to the run that did")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(final), dtype=torch.float32)
    return model, load_tokenizer(str(final))


def run(cfg: TrainerConfig, log: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
    """Evaluate final/ (and quantized/ when present); write the `evaluation` section of report.json."""
    log = log or Logger(True)
    torch.manual_seed(cfg.training.seed)
    model, tokenizer = load_final(cfg)
    evalset = EvalSet(cfg, tokenizer)
    results = {"final": measure(model, tokenizer, cfg.final_dir, evalset, cfg.quantize.max_new_tokens)}
    if (cfg.quantized_dir / "config.json").exists():
        from trainer.quantize import load_quantized

        qmodel, qtok = load_quantized(cfg.quantized_dir)
        results["quantized"] = measure(qmodel, qtok, cfg.quantized_dir, evalset, cfg.quantize.max_new_tokens)
    results["prompts"] = evalset.prompts
    results["references"] = evalset.references
    update_report(cfg.report_path, "evaluation", results)
    from trainer.report import regenerate

    log(regenerate(cfg.output_dir))
    return results

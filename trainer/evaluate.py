"""Evaluation of a model: perplexity on validation data, size, latency, sample generations.

    python -m trainer evaluate --config config.yaml                       # final/ (and quantized/)
    python -m trainer evaluate --config config.yaml --model base          # the model before fine-tuning
    python -m trainer evaluate --config config.yaml --model output/checkpoints/step-00000200
    python -m trainer evaluate --config config.yaml --data other.jsonl    # every record of another file
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from trainer.config import TrainerConfig
from trainer.data import IGNORE
from trainer.data.cache import Split
from trainer.errors import UserError
from trainer.metrics import Logger, update_report

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


def dir_size(path: Path) -> int:
    """Bytes of the weight files of a model directory (what grows with the model)."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


@torch.no_grad()
def perplexity(model, split: Split, limit: Optional[int] = None) -> tuple[float, float]:
    """(mean loss per trained token, perplexity) over a split's examples, one forward each (no padding)."""
    model.eval()
    total, count = 0.0, 0
    for i in range(min(len(split), limit or len(split))):
        ids, labels = split.labels(i)
        logits = model(input_ids=torch.from_numpy(ids)[None], use_cache=False).logits
        target = torch.from_numpy(labels)[1:]
        total += float(torch.nn.functional.cross_entropy(logits[0, :-1].float(), target, ignore_index=IGNORE,
                                                         reduction="sum"))
        count += int((target != IGNORE).sum())
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
    """The examples every model compared is scored on, tokenized once (the data cache), plus prompts.

    Without `data_file`: the run's validation data (data.validation_file, the dataset's validation
    split, or the held-out fraction). With it: every record of that file. `limit` caps the examples
    (quantization's before/after comparison); evaluation scores them all."""

    def __init__(self, cfg: TrainerConfig, tokenizer, model_path: str, data_file: Optional[str] = None,
                 limit: Optional[int] = None, log: Callable[[str], None] = lambda m: None):
        import dataclasses

        from trainer import data

        data_cfg = cfg.data
        if data_file:
            data_cfg = dataclasses.replace(data_cfg, file=data_file, dataset=None, validation_file=None,
                                           validation_split=None, validation_fraction=0.0, max_examples=None,
                                           file_wait_seconds=0)
        prepared = data.prepare(data_cfg, tokenizer, model_path, cache_root=data.cache_root(cfg), log=log)
        self.split = prepared.train if data_file else prepared.val
        self.limit = min(len(self.split), limit) if limit else len(self.split)
        self.source = data_file or "validation data"
        if self.limit == 0:
            raise UserError("evaluation needs validation data: set data.validation_fraction > 0, "
                            "data.validation_file or data.validation_split (or pass --data FILE)")
        self.train = prepared.train
        pairs = prepared.prompts[: cfg.quantize.sample_prompts]
        self.prompts = [p for p, _ in pairs]
        self.references = [r for _, r in pairs]
        self.latency_prompt = [int(t) for t in self.split.example(0)[0][:64]]

    def calibration(self, n: int) -> list[torch.Tensor]:
        """Training examples (prompt and response) for GPTQ/AWQ statistics."""
        return [torch.from_numpy(self.train.example(i)[0].astype("int64"))[None] for i in range(min(n, len(self.train)))]


def measure(model, tokenizer, path: Optional[Path], evalset: EvalSet, new_tokens: int) -> dict[str, Any]:
    loss, ppl = perplexity(model, evalset.split, evalset.limit)
    return {
        "path": str(path) if path else None,
        "size_bytes": dir_size(path) if path else None,
        "eval_loss": loss,
        "perplexity": ppl,
        "latency_ms_per_token": latency_ms_per_token(model, evalset.latency_prompt, new_tokens),
        "samples": [generate(model, tokenizer, p, new_tokens) for p in evalset.prompts],
        "eval_examples": evalset.limit,
    }


def load_final(cfg: TrainerConfig):
    final = cfg.final_dir
    if not (final / "config.json").exists():
        raise UserError(f"no fine-tuned model at {final}. Fix: run `python -m trainer finetune --config FILE` "
                        "first (it writes final/), or set output_dir to the run that did")
    return _load_dir(str(final))


def _load_dir(path: str):
    """A model directory in the dtype it was saved in (what a user serves; a 7B model saved in bf16
    is never widened to a 27 GB fp32 copy), with its tokenizer."""
    from transformers import AutoModelForCausalLM

    from trainer.modeling import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto")
    return model, load_tokenizer(path)


def load_model(cfg: TrainerConfig, which: str):
    """(model, tokenizer, model directory, label) of `--model`: final, base, a model directory, or a
    checkpoint directory of this run (the base model with the checkpoint's trained weights)."""
    from trainer.modeling import read_token, resolve

    if which == "final":
        model, tok = load_final(cfg)
        return model, tok, cfg.final_dir, "final"
    if which == "base":
        from trainer import distributed as D

        path = resolve(cfg.model, read_token(), D.Dist(0, 0, 1, 1, None, torch.device("cpu")))
        model, tok = _load_dir(path)
        return model, tok, Path(path), "base"
    p = Path(which)
    if (p / "config.json").exists():
        model, tok = _load_dir(str(p))
        return model, tok, p, str(p)
    if (p / "COMPLETE").exists():
        return _from_checkpoint(cfg, p)
    raise UserError(f"--model {which}: not final, base, a model directory (config.json) or a complete checkpoint "
                    "(COMPLETE)")


def _from_checkpoint(cfg: TrainerConfig, path: Path):
    """The base model with a checkpoint's trainable weights (LoRA merged), verified like on resume."""
    from trainer import distributed as D
    from trainer import modeling
    from trainer.checkpoint import Checkpointer

    single = D.Dist(0, 0, 1, 1, None, torch.device("cpu"))
    problem = Checkpointer(path.parent, 1, single, lambda m: None).problem(path)
    if problem:
        raise UserError(f"--model {path}: {problem}")
    base = modeling.resolve(cfg.model, modeling.read_token(), single)
    model = modeling.load_model(base, torch.float32, "auto", torch.device("cpu"))
    if cfg.lora.enabled:
        model, _ = modeling.apply_lora(model, cfg.lora)
    wrapped = modeling.CausalLMLoss(model)
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=0.0)
    Checkpointer(path.parent, 1, single, lambda m: None).load(path, wrapped, optimizer)
    if cfg.lora.enabled:
        model = model.merge_and_unload()
    model.config.use_cache = True
    return model, modeling.load_tokenizer(base), None, str(path)


def run(cfg: TrainerConfig, log: Optional[Callable[[str], None]] = None, which: str = "final",
        data_file: Optional[str] = None) -> dict[str, Any]:
    """Evaluate a model (and quantized/ beside final/); write the `evaluation` section of report.json
    and print what was computed."""
    log = log or Logger(True)
    torch.manual_seed(cfg.training.seed)
    model, tokenizer, path, label = load_model(cfg, which)
    evalset = EvalSet(cfg, tokenizer, str(path or cfg.model.name_or_path), data_file, log=log)
    log(f"evaluate: {label} on {evalset.limit} examples of {evalset.source}")
    results = {label: measure(model, tokenizer, path, evalset, cfg.quantize.max_new_tokens)}
    if which == "final" and (cfg.quantized_dir / "config.json").exists():
        from trainer.quantize import load_quantized

        qmodel, qtok = load_quantized(cfg.quantized_dir, dtype=torch.float32)
        results["quantized"] = measure(qmodel, qtok, cfg.quantized_dir, evalset, cfg.quantize.max_new_tokens)
    results["data"] = evalset.source
    results["prompts"] = evalset.prompts
    results["references"] = evalset.references
    update_report(cfg.report_path, "evaluation", results)
    log(table(results))
    return results


def table(results: dict[str, Any]) -> str:
    """What this evaluation computed, one row per model."""
    lines = [f"evaluation on {results['data']}", "| model | examples | loss | perplexity | size | ms/token |",
             "|---|---|---|---|---|---|"]
    for label, r in results.items():
        if not isinstance(r, dict) or "perplexity" not in r:
            continue
        size = f"{r['size_bytes'] / 1e6:.2f} MB" if r.get("size_bytes") else "-"
        lines.append(f"| {label} | {r['eval_examples']} | {r['eval_loss']:.4f} | {r['perplexity']:.4g} | {size} | "
                     f"{r['latency_ms_per_token']:.3g} |")
    return "\n".join(lines)

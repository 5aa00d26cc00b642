"""Evaluation of a model: perplexity on validation data, size, latency, sample generations.

python -m trainer evaluate --config config.yaml                       # final/ (and quantized/)
python -m trainer evaluate --config config.yaml --model base          # the model before fine-tuning
python -m trainer evaluate --config config.yaml --model output/checkpoints/step-00000200
python -m trainer evaluate --config config.yaml --data other.jsonl    # every record of another file
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import torch

from trainer.config import TrainerConfig
from trainer.errors import UserError
from trainer.post.measure import EvalSet, load_dir, load_final, measure
from trainer.monitor.metrics import Logger, update_report


def load_model(cfg: TrainerConfig, which: str):
    """(model, tokenizer, model directory, label) of `--model`: final, base, a model directory, or a
    checkpoint directory of this run (the base model with the checkpoint's trained weights)."""
    from trainer.model.modeling import read_token, resolve

    if which == "final":
        model, tok = load_final(cfg)
        return model, tok, cfg.final_dir, "final"
    if which == "base":
        from trainer.runtime import distributed as D

        from trainer.data import cache_root

        path = resolve(cfg.model, read_token(), D.Dist(0, 0, 1, 1, None, torch.device("cpu")), cache_root(cfg))
        model, tok = load_dir(path)
        return model, tok, Path(path), "base"
    p = Path(which)
    if (p / "config.json").exists():
        model, tok = load_dir(str(p))
        return model, tok, p, str(p)
    if (p / "COMPLETE").exists():
        return _from_checkpoint(cfg, p)
    raise UserError(f"--model {which}: not final, base, a model directory (config.json) or a complete checkpoint (COMPLETE)")


def _from_checkpoint(cfg: TrainerConfig, path: Path):
    """The base model with a checkpoint's trainable weights (LoRA merged), verified like on resume."""
    from trainer.runtime import distributed as D
    from trainer.model import modeling
    from trainer.train.checkpoint import Checkpointer

    single = D.Dist(0, 0, 1, 1, None, torch.device("cpu"))
    problem = Checkpointer(path.parent, 1, single, lambda m: None).problem(path)
    if problem:
        raise UserError(f"--model {path}: {problem}")
    from trainer.data import cache_root

    base = modeling.resolve(cfg.model, modeling.read_token(), single, cache_root(cfg))
    # A LoRA checkpoint's base in its saved dtype (no fp32 copy of a 7B model), merged exactly in fp32
    # layer by layer; a full fine-tune's checkpoint holds fp32 weights.
    dtype = modeling.save_dtype("auto", base) if cfg.lora.enabled else torch.float32
    model = modeling.load_model(base, dtype, "auto", torch.device("cpu"))
    if cfg.lora.enabled:
        model, _ = modeling.apply_lora(model, cfg.lora)
        modeling.trainable_fp32(model)
    wrapped = modeling.CausalLMLoss(model)
    optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=0.0)
    Checkpointer(path.parent, 1, single, lambda m: None).load(path, wrapped, optimizer)
    if cfg.lora.enabled:
        model = modeling.merge_lora(model, dtype)
    model.config.use_cache = True
    return model, modeling.load_tokenizer(base), None, str(path)


def run(
    cfg: TrainerConfig, log: Optional[Callable[[str], None]] = None, which: str = "final", data_file: Optional[str] = None
) -> dict[str, Any]:
    """Evaluate a model (and quantized/ beside final/); write the `evaluation` section of report.json
    and print what was computed."""
    log = log or Logger(True)
    torch.manual_seed(cfg.training.seed)
    model, tokenizer, path, label = load_model(cfg, which)
    evalset = EvalSet(cfg, tokenizer, str(path or cfg.model.name_or_path), data_file, log=log)
    log(f"evaluate: {label} on {evalset.limit} examples of {evalset.source}")
    results: dict[str, Any] = {label: measure(model, tokenizer, path, evalset, cfg.quantize.max_new_tokens)}
    if not results[label]["compute"].startswith("as stored"):
        log(f"evaluate: {label} measured with its {results[label]['compute']}")
    if which == "final" and (cfg.quantized_dir / "config.json").exists():
        from trainer.post.measure import load_quantized

        del model  # not beside the quantized one (at 7B each is the size of the machine's spare memory)
        qmodel, qtok = load_quantized(cfg.quantized_dir)
        results["quantized"] = measure(qmodel, qtok, cfg.quantized_dir, evalset, cfg.quantize.max_new_tokens)
    results["data"] = evalset.source
    results["prompts"] = evalset.prompts
    results["references"] = evalset.references
    update_report(cfg.report_path, "evaluation", results)
    log(table(results))
    return results


def table(results: dict[str, Any]) -> str:
    """What this evaluation computed, one row per model."""
    lines = [
        f"evaluation on {results['data']}",
        "| model | examples | loss | perplexity | size | ms/token |",
        "|---|---|---|---|---|---|",
    ]
    for label, r in results.items():
        if not isinstance(r, dict) or "perplexity" not in r:
            continue
        size = f"{r['size_bytes'] / 1e6:.2f} MB" if r.get("size_bytes") else "-"
        lines.append(
            f"| {label} | {r['eval_examples']} | {r['eval_loss']:.4f} | {r['perplexity']:.4g} | {size} | "
            f"{r['latency_ms_per_token']:.3g} |"
        )
    return "\n".join(lines)

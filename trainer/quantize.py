"""Post-training weight-only quantization with Intel Neural Compressor 3.x (RTN, GPTQ, AWQ).

    python -m trainer quantize --config config.yaml

Reads output_dir/final/, writes output_dir/quantized/ (Hugging Face layout with the quantization
config, so `load_quantized` — or neural_compressor's own `load(path, format="huggingface")` —
restores it without the original model), and the `quantize` section of report.json with size,
perplexity and latency before and after.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from trainer.config import QUANT_ALGORITHMS, QUANT_BITS, QuantizeConfig, TrainerConfig
from trainer.errors import UserError
from trainer.metrics import Logger, update_report


def effective_group_size(model, requested: int) -> int:
    """The requested group size, or the largest power of two that fits every quantized layer's input
    width (a 64-wide test model cannot have groups of 128)."""
    if requested == -1:
        return -1
    widths = [m.in_features for name, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and not name.endswith("lm_head")]
    narrowest = min(widths) if widths else requested
    size = requested
    while size > narrowest or (narrowest % size):
        size //= 2
    return max(size, 1)


def inc_config(q: QuantizeConfig, group_size: int):
    if q.bits not in QUANT_BITS:
        raise UserError(f"quantize.bits {q.bits} is not supported; use 4 or 8")
    if q.algorithm not in QUANT_ALGORITHMS:
        raise UserError(f"quantize.algorithm {q.algorithm!r} is not supported; use rtn, gptq or awq")
    from neural_compressor.torch.quantization import AWQConfig, GPTQConfig, RTNConfig

    common = dict(bits=q.bits, group_size=group_size, use_sym=q.scheme == "sym")
    if q.algorithm == "rtn":
        return RTNConfig(**common, use_layer_wise=False)  # layer-wise loading needs a model_path; we hold it
    if q.algorithm == "gptq":
        return GPTQConfig(**common, use_layer_wise=False)
    return AWQConfig(**common)


def calibration_batches(cfg: TrainerConfig, tokenizer, records: list[dict]) -> list[torch.Tensor]:
    """Training examples (prompt and response) for GPTQ/AWQ statistics."""
    from trainer.data import tokenize

    return [torch.tensor([ex.input_ids]) for ex in tokenize(records, cfg.data, tokenizer)]


def quantize_model(model, cfg: TrainerConfig, calibration: list[torch.Tensor]):
    from neural_compressor.torch.quantization import convert, prepare

    group = effective_group_size(model, cfg.quantize.group_size)
    qcfg = inc_config(cfg.quantize, group)
    example = calibration[0] if calibration else None
    prepared = prepare(model, qcfg, example_inputs=example) if cfg.quantize.algorithm == "awq" else prepare(model, qcfg)
    if cfg.quantize.algorithm in ("gptq", "awq"):
        if not calibration:
            raise UserError("quantize: GPTQ and AWQ need calibration data; set quantize.calibration_samples >= 1")
        with torch.no_grad():
            for batch in calibration:
                prepared(batch, use_cache=False)
    return convert(prepared), group


def load_quantized(path: str | Path):
    """(model, tokenizer) of a quantized/ directory written by this module.

        from trainer.quantize import load_quantized
        model, tok = load_quantized("output/quantized")
        ids = tok("Question: ...", return_tensors="pt").input_ids
        print(tok.decode(model.generate(ids, max_new_tokens=32)[0]))
    """
    path = Path(path)
    if not (path / "config.json").exists() or "quantization_config" not in (path / "config.json").read_text():
        raise UserError(f"{path} is not a quantized model directory (no config.json with a quantization_config). "
                        "Fix: run `python -m trainer quantize --config FILE`")
    from neural_compressor.torch.quantization import load
    from transformers import AutoTokenizer

    try:
        model = load(str(path), format="huggingface", device="cpu")
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:
        raise UserError(f"quantized model at {path} cannot be loaded: {type(exc).__name__}: {exc}. "
                        "Fix: quantize again (python -m trainer quantize --config FILE)") from None
    model.eval()
    return model, tokenizer


def run(cfg: TrainerConfig, log: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
    """Quantize final/ into quantized/, measure both, write report.json, report.md and the chart."""
    from neural_compressor.torch.quantization import save

    from trainer.evaluate import EvalSet, load_final, measure

    log = log or Logger(True)
    q = cfg.quantize
    inc_config(q, q.group_size)  # refuse bad bits/algorithm before loading anything
    torch.manual_seed(cfg.training.seed)
    model, tokenizer = load_final(cfg)
    evalset = EvalSet(cfg, tokenizer)
    log(f"quantize: measuring the fine-tuned model on {len(evalset.examples)} validation examples")
    before = measure(model, tokenizer, cfg.final_dir, evalset, q.max_new_tokens)
    calibration = calibration_batches(cfg, tokenizer, evalset.calibration) if q.algorithm != "rtn" else []
    log(f"quantize: {q.algorithm.upper()} {q.bits}-bit, {q.scheme}, group size {q.group_size}"
        + (f", {len(calibration)} calibration examples" if calibration else ""))
    qmodel, group = quantize_model(model, cfg, calibration)
    out = cfg.quantized_dir
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save(qmodel, str(tmp), format="huggingface")
    tokenizer.save_pretrained(str(tmp))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    # Measure what was written, reloaded the way a user loads it.
    reloaded, rtok = load_quantized(out)
    after = measure(reloaded, rtok, out, evalset, q.max_new_tokens)
    section = {
        "bits": q.bits, "algorithm": q.algorithm, "group_size": group, "group_size_requested": q.group_size,
        "scheme": q.scheme, "calibration_samples": len(calibration),
        "size_bytes_before": before["size_bytes"], "size_bytes_after": after["size_bytes"],
        "perplexity_before": before["perplexity"], "perplexity_after": after["perplexity"],
        "eval_loss_before": before["eval_loss"], "eval_loss_after": after["eval_loss"],
        "latency_ms_before": before["latency_ms_per_token"], "latency_ms_after": after["latency_ms_per_token"],
        "eval_examples": before["eval_examples"],
        "samples": [{"prompt": p, "reference": r, "before": b, "after": a}
                    for p, r, b, a in zip(evalset.prompts, evalset.references, before["samples"], after["samples"])],
        "path": str(out),
    }
    update_report(cfg.report_path, "quantize", section)
    from trainer.report import regenerate

    log(regenerate(cfg.output_dir))
    return section

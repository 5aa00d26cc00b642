"""Measuring a model, shared by evaluation and quantization: perplexity on validation examples,
size on disk, generation latency and samples, and loading the models measured (final/ and quantized/
in the dtype they were saved in). trainer/post/evaluate.py and trainer/post/quantize.py both import this
module and never each other.
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
from trainer.monitor.samples import generate

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


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
        total += float(torch.nn.functional.cross_entropy(logits[0, :-1].float(), target, ignore_index=IGNORE, reduction="sum"))
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
    kwargs = dict(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        use_cache=True,
        pad_token_id=model.config.pad_token_id or model.config.eos_token_id,
    )
    model.generate(ids, **kwargs)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.generate(ids, **kwargs)
        times.append((time.perf_counter() - start) * 1000 / new_tokens)
    return statistics.median(times)


class EvalSet:
    """The examples every model compared is scored on, tokenized once (the data cache), plus prompts.

    Without `data_file`: the run's validation data (data.validation_file, the dataset's validation
    split, or the held-out fraction). With it: every record of that file. `limit` caps the examples
    (quantization's before/after comparison); evaluation scores them all."""

    def __init__(
        self,
        cfg: TrainerConfig,
        tokenizer,
        model_path: str,
        data_file: Optional[str] = None,
        limit: Optional[int] = None,
        log: Callable[[str], None] = lambda m: None,
    ):
        import dataclasses

        from trainer import data

        data_cfg = cfg.data
        if data_file:
            data_cfg = dataclasses.replace(
                data_cfg,
                file=data_file,
                dataset=None,
                validation_file=None,
                validation_split=None,
                validation_fraction=0.0,
                max_examples=None,
                file_wait_seconds=0,
            )
        prepared = data.prepare(data_cfg, tokenizer, model_path, cache_root=data.cache_root(cfg), log=log)
        self.split = prepared.train if data_file else prepared.val
        self.limit = min(len(self.split), limit) if limit else len(self.split)
        self.source = data_file or "validation data"
        if self.limit == 0:
            raise UserError(
                "evaluation needs validation data: set data.validation_fraction > 0, "
                "data.validation_file or data.validation_split (or pass --data FILE)"
            )
        self.train = prepared.train
        pairs = prepared.prompts[: cfg.quantize.sample_prompts]
        self.prompts = [p for p, _ in pairs]
        self.references = [r for _, r in pairs]
        self.latency_prompt = [int(t) for t in self.split.example(0)[0][:64]]

    def calibration(self, n: int) -> list[torch.Tensor]:
        """Training examples (prompt and response) for GPTQ/AWQ statistics."""
        return [torch.from_numpy(self.train.example(i)[0].astype("int64"))[None] for i in range(min(n, len(self.train)))]


def measure(model, tokenizer, path: Optional[Path], evalset: EvalSet, new_tokens: int) -> dict[str, Any]:
    from trainer.model.compute import for_inference

    with for_inference(model) as compute:  # bf16 weights computed in fp32 where this CPU's bf16 is slow
        loss, ppl = perplexity(model, evalset.split, evalset.limit)
        return {
            "compute": compute,
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
        raise UserError(
            f"no fine-tuned model at {final}. Fix: run `python -m trainer finetune --config FILE` "
            "first (it writes final/), or set output_dir to the run that did"
        )
    return load_dir(str(final))


def load_dir(path: str):
    """A model directory in the dtype it was saved in (what a user serves; a 7B model saved in bf16
    is never widened to a 27 GB fp32 copy), with its tokenizer."""
    from transformers import AutoModelForCausalLM

    from trainer.model.modeling import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype="auto")
    return model, load_tokenizer(path)


def load_quantized(path: str | Path, dtype: Optional[torch.dtype] = None):
    """(model, tokenizer) of a quantized/ directory written by trainer/post/quantize.py, ready to run in
    `dtype` (default: the dtype the fine-tuned model was saved in, which its config.json names).

        from trainer.post.measure import load_quantized
        model, tok = load_quantized("output/quantized")
        ids = tok("Question: ...", return_tensors="pt").input_ids
        print(tok.decode(model.generate(ids, max_new_tokens=32)[0]))
    """
    path = Path(path)
    ggufs = sorted(path.glob("*.gguf")) if path.is_dir() else []
    if ggufs and not (path / "config.json").exists():
        raise UserError(
            f"{path} holds a GGUF model ({ggufs[0].name}): it runs in llama.cpp, not transformers. Fix: "
            f"llama_cpp.Llama(model_path='{ggufs[0]}'), or `ollama create NAME -f {path / 'Modelfile'}`"
        )
    if (path / "config.json").exists():
        import json

        method = (json.loads((path / "config.json").read_text()).get("quantization_config") or {}).get("quant_method")
        if method in ("compressed-tensors", "auto-round"):
            return load_served(path, dtype)  # transformers' own integration
    if not (path / "config.json").exists() or "quantization_config" not in (path / "config.json").read_text():
        raise UserError(
            f"{path} is not a quantized model directory (no config.json with a quantization_config). "
            "Fix: run `python -m trainer quantize --config FILE`"
        )
    from neural_compressor.torch.quantization import load
    from transformers import AutoTokenizer

    from trainer.post.quantsize import saved_dtype

    dtype = dtype or saved_dtype(str(path)) or torch.float32
    try:
        model = load(str(path), format="huggingface", device="cpu", torch_dtype=dtype)
        dequantize_once(model, dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:
        raise UserError(
            f"quantized model at {path} cannot be loaded: {type(exc).__name__}: {exc}. "
            "Fix: quantize again (python -m trainer quantize --config FILE)"
        ) from None
    model.eval()
    return model, tokenizer


def dequantize_once(model, dtype: torch.dtype) -> None:
    """Replace every INC weight-only layer by a plain frozen Linear holding its weight unpacked once
    into `dtype`, one layer at a time.

    INC's CPU kernel unpacks a layer on its first forward and keeps the result in fp32 for every later
    one ("recover is too slow" to repeat, its code says): for a 7B model that builds a 27 GB fp32 copy
    while it runs (measured: OOM-killed at 23.5 GB on a 24 GB machine). Unpacked here into the dtype the
    model is served in, the running model costs that dtype's copy (the packed layers are dropped), its
    layers' inputs and outputs stay in that dtype, and a CPU without fast bf16 can compute them in fp32
    layer by layer like any Linear (trainer/model/compute.py)."""
    from neural_compressor.torch.algorithms.weight_only.modules import INCWeightOnlyLinear

    for name, module in list(model.named_modules()):
        if isinstance(module, INCWeightOnlyLinear):
            unpacked = module.weight if hasattr(module, "weight") else module.recover()
            linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
            linear.weight = torch.nn.Parameter(unpacked.to(dtype), requires_grad=False)
            if module.bias is not None:
                linear.bias = torch.nn.Parameter(module.bias.to(dtype), requires_grad=False)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, linear)
            del unpacked


def load_served(path: str | Path, dtype: Optional[torch.dtype] = None):
    """A quantized/ directory in a Hugging Face format (compressed-tensors, auto-round), loaded the way a
    user loads it: transformers' own from_pretrained (its quantization integration does the rest)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"dtype": dtype} if dtype is not None else {}
    model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    model.eval()
    return model, AutoTokenizer.from_pretrained(str(path))


class GGUFModel:
    """A GGUF file in llama.cpp (llama-cpp-python, built from source: `make llama-cpp`), measured as
    the Hugging Face models are: perplexity on the same tokenized validation examples (fed as token
    ids, so both see identical inputs), generation speed and samples."""

    def __init__(self, path: str | Path, n_ctx: int):
        try:
            from llama_cpp import Llama
        except ImportError:
            raise UserError(
                "quantize: a GGUF model is measured in llama.cpp, and llama-cpp-python is not installed "
                "here. Fix: make llama-cpp (builds it from source, pinned; the images have it), or "
                "quantize.format: compressed-tensors"
            ) from None
        import os

        self.path = Path(path)
        self.llm = Llama(
            model_path=str(path),
            n_ctx=n_ctx,
            logits_all=True,
            verbose=False,
            seed=0,
            n_threads=max(1, min(8, os.cpu_count() or 1)),
        )

    def perplexity(self, split: Split, limit: Optional[int] = None) -> tuple[float, float]:
        import numpy as np

        total, count = 0.0, 0
        for i in range(min(len(split), limit or len(split))):
            ids, labels = split.labels(i)
            self.llm.reset()
            self.llm.eval([int(t) for t in ids])
            logits = np.asarray(self.llm.scores[: len(ids)], dtype=np.float64)
            top = logits.max(-1, keepdims=True)
            logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
            target = labels[1:]
            keep = target != IGNORE
            total += float(-logp[:-1][keep, target[keep]].sum())
            count += int(keep.sum())
        if count == 0:
            raise UserError("evaluation: the validation examples have no trained tokens; set data.validation_fraction > 0")
        loss = total / count
        return loss, math.exp(min(loss, 50.0))

    def _complete(self, prompt, new_tokens: int) -> tuple[str, int]:
        self.llm.reset()
        out: Any = self.llm.create_completion(prompt, max_tokens=new_tokens, temperature=0.0, top_k=1)
        return out["choices"][0]["text"], int(out["usage"]["completion_tokens"])

    def latency_ms_per_token(self, prompt_ids: list[int], new_tokens: int, repeats: int = 3) -> float:
        self._complete(prompt_ids, new_tokens)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            _, made = self._complete(prompt_ids, new_tokens)
            times.append((time.perf_counter() - start) * 1000 / max(1, made))
        return statistics.median(times)

    def generate(self, prompt: str, new_tokens: int) -> str:
        return self._complete(prompt, new_tokens)[0].strip()


def measure_gguf(path: Path, evalset: EvalSet, new_tokens: int) -> dict[str, Any]:
    longest = max(len(evalset.split.labels(i)[0]) for i in range(evalset.limit))
    model = GGUFModel(path, n_ctx=max(256, longest + new_tokens + 16, len(evalset.latency_prompt) + new_tokens + 16))
    loss, ppl = model.perplexity(evalset.split, evalset.limit)
    return {
        "path": str(path),
        "size_bytes": Path(path).stat().st_size,
        "eval_loss": loss,
        "perplexity": ppl,
        "latency_ms_per_token": model.latency_ms_per_token(evalset.latency_prompt, new_tokens),
        "samples": [model.generate(p, new_tokens) for p in evalset.prompts],
        "eval_examples": evalset.limit,
    }

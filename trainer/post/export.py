"""Quantized models in the formats serving engines load, written by Intel's AutoRound (the algorithm and
the exporters of the seed's Intel stack; its GGUF writer is llama.cpp's own conversion code, pinned in
AutoRound's release).

    quantize.format: compressed-tensors   -> quantized/ (transformers from_pretrained, vLLM)
    quantize.format: auto-round           -> quantized/ (transformers with auto-round, vLLM, SGLang)
    quantize.format: gguf:q4_k_m | q8_0   -> quantized/model-<type>.gguf + Modelfile (llama.cpp, Ollama)

Algorithms: rtn (AutoRound with 0 tuning steps) and autoround (quantize.iters steps per decoder block),
both calibrated on training examples (never a downloaded dataset). What is hand-written here is only
the glue: the calibration blocks from our tokenized examples, and laying AutoRound's output out as
quantized/ with the commands that serve it.
"""

from __future__ import annotations

import functools
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from trainer.config import QuantizeConfig
from trainer.post import quantsize
from trainer.errors import UserError

# Our format names -> AutoRound's.
AUTOROUND_FORMATS = {
    "compressed-tensors": "llm_compressor",
    "auto-round": "auto_round",
    "gguf:q4_k_m": "gguf:q4_k_m",
    "gguf:q8_0": "gguf:q8_0",
}
ENGINES = {
    "compressed-tensors": "transformers",
    "auto-round": "transformers",
    "gguf:q4_k_m": "llama.cpp",
    "gguf:q8_0": "llama.cpp",
}


def is_gguf(fmt: str) -> bool:
    return fmt.startswith("gguf:")


def check_model(fmt: str, model_path: str) -> None:
    """Before any compute: a GGUF export needs llama.cpp's converter (as AutoRound bundles it, pinned)
    to know the model's architecture; one it does not is refused now, not after training."""
    if not is_gguf(fmt):
        return
    from auto_round.export.export_to_gguf.llama_cpp_conversion import get_conversion

    try:
        get_conversion(model_path=model_path, auto_update=False)  # never a download at run time
    except Exception as exc:
        detail = str(exc).split(". This may mean")[0].splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise UserError(
            f"quantize.format {fmt}: llama.cpp's converter (as pinned in auto-round) cannot convert the "
            f"model at {model_path} ({detail}). Fix: quantize.format: compressed-tensors or auto-round "
            "(served by transformers and vLLM), or quantize.enabled: false"
        ) from None


def calibration_blocks(examples: list[torch.Tensor], seqlen: int) -> list[torch.Tensor]:
    """Training examples, concatenated and cut into equal blocks of `seqlen` tokens (AutoRound takes
    equally long samples; at least one block, shorter when the examples are)."""
    ids = torch.cat([e.flatten() for e in examples]) if examples else torch.zeros(0, dtype=torch.long)
    if len(ids) == 0:
        raise UserError("quantize: no training examples to calibrate on. Fix: quantize.calibration_samples >= 1")
    seqlen = min(seqlen, len(ids))
    return [ids[i : i + seqlen][None] for i in range(0, len(ids) - seqlen + 1, seqlen)]


def quantize_and_save(
    model,
    tokenizer,
    q: QuantizeConfig,
    group_size: int,
    calibration: list[torch.Tensor],
    seqlen: int,
    target: Path,
    log: Callable[[str], None],
) -> Path:
    """AutoRound on `model` (final/ as loaded, in its saved dtype), written to `target` (a new
    directory). Returns what the engine loads: the directory (Hugging Face formats) or the .gguf file."""
    from auto_round import AutoRound

    blocks = calibration_blocks(calibration, seqlen)
    iters = q.iters if q.algorithm == "autoround" else 0
    kind = {"rtn": "RTN", "opt-rtn": "optimized RTN"}.get(q.algorithm, f"{iters} tuning steps per block")
    log(
        f"quantize: AutoRound {kind}, {q.bits}-bit, "
        f"{q.scheme}, group size {group_size}, {len(blocks)} calibration blocks of {blocks[0].shape[1]} tokens "
        f"-> {q.format}"
    )
    staging = target.with_name(target.name + ".autoround")
    shutil.rmtree(staging, ignore_errors=True)
    device = "cuda" if torch.cuda.is_available() and next(model.parameters()).is_cuda else "cpu"
    kept = next(model.parameters()).dtype  # final/'s dtype, before AutoRound widens anything
    try:
        # rtn is plain round-to-nearest; opt-rtn is AutoRound's "optimized RTN", which searches scales and
        # zero points per group (measured at 7B on 2 cores: 465 s per decoder layer, ~4 hours, against
        # minutes; on SmolLM2-135M ~1 minute, and half the 4-bit perplexity cost).
        rounder = AutoRound(
            model,
            tokenizer,
            bits=q.bits,
            group_size=group_size,
            sym=q.scheme == "sym",
            iters=iters,
            nsamples=len(blocks),
            seqlen=blocks[0].shape[1],
            dataset=blocks,
            enable_torch_compile=False,
            device_map=device,
            disable_opt_rtn=q.algorithm == "rtn",
        )
        rounder.quantize_and_save(output_dir=str(staging), format=AUTOROUND_FORMATS[q.format])
    except Exception as exc:
        shutil.rmtree(staging, ignore_errors=True)
        detail = str(exc).splitlines()[0][:300] if str(exc) else ""
        hint = (
            " (llama.cpp's converter does not recognise this model's tokenizer or architecture)"
            if is_gguf(q.format) and ("tokenizer" in detail or "not recognized" in detail or "not supported" in detail)
            else ""
        )
        raise UserError(
            f"quantize: AutoRound cannot write {type(model).__name__} as {q.format}{hint}: "
            f"{type(exc).__name__}: {detail}. Fix: another quantize.format (compressed-tensors is "
            "the default), or quantize.enabled: false"
        ) from None
    path = _collect(staging, target, q.format, kept, log)
    shutil.rmtree(staging, ignore_errors=True)
    return path


def _collect(staging: Path, target: Path, fmt: str, kept: torch.dtype, log: Callable[[str], None]) -> Path:
    """What AutoRound wrote into `staging`, moved into `target` as the format is served: one GGUF file
    and its Modelfile, or a model directory (its unquantized tensors back in final/'s dtype); the path
    an engine loads."""
    target.mkdir(parents=True, exist_ok=True)
    if is_gguf(fmt):
        found = sorted(staging.rglob("*.gguf"))
        if len(found) != 1:
            raise UserError(f"quantize: AutoRound wrote {len(found)} GGUF files for {fmt}, expected one")
        kind = fmt.split(":", 1)[1]
        path = target / f"model-{kind}.gguf"
        shutil.move(str(found[0]), path)
        (target / "Modelfile").write_text(f"FROM ./{path.name}\n")
    else:
        configs = [p.parent for p in staging.rglob("config.json")]
        if not configs:
            raise UserError(f"quantize: AutoRound wrote no model directory for {fmt}")
        config = configs[0]
        for item in config.iterdir():
            shutil.move(str(item), target / item.name)
        narrowed = keep_unquantized_dtype(target, kept)
        if narrowed:
            log(
                f"quantize: {narrowed} tensors AutoRound left unquantized (embeddings, norms, head) written back in "
                f"{str(kept).replace('torch.', '')}, final/'s dtype: AutoRound computes in fp32 on a CPU without bf16 "
                "and saves them so, which made the quantized model larger"
            )
        path = target
    return path


def keep_unquantized_dtype(folder: Path, dtype: torch.dtype) -> int:
    """Cast the floating tensors a Hugging Face quantized checkpoint holds unquantized (embeddings,
    norms, an untied head) to `dtype`, file by file, and name it in config.json; returns how many
    changed. Hand-written because AutoRound has no option for it: it runs in fp32 where the CPU lacks
    bf16 (its `amp` turns itself off) and saves what it did not quantize in fp32, so a bf16 model's
    4-bit copy carried an fp32 embedding (measured: 2.07 MB for a 4.46 MB bf16 model, 0.46x, against 0.3x
    on a bf16 CPU)."""
    import json

    from safetensors import safe_open

    from trainer.atomic import write_with

    changed = 0
    for path in sorted(folder.glob("*.safetensors")):
        tensors, metadata, narrowed = {}, None, 0
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata()
            for key in f.keys():
                tensor = f.get_tensor(key)
                # A quantized layer's stored parts keep the dtype the format gives them.
                if (
                    tensor.is_floating_point()
                    and tensor.dtype != dtype
                    and tensor.element_size() > torch.empty((), dtype=dtype).element_size()
                    and key.rsplit(".", 1)[-1] not in quantsize.QUANTIZED_PARTS
                ):
                    tensor = tensor.to(dtype)
                    narrowed += 1
                tensors[key] = tensor
        if narrowed:
            write_with(path, functools.partial(_save_safetensors, tensors, metadata))
            changed += narrowed
    config = folder / "config.json"
    if changed and config.exists():
        raw = json.loads(config.read_text())
        raw["dtype"] = str(dtype).replace("torch.", "")
        raw.pop("torch_dtype", None)
        write_with(config, lambda tmp: tmp.write_text(json.dumps(raw, indent=2) + "\n"))
    return changed


def serve_commands(fmt: str, path: Path, name: str) -> dict[str, str]:
    """How to serve what was written, for the report and the README."""
    if is_gguf(fmt):
        gguf = Path(path).name
        return {
            "ollama": f"ollama create {name} -f Modelfile && ollama run {name}  # Modelfile: FROM ./{gguf}",
            "llama-cli": f"llama-cli -m {gguf} -p 'Question: ...' -n 64",
            "llama-server": f"llama-server -m {gguf} --port 8080",
        }
    return {"transformers": f"AutoModelForCausalLM.from_pretrained('{name}')", "vllm": f"vllm serve ./{name}"}


def _save_safetensors(tensors: dict[str, Any], metadata: Optional[dict[str, str]], tmp: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(tmp), metadata=metadata)

"""Post-training weight-only quantization: Intel's AutoRound (RTN, AutoRound) into the formats serving
engines load (trainer/post/export.py), or Intel Neural Compressor 3.x (RTN, GPTQ, AWQ) into its own layout.

    python -m trainer quantize --config config.yaml

Reads output_dir/final/, writes output_dir/quantized/ in quantize.format, then loads it the way a user
serves it (transformers' from_pretrained; llama.cpp for GGUF; INC's loader for format inc) and measures
it there: the `quantize` section of report.json has size, perplexity and generation speed before and
after, and the commands that serve it. A result that does not load and run in its engine is an error,
and quantized/ is then left as it was.
"""

from __future__ import annotations

import dataclasses
import gc
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from trainer.atomic import publish_dir
from trainer.post import export, quantsize
from trainer.config import QUANT_BITS, QuantizeConfig, TrainerConfig
from trainer.errors import UserError
from trainer.post.measure import EvalSet, dir_size, load_final, load_quantized, load_served, measure, measure_gguf
from trainer.monitor.metrics import Logger, update_report


def inc_config(q: QuantizeConfig, group_size: int):
    if q.bits not in QUANT_BITS:
        raise UserError(f"quantize.bits {q.bits} is not supported; use 4 or 8")
    if q.algorithm not in ("rtn", "gptq", "awq"):
        raise UserError(
            f"quantize.algorithm {q.algorithm!r} does not run through INC; use rtn, gptq or awq with quantize.format: inc"
        )
    from neural_compressor.torch.quantization import AWQConfig, GPTQConfig, RTNConfig

    common = dict(bits=q.bits, group_size=group_size, use_sym=q.scheme == "sym")
    if q.algorithm == "rtn":
        return RTNConfig(**common, use_layer_wise=False)  # layer-wise loading needs a model_path; we hold it
    if q.algorithm == "gptq":
        return GPTQConfig(**common, use_layer_wise=False)
    return AWQConfig(**common)


def _rtn_by_layer(model, qcfg) -> None:
    """RTN one decoder layer at a time, each widened to fp32 first: the same arithmetic as quantizing
    an fp32 copy of the whole model (INC's RTN rounds in the weight's own dtype, and bf16 scales would
    move rounding boundaries), with one layer in fp32 at a time instead of the model. Hand-written
    because INC's own layer-wise mode reloads weights from a model path rather than widening the ones
    in memory. The per-layer configs are put together so INC's save sees the whole model's."""
    from neural_compressor.torch.quantization import convert, prepare

    from trainer.runtime.distributed import decoder_layers

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    layers = set(map(id, decoder_layers(model)))
    blocks = [(n, m) for n, m in model.named_modules() if id(m) in layers]
    inside = {id(x) for _, m in blocks for x in m.modules()}
    # Projections outside the decoder layers (rare), each as a block of its own; never the output head.
    blocks += [(n, m) for n, m in quantsize.quantizable_layers(model) if id(m) not in inside and m is not head]
    mapping = {}
    for name, block in blocks:
        dtype = next(block.parameters()).dtype
        block.float()
        converted = convert(prepare(block, qcfg))
        if converted is not block:  # a bare projection is replaced, not changed in place
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, converted)
        for (sub, kind), config in getattr(converted, "qconfig", {}).items():
            mapping[(f"{name}.{sub}" if sub else name, kind)] = config
        for q in converted.parameters():  # what INC kept (norms) back to the model's dtype
            if q.is_floating_point() and q.dtype != dtype:
                q.data = q.data.to(dtype)
    model.qconfig = mapping


def quantize_model(model, cfg: TrainerConfig, calibration: list[torch.Tensor]):
    from neural_compressor.torch.quantization import convert, prepare

    group = quantsize.effective_group_size(model, cfg.quantize.group_size)
    qcfg = inc_config(cfg.quantize, group)
    if cfg.quantize.algorithm == "rtn":
        _rtn_by_layer(model, qcfg)
        return model, group
    # GPTQ and AWQ calibrate through the whole model in its saved dtype (INC's GPTQ widens each layer's
    # weight and inputs to fp32 for its Hessian arithmetic itself).
    example = calibration[0] if calibration else None
    prepared = prepare(model, qcfg, example_inputs=example) if cfg.quantize.algorithm == "awq" else prepare(model, qcfg)
    if cfg.quantize.algorithm in ("gptq", "awq"):
        if not calibration:
            raise UserError("quantize: GPTQ and AWQ need calibration data; set quantize.calibration_samples >= 1")
        with torch.no_grad():
            for batch in calibration:
                prepared(batch, use_cache=False)
    return convert(prepared), group


def _check(q: QuantizeConfig, plan: quantsize.Breakdown, where: str) -> None:
    """Refuse a quantization that quantizes nothing, or that does not shrink the model."""
    if plan.quantized_layers == 0:
        raise UserError(
            f"quantize: {where} has no layer INC can quantize (it quantizes nn.Linear and transformers "
            "Conv1D layers, never the lm_head), so the result would be the same model. Fix: "
            "quantize.enabled: false"
        )
    if plan.ratio >= 1.0 and not q.allow_larger:
        raise UserError(
            f"quantize: {q.bits}-bit {q.algorithm.upper()} would not shrink {where}: "
            f"{plan.explain()}. Fix: a larger group (quantize.group_size), fewer bits, "
            "quantize.enabled: false, or quantize.allow_larger: true to write it anyway"
        )


ENGINE_PACKAGES = {
    "compressed-tensors": (("auto_round", "auto-round"), ("compressed_tensors", "compressed-tensors")),
    "auto-round": (("auto_round", "auto-round"),),
    "gguf:q4_k_m": (("auto_round", "auto-round"), ("gguf", "gguf"), ("llama_cpp", "llama-cpp-python")),
    "gguf:q8_0": (("auto_round", "auto-round"), ("gguf", "gguf"), ("llama_cpp", "llama-cpp-python")),
    "inc": (("neural_compressor", "neural-compressor-pt"),),
}


def check_engine(q: QuantizeConfig) -> None:
    """The exporter and the engine the result is measured in must be installed: refused before any
    compute (a GGUF that cannot be run here would be a report nobody checked)."""
    import importlib.util

    for module, package in ENGINE_PACKAGES[q.format]:
        if importlib.util.find_spec(module) is None:
            fix = (
                "make llama-cpp (builds llama-cpp-python from source, pinned; the images have it)"
                if module == "llama_cpp"
                else f"pip install {package} (requirements.lock pins it)"
            )
            raise UserError(
                f"quantize.format {q.format} needs {package}, which is not installed here. Fix: {fix}, or another quantize.format"
            )


def preflight(q: QuantizeConfig, model_path: str, dtype: torch.dtype) -> quantsize.Breakdown:
    """Before training: what quantization will store for this model (shapes only, meta device);
    a quantization that cannot quantize or shrink it, or whose engine is missing, is refused before any
    compute."""
    check_engine(q)
    export.check_model(q.format, model_path)
    plan = quantsize.estimate(quantsize.meta_model(model_path), q.bits, q.group_size, dtype, q.algorithm)
    _check(q, plan, f"the model at {model_path}")
    return plan


def _keep_dtype(qmodel, dtype: torch.dtype) -> None:
    """Cast every saved tensor INC did not quantize (embeddings, norms, lm_head) back to the dtype of
    the model it came from: quantization ran in fp32 for accuracy, and saving those parts in fp32
    would make a bf16 model's quantized copy larger, not smaller."""
    from neural_compressor.torch.algorithms.weight_only.modules import INCWeightOnlyLinear

    for key, tensor in qmodel.state_dict(keep_vars=True).items():
        owner, _, name = key.rpartition(".")
        module = qmodel.get_submodule(owner) if owner else qmodel
        if isinstance(module, INCWeightOnlyLinear) or not tensor.is_floating_point() or tensor.dtype == dtype:
            continue
        if name in module._parameters:
            module._parameters[name].data = tensor.data.to(dtype)
        else:
            module._buffers[name] = tensor.to(dtype)
    qmodel.config.dtype = dtype


def _plan(cfg: TrainerConfig, log: Callable[[str], None]) -> None:
    """The quantize stage's memory plan (trainer/model/memplan.py), logged; refused before loading when it
    cannot fit."""
    import psutil

    from trainer.model import memplan

    if not (cfg.final_dir / "config.json").exists():
        return  # load_final says what is missing
    import neural_compressor.torch.quantization  # noqa: F401 - part of the runtime the plan measures

    if cfg.quantize.format != "inc":  # AutoRound and the engine's loader: ~0.2 GiB more runtime
        import auto_round  # noqa: F401

        if cfg.quantize.format == "compressed-tensors":
            import compressed_tensors  # noqa: F401

    from trainer.model.modeling import import_model_class

    import_model_class(cfg.final_dir)
    shape = memplan.read_shape(cfg.final_dir)
    now = psutil.Process().memory_info().rss
    rss = now + memplan.workspace(shape.saved_bytes)
    need = memplan.quantize_bytes(shape, rss, shape.saved_bytes, cfg.quantize.bits)
    budget, source = memplan.available_memory(1, now)
    log(
        f"memory plan (quantize): {need / memplan.GIB:.1f} GiB: final/ {shape.params * shape.saved_bytes / memplan.GIB:.2f} "
        f"in its saved dtype, the {cfg.quantize.bits}-bit layers beside it, one layer in fp32, runtime "
        f"{rss / memplan.GIB:.2f}; can have {budget / memplan.GIB:.1f} GiB ({source})"
    )
    if need > budget:
        raise UserError(
            f"memory plan (quantize): {need / memplan.GIB:.1f} GiB does not fit the {budget / memplan.GIB:.1f} "
            f"GiB this process can have ({source}); {cfg.final_dir} is unaffected. Fix: a larger "
            "resources.memory, or quantize.enabled: false"
        )


def run(cfg: TrainerConfig, log: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
    """quantize.format into quantized/, then each of quantize.also into quantized-<format>/; final/
    is measured once and every format in its own engine. Returns the main format's section."""
    log = log or Logger(True)
    for fmt in cfg.quantize.also:  # every engine and converter checked before the first one runs
        check_engine(also_config(cfg.quantize, fmt))
        export.check_model(fmt, str(cfg.final_dir))
    section = run_format(cfg, log)
    before = {
        "size_bytes": section["size_bytes_before"],
        "perplexity": section["perplexity_before"],
        "eval_loss": section["eval_loss_before"],
        "latency_ms_per_token": section["latency_ms_before"],
        "samples": [s["before"] for s in section["samples"]],
        "eval_examples": section["eval_examples"],
        "path": str(cfg.final_dir),
        "compute": section.get("compute_before"),
    }
    for fmt in cfg.quantize.also:
        extra = dataclasses.replace(cfg, quantize=also_config(cfg.quantize, fmt))
        run_format(extra, log, before=before, out=cfg.quantized_dir_for(fmt), key=f"quantize_also.{fmt}")
    return section


def also_config(q: QuantizeConfig, fmt: str) -> QuantizeConfig:
    """The settings of a format of quantize.also: the main ones with that format (and the bits it stores).
    8-bit GGUF is plain round-to-nearest whatever the main algorithm: at 8 bits RTN costs ~0.3% perplexity
    on SmolLM2, and opt-rtn's search would take as long as for 4 bits for nothing measurable."""
    bits = {"gguf:q8_0": 8, "gguf:q4_k_m": 4}.get(fmt, q.bits)
    algorithm = "rtn" if fmt == "gguf:q8_0" and q.algorithm == "opt-rtn" else q.algorithm
    return dataclasses.replace(q, format=fmt, bits=bits, algorithm=algorithm, also=())


def run_format(
    cfg: TrainerConfig,
    log: Callable[[str], None],
    before: Optional[dict[str, Any]] = None,
    out: Optional[Path] = None,
    key: str = "quantize",
) -> dict[str, Any]:
    """Quantize final/ into `out` (quantized/) in quantize.format, measure both (final/ only when
    `before` does not hold its measurement already), write report.json[key], report.md and the chart."""
    q = cfg.quantize
    out = out or cfg.quantized_dir
    check_engine(q)
    export.check_model(q.format, str(cfg.final_dir))
    if q.format == "inc":
        inc_config(q, q.group_size)  # refuse bad bits/algorithm before loading anything
    torch.manual_seed(cfg.training.seed)
    _plan(cfg, log)
    model, tokenizer = load_final(cfg)  # in its saved dtype: no fp32 copy of the model
    kept_dtype = quantsize.saved_dtype(str(cfg.final_dir)) or torch.float32
    plan = quantsize.estimate(model, q.bits, q.group_size, kept_dtype, q.algorithm)
    _check(q, plan, f"the model at {cfg.final_dir}")
    evalset = EvalSet(cfg, tokenizer, str(cfg.final_dir), limit=q.eval_samples or None)
    if before is None:
        log(f"quantize: measuring the fine-tuned model on {evalset.limit} validation examples")
        before = measure(model, tokenizer, cfg.final_dir, evalset, q.max_new_tokens)
        if not before["compute"].startswith("as stored"):
            log(f"quantize: final/ measured with its {before['compute']}")
    held = [model]  # handed over: the callee drops the last reference before reloading the quantized model
    del model
    if q.format != "inc":
        return _run_served(cfg, held, tokenizer, kept_dtype, plan, evalset, before, log, out, key)
    return _run_inc(cfg, held, tokenizer, kept_dtype, plan, evalset, before, log, out, key)


def _run_inc(
    cfg: TrainerConfig,
    held: list,
    tokenizer,
    kept_dtype: torch.dtype,
    plan: quantsize.Breakdown,
    evalset: EvalSet,
    before: dict[str, Any],
    log: Callable[[str], None],
    out: Path,
    key: str,
) -> dict[str, Any]:
    """Intel Neural Compressor's layout; measured after reloading it with INC's loader."""
    from neural_compressor.torch.quantization import save

    q = cfg.quantize
    model = held.pop()
    calibration = evalset.calibration(q.calibration_samples) if q.algorithm != "rtn" else []
    qmodel, group = _inc_quantized(cfg, model, calibration, kept_dtype, log)
    _keep_dtype(qmodel, kept_dtype)
    parts = quantsize.measure(qmodel, q.bits, group, kept_dtype, plan.unquantized_bytes)
    _check(q, parts, f"the model at {cfg.final_dir}")
    log(f"quantize: {parts.explain()}")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save(qmodel, str(tmp), format="huggingface")
    tokenizer.save_pretrained(str(tmp))
    written, original = dir_size(tmp), dir_size(cfg.final_dir)
    arch = type(model).__name__
    try:
        if written >= original and not q.allow_larger:
            raise UserError(
                f"quantize: the quantized files ({written} bytes) are not smaller than "
                f"{cfg.final_dir} ({original} bytes): {parts.explain()}. Fix: "
                "quantize.allow_larger: true to keep them anyway, or quantize.enabled: false"
            )
        # A quantized model counts only once it reloads and runs the way a user loads it, in the dtype
        # it is served in (final/'s); until then quantized/ is left as it was. The quantized model in
        # memory goes first: the reload must not stand beside it.
        del model, qmodel
        gc.collect()
        try:
            reloaded, rtok = load_quantized(tmp, dtype=kept_dtype)
            after = measure(reloaded, rtok, tmp, evalset, q.max_new_tokens)
        except Exception as exc:
            raise _not_run(
                exc,
                f"{q.bits}-bit {q.algorithm.upper()} model of {arch}",
                "reload and run with Intel Neural Compressor",
                out,
                cfg,
                "quantize.enabled: false, or another quantize.algorithm",
            ) from None
    except UserError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_dir(tmp, out)
    section = _section(
        q,
        group,
        len(calibration),
        before,
        after,
        evalset,
        out,
        format="inc",
        engine="Intel Neural Compressor (trainer.post.measure.load_quantized)",
        breakdown=parts.report(),
    )
    return _publish(cfg, section, log, key)


def _inc_quantized(cfg: TrainerConfig, model, calibration: list, kept_dtype: torch.dtype, log: Callable[[str], None]):
    """INC's quantized model and the group size it used; what INC cannot quantize is refused in one line."""
    q = cfg.quantize
    log(
        f"quantize: {q.algorithm.upper()} {q.bits}-bit, {q.scheme}, group size {q.group_size}"
        + (f", {len(calibration)} calibration examples" if calibration else "")
    )
    if calibration and kept_dtype.itemsize < 4:
        from trainer.model.compute import rates

        if not rates().bf16_fast:  # INC calibrates through the model as it is held; it is not widened here
            log(
                f"quantize: {q.algorithm.upper()} calibrates through final/ in {str(kept_dtype).replace('torch.', '')}, "
                f"slow here ({rates().describe()}). Faster: quantize.algorithm rtn or opt-rtn, or model.save_dtype: fp32"
            )
    try:
        qmodel, group = quantize_model(model, cfg, calibration)
    except UserError:
        raise
    except Exception as exc:  # INC meets a layer type or forward it cannot handle
        raise UserError(
            f"quantize: Intel Neural Compressor cannot {q.algorithm.upper()}-quantize {type(model).__name__} "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}); "
            f"{cfg.final_dir} is unaffected. Fix: quantize.algorithm: rtn, or quantize.enabled: false"
        ) from None
    return qmodel, group


def _run_served(
    cfg: TrainerConfig,
    held: list,
    tokenizer,
    kept_dtype: torch.dtype,
    plan: quantsize.Breakdown,
    evalset: EvalSet,
    before: dict[str, Any],
    log: Callable[[str], None],
    out: Path,
    key: str,
) -> dict[str, Any]:
    """AutoRound into a served format; measured after loading it in that format's engine."""
    q = cfg.quantize
    model = held.pop()
    arch = type(model).__name__
    group = quantsize.effective_group_size(model, q.group_size)
    calibration = evalset.calibration(q.calibration_samples)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    original = dir_size(cfg.final_dir)
    try:
        served = export.quantize_and_save(
            model, tokenizer, q, group, calibration, seqlen=min(512, cfg.data.max_seq_length), target=tmp, log=log
        )
        del model
        gc.collect()
        written = dir_size(tmp)
        if written >= original and not q.allow_larger:
            raise UserError(
                f"quantize: the {q.format} files ({written} bytes) are not smaller than {cfg.final_dir} "
                f"({original} bytes). Fix: quantize.allow_larger: true to keep them anyway, fewer bits, "
                "or quantize.enabled: false"
            )
        engine = export.ENGINES[q.format]
        log(f"quantize: {written / 1e6:.2f} MB written ({plan.explain()}); measuring it in {engine}")
        after = _measured_in_engine(cfg, served, tmp, evalset, kept_dtype, f"{q.bits}-bit {q.format} model of {arch}", out)
    except UserError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish_dir(tmp, out)
    served_path = out / Path(served).name if export.is_gguf(q.format) else out
    name = f"{Path(cfg.output_dir).name}-quantized"
    where = {"final": quantsize.stored(cfg.final_dir), "quantized": quantsize.stored(served_path)}
    log(
        f"quantize: where the bytes went: final/ {where['final']['explanation']}; {q.format}: {where['quantized']['explanation']}"
    )
    section = _section(
        q,
        group,
        len(calibration),
        before,
        after,
        evalset,
        served_path,
        format=q.format,
        engine=engine,
        iters=q.iters if q.algorithm == "autoround" else 0,
        breakdown=plan.report(),
        serve=export.serve_commands(q.format, served_path, name),
        stored=where,
    )
    log(
        f"quantize: {q.format} in {engine}: perplexity {before['perplexity']:.3f} -> {after['perplexity']:.3f}, "
        f"{section['tokens_per_second_before']:.1f} -> {section['tokens_per_second_after']:.1f} tokens/s, "
        f"{before['size_bytes'] / 1e6:.2f} -> {after['size_bytes'] / 1e6:.2f} MB; serve: " + "; ".join(section["serve"].values())
    )
    return _publish(cfg, section, log, key)


def _measured_in_engine(
    cfg: TrainerConfig, served: Path, tmp: Path, evalset: EvalSet, kept_dtype: torch.dtype, what: str, out: Path
) -> dict[str, Any]:
    """The written model measured the way a user serves it: llama.cpp for GGUF, else loaded back in
    the dtype it is served in. A model its engine cannot load or run is an error, never a report."""
    q = cfg.quantize
    try:
        if export.is_gguf(q.format):
            return measure_gguf(served, evalset, q.max_new_tokens)
        reloaded, rtok = load_served(tmp, dtype=kept_dtype)
        return measure(reloaded, rtok, tmp, evalset, q.max_new_tokens)
    except Exception as exc:
        raise _not_run(
            exc,
            what,
            f"load and run in {export.ENGINES[q.format]}",
            out,
            cfg,
            "another quantize.format, or quantize.enabled: false",
        ) from None


def _not_run(exc: Exception, what: str, failed: str, out: Path, cfg: TrainerConfig, fix: str) -> UserError:
    """A written model that its engine could not load or run: an error, never a report."""
    detail = str(exc).split(". Fix:")[0] if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
    return UserError(
        f"quantize: the {what} does not {failed} ({detail.splitlines()[0][:300]}); nothing was "
        f"written to {out} and {cfg.final_dir} is unaffected. Fix: {fix}"
    )


def _publish(cfg: TrainerConfig, section: dict[str, Any], log: Callable[[str], None], key: str = "quantize") -> dict[str, Any]:
    """report.json's quantize section (`key`: quantize, or quantize_also.<format>), then report.md and
    the charts again."""
    from trainer.monitor.report import regenerate

    update_report(cfg.report_path, key, section)
    log(regenerate(cfg.output_dir))
    return section


def _section(
    q: QuantizeConfig,
    group: int,
    calibrated: int,
    before: dict[str, Any],
    after: dict[str, Any],
    evalset: EvalSet,
    path: Path,
    **extra,
) -> dict[str, Any]:
    """report.json's quantize section: the settings, and the figures before and after side by side."""
    return {
        "bits": q.bits,
        "algorithm": q.algorithm,
        "group_size": group,
        "group_size_requested": q.group_size,
        "scheme": q.scheme,
        "calibration_samples": calibrated,
        "size_bytes_before": before["size_bytes"],
        "size_bytes_after": after["size_bytes"],
        "perplexity_before": before["perplexity"],
        "perplexity_after": after["perplexity"],
        "eval_loss_before": before["eval_loss"],
        "eval_loss_after": after["eval_loss"],
        "latency_ms_before": before["latency_ms_per_token"],
        "latency_ms_after": after["latency_ms_per_token"],
        "tokens_per_second_before": 1000.0 / before["latency_ms_per_token"],
        "tokens_per_second_after": 1000.0 / after["latency_ms_per_token"],
        "eval_examples": before["eval_examples"],
        # How each side was computed (trainer/model/compute.py): as stored, or bf16 weights computed in fp32.
        "compute_before": before.get("compute"),
        "compute_after": after.get("compute"),
        "samples": [
            {"prompt": p, "reference": r, "before": b, "after": a}
            for p, r, b, a in zip(evalset.prompts, evalset.references, before["samples"], after["samples"])
        ],
        "path": str(path),
        **extra,
    }

"""Start-up probes on the user's actual model, before the first step: are packed examples isolated,
and does the fast loss equal the model's own? The answers pick the path and are logged.

Which architectures leak across a packed boundary is not kept in a list: recurrent, convolutional
and gated-delta layers (Mamba, Jamba, LFM2, Qwen3-Next...) carry state across an example restart,
and some attention masks ignore `position_ids` (OPT, Falcon); new models arrive every month. So two
short random sequences A and B are run through the model, B alone and B packed after A, and their
logits compared (a few milliseconds, in the weights' own precision, no autocast). The same probe
guards any attention path added later.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from trainer.errors import UserError

# An isolated example's logits differ only by summation order: ~2e-7 in fp32 on tiny models, where the
# smallest leak measured (LFM2's convolution state) is 3e-4. Relative to the largest logit.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 4e-2, torch.float16: 5e-3}
PACKED, PACKED_VARLEN, PACKED_SEQ_IDX, PADDED = (
    "packed",
    "packed, variable-length attention",
    "packed with sequence index",
    "padded",
)


def sequence_kwargs(position_ids: torch.Tensor, device: Optional[torch.device] = None) -> dict[str, Any]:
    """Sequence boundaries of a packed row in the forms transformers' varlen paths accept: cumulative
    lengths (flash/varlen attention) and a per-token example index (Mamba-2 style kernels). Computed on
    the host (give it the collator's tensor) and copied to `device` without waiting."""
    from trainer.model.attention import _to, bounds

    device = torch.device(device) if device is not None else position_ids.device
    pos = position_ids.cpu()
    edges = bounds(pos)
    cu = torch.tensor(edges, dtype=torch.int32)
    longest = max(b - a for a, b in zip(edges[:-1], edges[1:]))
    return {
        "seq_idx": _to((torch.cumsum((pos == 0).int(), dim=1) - 1).to(torch.int32), device),
        "cu_seq_lens_q": _to(cu, device),
        "cu_seq_lens_k": _to(cu, device),
        "max_length_q": longest,
        "max_length_k": longest,
    }


@dataclass(frozen=True)
class PackingPlan:
    packing: str
    full_logits: bool
    leak: Optional[float]
    loss_gap: float
    tolerance: float
    note: Optional[str] = None  # why variable-length attention was not tried, where it was asked for

    @property
    def packs(self) -> bool:
        return self.packing != PADDED

    def extra(self, position_ids: torch.Tensor, device: Optional[torch.device] = None) -> dict[str, Any]:
        """Extra forward arguments for a micro-batch on this path: computed once per micro-batch, on the
        host from the collator's position ids, and sent to `device` without waiting."""
        if self.packing == PACKED_VARLEN:
            from trainer.model.attention import SEGMENTS, plan

            return {SEGMENTS: plan(position_ids, device)}
        return sequence_kwargs(position_ids, device) if self.packing == PACKED_SEQ_IDX else {}


def _probe_ids(model, device) -> tuple[torch.Tensor, torch.Tensor]:
    vocab = model.get_input_embeddings().num_embeddings
    g = torch.Generator().manual_seed(1234)
    low = min(4, vocab - 1)  # stay clear of the usual special tokens
    return (torch.randint(low, vocab, (7,), generator=g).to(device), torch.randint(low, vocab, (9,), generator=g).to(device))


def _logits(model, ids: torch.Tensor, positions: torch.Tensor, **extra) -> torch.Tensor:
    return model(input_ids=ids[None], position_ids=positions[None], use_cache=False, **extra).logits[0].float()


def leak(model, device, with_sequence_index: bool = False, reference: Optional[torch.Tensor] = None, extra_fn=None) -> float:
    """Largest change of B's logits when B is packed after A, relative to B's largest logit.
    `reference`: B's logits alone under another attention path (exactness of a new path)."""
    a, b = _probe_ids(model, device)
    pos_b = torch.arange(len(b), device=device)
    alone = _logits(model, b, pos_b) if reference is None else reference
    ids = torch.cat([a, b])
    positions = torch.cat([torch.arange(len(a), device=device), pos_b])
    extra = sequence_kwargs(positions[None]) if with_sequence_index else {}
    if extra_fn is not None:
        extra = extra_fn(positions[None])
    packed = _logits(model, ids, positions, **extra)[len(a) :]
    return float((alone - packed).abs().max()) / max(1.0, float(alone.abs().max()))


def _hf(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def try_varlen(loss_module, device, tol: float) -> Optional[float]:
    """Switch the model to variable-length attention when it reproduces the model's own attention on
    the probe (B packed after A under varlen == B alone under the current path); its error, or None
    (and the model left as it was) when it does not, or cannot run this model's attention."""
    from trainer.model.attention import SEGMENTS, VARLEN, plan, register

    register()
    model = loss_module.model
    hf = _hf(model)
    original = hf.config._attn_implementation
    _, b = _probe_ids(model, device)
    reference = _logits(model, b, torch.arange(len(b), device=device))
    try:
        hf.set_attn_implementation(VARLEN)
        error = leak(model, device, reference=reference, extra_fn=lambda positions: {SEGMENTS: plan(positions)})
    except Exception:  # the model's attention needs what varlen does not do (softcapping, a mask, ALiBi...)
        error = float("inf")
    if error <= tol:
        return error
    hf.set_attn_implementation(original)
    return None


def loss_gap(loss_module, device) -> float:
    """|our loss - the model's own forward(labels=...) loss|, relative, on one probe example."""
    _, b = _probe_ids(loss_module.model, device)
    labels = b.clone()[None]
    labels[0, 0] = -100
    positions = torch.arange(len(b), device=device)[None]
    total, count = loss_module(b[None], positions, labels)
    ours = float(total) / max(1, int(count))
    reference = float(loss_module.model(input_ids=b[None], labels=labels, use_cache=False).loss)
    return abs(ours - reference) / max(1.0, abs(reference))


def _measure(fn, *args, **kwargs) -> float:
    try:
        return fn(*args, **kwargs)
    except Exception:  # a path the model cannot take at all (an argument it refuses, a shape it cannot do)
        return float("inf")


@torch.no_grad()
def run(
    loss_module, requested_packing: Optional[bool], device: torch.device, varlen: bool = False, longest: Optional[int] = None
) -> PackingPlan:
    """Measure on the model and choose: packing path and loss path (see the module docstring).
    `varlen`: try variable-length attention first (trainer/model/attention.py), kept only where exact;
    `longest`: the longest example training may see (data.max_seq_length)."""
    from trainer.model.attention import sliding_window

    model = loss_module.model
    note = None
    window = sliding_window(_hf(model).config)
    if varlen and window is not None and (longest is None or window < longest):
        # Varlen has no window, and the probe's short examples fit in it: an example longer than the
        # window would fail mid-run. The model's own attention applies the window to packed rows.
        varlen, note = (
            False,
            (
                f"variable-length attention not used: the model's sliding window ({window}) is "
                f"shorter than the longest example (data.max_seq_length {longest})"
            ),
        )
    was_training = model.training
    model.eval()
    # The narrowest dtype the weights hold sets the tolerance; a LoRA run's bf16 base with fp32 adapters
    # computes under autocast to it, as training does.
    dtypes = {q.dtype for q in model.parameters() if q.is_floating_point()}
    dtype = next((t for t in (torch.bfloat16, torch.float16) if t in dtypes), torch.float32)
    tol = TOLERANCE.get(dtype, 1e-5)
    try:
        with torch.autocast(device.type, dtype=dtype, enabled=len(dtypes) > 1):
            gap = _measure(loss_gap, loss_module, device)
            full = gap > tol
            if full:
                loss_module.full_logits = True
                gap_full = _measure(loss_gap, loss_module, device)
                loss_module.full_logits = False
                if gap_full > tol:
                    raise UserError(
                        f"model: the loss computed from its logits differs from its own "
                        f"forward(labels=...) loss by {gap_full:.2g} (relative; tolerance {tol:g}); it "
                        "computes a loss this trainer does not reproduce (an auxiliary loss?). Fix: a causal "
                        "LM whose loss is next-token cross-entropy, or disable its extra loss terms in its "
                        "config"
                    )
            measured = None
            varlen_error = try_varlen(loss_module, device, tol) if varlen and requested_packing is not False else None
            if requested_packing is False:
                packing = PADDED
            elif varlen_error is not None:
                packing, measured = PACKED_VARLEN, varlen_error
            else:
                measured = _measure(leak, model, device)
                if measured <= tol:
                    packing = PACKED
                elif _measure(leak, model, device, with_sequence_index=True) <= tol:
                    packing = PACKED_SEQ_IDX
                elif requested_packing:
                    raise UserError(
                        f"data.packing: true, but on {type(model).__name__} packed examples attend to each "
                        f"other: an example's logits change by {measured:.2g} (relative) when packed after "
                        f"another (isolated: <= {tol:g}). Fix: data.packing: null (auto: pads per "
                        "micro-batch on this model) or false"
                    )
                else:
                    packing = PADDED
            return PackingPlan(packing, full, measured, gap, tol, note if requested_packing is not False else None)
    finally:
        model.train(was_training)


def describe(plan: PackingPlan, model_name: str) -> list[str]:
    """The log lines that say which path was taken and why."""
    if plan.packing == PACKED:
        pack = (
            f"packing: examples packed padding-free; probe: an example's logits alone and packed differ by "
            f"{plan.leak:.1e} <= {plan.tolerance:g}"
        )
    elif plan.packing == PACKED_VARLEN:
        pack = (
            f"packing: examples packed padding-free, variable-length attention (each example attends to itself: "
            f"Σ len² work, no dense mask); probe: an example's logits packed under it and alone under the "
            f"model's own attention differ by {plan.leak:.1e} <= {plan.tolerance:g}"
        )
    elif plan.packing == PACKED_SEQ_IDX:
        pack = (
            f"packing: examples packed with a sequence index (seq_idx, cu_seq_lens): plain packing leaks "
            f"({plan.leak:.2g}) on {model_name}, the indexed path is isolated"
        )
    elif plan.leak is None:
        pack = "packing: off (data.packing: false): one padded row per example"
    else:
        pack = (
            f"packing: padding per micro-batch instead: on {model_name} packed examples would attend to each "
            f"other (logits differ by {plan.leak:.2g} > {plan.tolerance:g})"
        )
    if plan.note:
        pack += f"; {plan.note}"
    loss = (
        f"loss: logits only at labelled positions, equal to the model's own loss (relative difference {plan.loss_gap:.1e})"
        if not plan.full_logits
        else f"loss: the model's full logits: projecting only labelled positions differs from its own loss by {plan.loss_gap:.2g}"
    )
    return [pack, loss]

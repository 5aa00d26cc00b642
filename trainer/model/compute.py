"""The compute dtype on a CPU, apart from the storage dtype: how fast this node multiplies in bf16
against fp32 (measured at start-up), and frozen bf16 weights computed in fp32 one layer at a time.

A bf16 weight costs half the memory of an fp32 one on any CPU; a bf16 matmul is fast only where the CPU
has the instructions (AMX, AVX512-BF16 through oneDNN). On AVX2-only CPUs (AMD EPYC Rome/Milan, older
Xeons) torch's bf16 matmul runs at ~1 GFLOP/s against ~100 for fp32. So the trainer measures both on the
node (the /proc/cpuinfo flags may be hidden by a VM or unused by a library) and, where bf16 is slower,
keeps the weights in bf16 and computes in fp32: each frozen layer's weight is widened for its matmul and
dropped after, never a whole fp32 copy; a chunk of it at a time, in cache.

Hand-written because no library does this for a frozen base: autocast on CPU only narrows (bf16/fp16),
and an fp32 weight made by `.float()` in the forward would be kept by autograd until the backward, one
widened copy per layer, the whole model in fp32. `widened_linear` keeps the bf16 weight instead and widens
it again in the backward (as bitsandbytes' and torchao's NF4 linears do for their 4-bit weights).
"""

from __future__ import annotations

import functools
import os
import time
import types
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, cast

import torch

from trainer import envvars
from trainer.model.memplan import WIDEN_CHUNK_BYTES

# bf16 counts as fast where it reaches half of fp32's rate: AMX and AVX512-BF16 nodes measure above fp32
# (bf16 also halves the activations' memory), AVX2-only ones ~1% of it.
FAST_RATIO = 0.5
_SHAPE = (64, 512, 512)  # m, k, n: ~0.4 ms in fp32 on 2 AVX2 cores, ~26 ms in bf16 there


@dataclass(frozen=True)
class MatmulRates:
    """GFLOP/s of one process's matmul in fp32 and in bf16 on this node, and where the figures come from."""

    fp32: float
    bf16: float
    source: str = "measured"

    @property
    def bf16_fast(self) -> bool:
        return self.bf16 >= FAST_RATIO * self.fp32

    def describe(self) -> str:
        if self.source != "measured":
            return f"this CPU: {'fast' if self.bf16_fast else 'slow'} bf16 matmuls, {self.source}"
        return f"this CPU: bf16 matmul {self.bf16:.3g} GFLOP/s a core, fp32 {self.fp32:.3g}"


def _rate(dtype: torch.dtype, budget_s: float) -> float:
    m, k, n = _SHAPE
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    a @ b  # first call: the kernel's set-up
    reps, start = 0, time.perf_counter()
    while True:
        a @ b
        reps += 1
        elapsed = time.perf_counter() - start
        if elapsed >= budget_s or reps >= 200:
            return 2 * m * k * n * reps / elapsed / 1e9


def measure(budget_s: float = 0.02) -> MatmulRates:
    """bf16 and fp32 matmul rates of one core of this node (tens of milliseconds), the best of three
    interleaved tries each. One thread: both kernels scale with the cores alike, and a multi-threaded
    fp32 matmul measured while another process holds the cores collapses at its thread barrier (seen:
    2 GFLOP/s against 90) where the bf16 one barely moves, which would read as fast bf16.
    LLM_FINETUNE_CPU_BF16=fast|slow states the answer instead (tests; an operator who knows the node)."""
    stated = os.environ.get(envvars.CPU_BF16, "").strip().lower()
    if stated in ("fast", "slow"):
        return MatmulRates(1.0, 2.0 if stated == "fast" else 0.01, f"as {envvars.CPU_BF16}={stated} states")
    if stated:
        raise ValueError(f"{envvars.CPU_BF16}={stated!r}: fast, slow or unset (measured)")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fp32, bf16 = 0.0, 0.0
        for _ in range(3):
            fp32 = max(fp32, _rate(torch.float32, budget_s / 3))
            bf16 = max(bf16, _rate(torch.bfloat16, budget_s / 3))
        return MatmulRates(fp32, bf16)
    finally:
        torch.set_num_threads(threads)


_measured: Optional[MatmulRates] = None


def rates() -> MatmulRates:
    """This process's measurement, made once (the environment override read each time)."""
    global _measured
    if os.environ.get(envvars.CPU_BF16):
        return measure()
    if _measured is None:
        _measured = measure()
    return _measured


# ---- frozen low-precision weights, computed in a wider dtype ---------------------------------------


def _rows(weight: torch.Tensor, transposed: bool, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
    """Output features start..stop of a narrow weight, widened: [stop - start, in] in `dtype`."""
    narrow = weight[:, start:stop].t() if transposed else weight[start:stop]
    return narrow.to(dtype)


def _step(weight: torch.Tensor, transposed: bool) -> int:
    """Output features widened at a time: a chunk of WIDEN_CHUNK_BYTES, which stays in the CPU's cache
    between its widening and its matmul (measured at the 7B shape on 2 AVX2 cores, 156 tokens: a whole
    widened [11008, 4096] runs at 70 GFLOP/s, 4-8 MiB chunks at 105-134, the fp32 weight itself at 115)."""
    inputs = weight.shape[0] if transposed else weight.shape[1]
    return max(1, WIDEN_CHUNK_BYTES // (4 * inputs))


class _WidenedLinear(torch.autograd.Function):
    """y = x @ W^T + b with W stored narrow (bf16) and frozen, computed in x's dtype: W is widened a
    chunk of output features at a time for its matmul; the backward keeps the narrow W (no wide copy
    outlives its chunk) and widens it again the same way for the input's gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], transposed: bool) -> torch.Tensor:
        outputs = weight.shape[1] if transposed else weight.shape[0]
        flat = x.reshape(-1, x.shape[-1])
        out = torch.empty(flat.shape[0], outputs, dtype=x.dtype, device=x.device)
        step = _step(weight, transposed)
        for start in range(0, outputs, step):
            stop = min(outputs, start + step)
            out[:, start:stop] = flat @ _rows(weight, transposed, start, stop, x.dtype).t()
        if bias is not None:
            out += bias.to(x.dtype)
        ctx.save_for_backward(weight)
        ctx.transposed = transposed
        return out.view(*x.shape[:-1], outputs)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        (weight,) = ctx.saved_tensors
        grad = grads[0]
        flat = grad.reshape(-1, grad.shape[-1])
        outputs = flat.shape[1]
        inputs = weight.shape[0] if ctx.transposed else weight.shape[1]
        grad_x = torch.zeros(flat.shape[0], inputs, dtype=grad.dtype, device=grad.device)
        step = _step(weight, ctx.transposed)
        for start in range(0, outputs, step):
            stop = min(outputs, start + step)
            grad_x.addmm_(flat[:, start:stop], _rows(weight, ctx.transposed, start, stop, grad.dtype))
        return grad_x.view(*grad.shape[:-1], inputs), None, None, None


def widened_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, transposed: bool = False
) -> torch.Tensor:
    return _WidenedLinear.apply(x, weight, bias, transposed)


def _linear_forward(transposed: bool) -> Callable[..., torch.Tensor]:
    def forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        weight = cast(torch.Tensor, self.weight)
        if weight.dtype == x.dtype or weight.requires_grad:  # a trainable copy (modules_to_save) in fp32
            return type(self).forward(self, x)
        return widened_linear(x, weight, cast(Optional[torch.Tensor], self.bias), transposed)

    return forward


def _cast_output(dtype: torch.dtype) -> Callable[..., Any]:
    def hook(module: torch.nn.Module, args: Any, output: Any) -> Any:
        return output.to(dtype) if isinstance(output, torch.Tensor) and output.is_floating_point() else output

    return hook


@dataclass
class Widened:
    """What `widen` did to a model: layers computed wide from narrow weights, small tensors made wide."""

    layers: int = 0
    embeddings: int = 0
    whole: int = 0  # parameters of other modules converted to the compute dtype (norms, biases)
    whole_modules: tuple[str, ...] = ()
    _undo: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def undo(self) -> None:
        """The model as it was (widening bf16 to fp32 is exact, so narrowing back is too)."""
        while self._undo:
            self._undo.pop()()

    def describe(self) -> str:
        text = f"{self.layers} linear layers widened one at a time, {self.embeddings} embeddings' outputs widened"
        if self.whole:
            text += (
                f", {self.whole / 1e6:.3g}M parameters of {', '.join(self.whole_modules)} held wide "
                "(no per-layer widening for them)"
            )
        return text


def _narrow(p: torch.Tensor, dtype: torch.dtype) -> None:
    p.data = p.data.to(dtype)


def widen(model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> Widened:
    """Compute `model` in `dtype` while its frozen weights stay in their narrower storage: linear layers
    (torch Linear, transformers' Conv1D) widen their weight per matmul; embeddings widen their output;
    any other module's narrow parameters (norms: a vector each) are converted once. Trainable narrow
    parameters are refused (pure bf16 training is not widened). Idempotent."""
    from transformers.pytorch_utils import Conv1D

    done = Widened()
    whole_types: set[str] = set()
    for module in model.modules():
        own = [
            p
            for p in module.parameters(recurse=False)
            if p.is_floating_point() and p.dtype != dtype and p.element_size() < torch.empty((), dtype=dtype).element_size()
        ]
        if not own or getattr(module, "_widened", False):
            continue
        if any(p.requires_grad for p in own):
            raise ValueError(
                f"{type(module).__name__} has trainable {own[0].dtype} weights: widening is for frozen "
                "ones (pure bf16 training computes in bf16)"
            )
        weight = getattr(module, "weight", None)
        # (A quantized layer's weight is not floating point: bitsandbytes dequantizes it for its matmul
        # into its compute dtype itself; only its bias, if narrow, is widened below.)
        if isinstance(module, (torch.nn.Linear, Conv1D)) and isinstance(weight, torch.Tensor) and weight.is_floating_point():
            # An instance attribute: PEFT wraps this module as its base_layer and calls it; a deep copy
            # (modules_to_save) rebinds the method to the copy.
            module.forward = types.MethodType(_linear_forward(isinstance(module, Conv1D)), module)  # type: ignore[method-assign]
            done._undo.append(functools.partial(delattr, module, "forward"))
            done.layers += 1
        elif isinstance(module, torch.nn.Embedding):
            done._undo.append(module.register_forward_hook(_cast_output(dtype)).remove)
            done.embeddings += 1
        else:
            for p in own:
                done._undo.append(functools.partial(_narrow, p, p.dtype))
                p.data = p.data.to(dtype)
                done.whole += p.numel()
            whole_types.add(type(module).__name__)
        module._widened = True  # type: ignore[assignment]
        done._undo.append(functools.partial(delattr, module, "_widened"))
    done.whole_modules = tuple(sorted(whole_types))
    return done


@contextmanager
def for_inference(model: torch.nn.Module) -> Iterator[str]:
    """A model measured or sampled on a CPU (evaluation, the quantize stage, the demo): weights held in
    bf16/fp16 are computed in fp32, layer by layer, where this CPU's bf16 matmul is slow, and the model
    is given back as it was (the quantize stage goes on to quantize it). Yields what was done, for the
    log and the report."""
    narrow = sorted(
        {str(p.dtype).replace("torch.", "") for p in model.parameters() if p.is_floating_point() and p.element_size() < 4}
    )
    measured = rates() if narrow and next(model.parameters()).device.type == "cpu" else None
    if measured is None or measured.bf16_fast:
        yield f"as stored ({', '.join(narrow) or 'fp32'}{f'; {measured.describe()}' if measured else ''})"
        return
    grads = [(p, p.requires_grad) for p in model.parameters()]
    model.requires_grad_(False)
    done = widen(model)
    try:
        yield f"{', '.join(narrow)} weights computed in fp32 ({measured.describe()}): {done.describe()}"
    finally:
        done.undo()
        for p, flag in grads:
            p.requires_grad_(flag)

"""Variable-length attention: each packed example attends to itself only, exactly as the model's own
attention computes it alone — logits and gradients."""

import numpy as np
import pytest
import torch

from tests.conftest import needs_gpus
from trainer.model.attention import SEGMENTS, VARLEN, plan, register, segments
from trainer.data import IGNORE, collate
from trainer.model.modeling import CausalLMLoss, load_model

CPU = torch.device("cpu")


def _examples(lengths, vocab=500, seed=0):
    g = np.random.default_rng(seed)
    out = []
    for n in lengths:
        ids = g.integers(4, vocab, n)
        labels = ids.copy()
        labels[: n // 3] = IGNORE
        out.append((ids, labels))
    return out


@pytest.fixture
def models(tiny_model, device):
    register()
    reference = load_model(str(tiny_model), torch.float32, "sdpa", device)  # GQA: 4 heads, 2 KV heads
    varlen = load_model(str(tiny_model), torch.float32, "sdpa", device)
    varlen.set_attn_implementation(VARLEN)
    return reference, varlen


def _collated(examples, device):
    tensors, _ = collate(examples, 3, packing=True)
    extra = {SEGMENTS: plan(tensors["position_ids"], device)}  # from the host tensor, as the trainer does
    return {k: v.to(device) for k, v in tensors.items()}, extra


@pytest.mark.parametrize("lengths", [[9, 14, 6, 14, 30], [12, 12, 12, 12], [40]],
                         ids=["mixed", "equal", "one"])
def test_packed_logits_equal_each_example_alone(models, lengths, device):
    reference, varlen = models
    examples = _examples(lengths)
    tensors, extra = _collated(examples, device)
    with torch.no_grad():
        packed = varlen(input_ids=tensors["input_ids"], position_ids=tensors["position_ids"], use_cache=False,
                        **extra).logits[0]
        start = 0
        for ids, _ in examples:
            alone = reference(input_ids=torch.from_numpy(ids)[None].to(device), use_cache=False).logits[0]
            assert torch.allclose(packed[start:start + len(ids)], alone, atol=1e-5)
            start += len(ids)
    assert segments(tensors["position_ids"].cpu()) == [0] + list(np.cumsum(lengths))
    assert list(extra[SEGMENTS].cu_seqlens.cpu()) == [0] + list(np.cumsum(lengths))


def test_gradients_equal_the_per_example_computation(models, device):
    reference, varlen = models
    examples = _examples([9, 14, 6, 14, 30])
    tensors, extra = _collated(examples, device)
    loss, _ = CausalLMLoss(varlen)(tensors["input_ids"], tensors["position_ids"], tensors["labels"], **extra)
    loss.backward()
    total = 0.0
    for ids, labels in examples:
        part, _ = CausalLMLoss(reference)(torch.from_numpy(ids)[None].to(device),
                                          torch.arange(len(ids), device=device)[None],
                                          torch.from_numpy(labels)[None].to(device))
        part.backward()
        total += float(part.detach())
    assert abs(float(loss) - total) <= 1e-4 * abs(total)
    for (name, a), (_, b) in zip(varlen.named_parameters(), reference.named_parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6, rtol=1e-4), name


def test_under_bf16_autocast_it_matches_the_models_attention(models, device):
    reference, varlen = models
    examples = _examples([10, 25, 10])
    tensors, extra = _collated(examples, device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        packed = varlen(input_ids=tensors["input_ids"], position_ids=tensors["position_ids"], use_cache=False,
                        **extra).logits[0].float()
        alone = reference(input_ids=torch.from_numpy(examples[1][0])[None].to(device),
                          use_cache=False).logits[0].float()
    assert torch.allclose(packed[10:35], alone, atol=5e-2)


def test_the_forward_makes_no_host_copy_or_sync_in_attention(models, monkeypatch):
    """The boundaries are planned once per micro-batch: inside the attention of every layer nothing
    builds a tensor from host data (a blocking host-to-device copy on CUDA) or reads a tensor back to
    the host (a synchronisation). Counted by patching what would do either."""
    import trainer.model.attention as attention

    _, varlen = models
    tensors, extra = _collated(_examples([9, 14, 6, 14, 30, 9]), CPU)
    varlen.to(CPU)
    calls: list[str] = []
    inside = []

    def counting(name, original):
        def wrapper(*args, **kwargs):
            if inside:
                calls.append(name)
            return original(*args, **kwargs)
        return wrapper

    for name in ("tolist", "item", "__bool__", "nonzero", "cpu", "numpy", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch, "tensor", counting("torch.tensor", torch.tensor))
    monkeypatch.setattr(torch, "as_tensor", counting("torch.as_tensor", torch.as_tensor))
    layers = []
    original = attention.varlen_attention

    def watched(*args, **kwargs):
        inside.append(1)
        try:
            layers.append(1)
            return original(*args, **kwargs)
        finally:
            inside.pop()

    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN, watched)
    try:
        with torch.no_grad():
            varlen(input_ids=tensors["input_ids"], position_ids=tensors["position_ids"], use_cache=False, **extra)
    finally:
        register()
    assert len(layers) == varlen.config.num_hidden_layers  # the path ran in every layer
    assert calls == []


def test_what_it_cannot_do_is_refused_not_approximated(models):
    from trainer.model.attention import varlen_attention

    q = torch.zeros(1, 4, 10, 8)
    with pytest.raises(NotImplementedError, match="softcapping"):
        varlen_attention(None, q, q, q, None, softcap=5.0)
    with pytest.raises(NotImplementedError, match="sliding window"):
        varlen_attention(None, q, q, q, None, sliding_window=4, **{SEGMENTS: [0, 10]})
    with pytest.raises(NotImplementedError, match="not a mask"):
        varlen_attention(None, q, q, q, torch.ones(1, 1, 10, 10, dtype=torch.bool))


def test_a_sliding_window_shorter_than_the_longest_example_keeps_the_models_own_attention(tmp_path, tokenizer):
    """The probe's examples fit in a 16-token window, so varlen (which has no window) passes the probe;
    training's longer examples would not. The window decides, not the probe."""
    from tests import zoo
    from trainer.model import probes
    from trainer.model.attention import sliding_window

    path = zoo.write("mistral-sliding-window", tmp_path / "m", tokenizer)
    model = load_model(str(path), torch.float32, "auto", CPU)
    assert sliding_window(model.config) == 16
    plan = probes.run(CausalLMLoss(model), None, CPU, varlen=True, longest=512)
    assert plan.packing == probes.PACKED and "sliding window (16)" in probes.describe(plan, "Mistral")[0]
    assert model.config._attn_implementation != VARLEN
    # An example longer than the window, packed: equal to it alone under the model's own windowed attention.
    examples = _examples([40, 30], vocab=model.config.vocab_size)
    tensors, _ = collate(examples, 3, packing=True)
    with torch.no_grad():
        packed = model(input_ids=tensors["input_ids"], position_ids=tensors["position_ids"], use_cache=False).logits[0]
        alone = model(input_ids=torch.from_numpy(examples[1][0])[None], use_cache=False).logits[0]
    assert torch.allclose(packed[40:], alone, atol=1e-5)
    # Where every example fits in the window, varlen is exact and taken.
    plan = probes.run(CausalLMLoss(model), None, CPU, varlen=True, longest=16)
    assert plan.packing == probes.PACKED_VARLEN and plan.note is None


@pytest.mark.parametrize("config, window", [
    ({"model_type": "llama"}, None),
    ({"model_type": "mistral", "sliding_window": 4096}, 4096),
    ({"model_type": "qwen2", "sliding_window": 4096, "use_sliding_window": False}, None),
    ({"model_type": "gemma3_text", "sliding_window": 512}, 512),
])
def test_sliding_window_reads_the_config(config, window):
    from transformers import AutoConfig

    from trainer.model.attention import sliding_window

    kind = config.pop("model_type")
    assert sliding_window(AutoConfig.for_model(kind, **config)) == window


@needs_gpus(1)
def test_on_cuda_the_varlen_kernel_equals_the_grouped_sdpa_path(monkeypatch):
    """torch's varlen flash kernel (CUDA, half precision) against the grouped SDPA path, same boundaries."""
    import trainer.model.attention as attention

    cuda = torch.device("cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    lengths = [9, 14, 6, 14, 30]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    q = torch.randn(1, 8, sum(lengths), 64, device=cuda, dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(1, 2, sum(lengths), 64, device=cuda, dtype=torch.bfloat16, generator=g) for _ in range(2))
    seg = plan(positions, cuda)
    assert attention.kernel(q, 0.0) == "varlen_attn"
    fast, _ = attention.varlen_attention(None, q, k, v, None, **{SEGMENTS: seg})
    monkeypatch.setattr(attention, "kernel", lambda query, dropout: "sdpa")
    slow, _ = attention.varlen_attention(None, q, k, v, None, **{SEGMENTS: seg})
    assert fast.shape == slow.shape == (1, sum(lengths), 8, 64)
    assert torch.allclose(fast.float(), slow.float(), atol=2e-2)

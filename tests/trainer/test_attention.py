"""Variable-length attention: each packed example attends to itself only, exactly as the model's own
attention computes it alone — logits and gradients."""

import numpy as np
import pytest
import torch

from trainer.attention import SEGMENTS, VARLEN, register, segments
from trainer.data import IGNORE, collate
from trainer.modeling import CausalLMLoss, load_model

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
def models(tiny_model):
    register()
    reference = load_model(str(tiny_model), torch.float32, "sdpa", CPU)  # GQA: 4 heads, 2 KV heads
    varlen = load_model(str(tiny_model), torch.float32, "sdpa", CPU)
    varlen.set_attn_implementation(VARLEN)
    return reference, varlen


@pytest.mark.parametrize("lengths", [[9, 14, 6, 14, 30], [12, 12, 12, 12], [40]],
                         ids=["mixed", "equal", "one"])
def test_packed_logits_equal_each_example_alone(models, lengths):
    reference, varlen = models
    examples = _examples(lengths)
    tensors, _ = collate(examples, 3, packing=True)
    with torch.no_grad():
        packed = varlen(input_ids=tensors["input_ids"], position_ids=tensors["position_ids"], use_cache=False,
                        **{SEGMENTS: segments(tensors["position_ids"])}).logits[0]
        start = 0
        for ids, _ in examples:
            alone = reference(input_ids=torch.from_numpy(ids)[None], use_cache=False).logits[0]
            assert torch.allclose(packed[start:start + len(ids)], alone, atol=1e-5)
            start += len(ids)
    assert segments(tensors["position_ids"]) == [0] + list(np.cumsum(lengths))


def test_gradients_equal_the_per_example_computation(models):
    reference, varlen = models
    examples = _examples([9, 14, 6, 14, 30])
    tensors, _ = collate(examples, 3, packing=True)
    loss, _ = CausalLMLoss(varlen)(tensors["input_ids"], tensors["position_ids"], tensors["labels"],
                                   **{SEGMENTS: segments(tensors["position_ids"])})
    loss.backward()
    total = 0.0
    for ids, labels in examples:
        part, _ = CausalLMLoss(reference)(torch.from_numpy(ids)[None], torch.arange(len(ids))[None],
                                          torch.from_numpy(labels)[None])
        part.backward()
        total += float(part)
    assert abs(float(loss) - total) <= 1e-4 * abs(total)
    for (name, a), (_, b) in zip(varlen.named_parameters(), reference.named_parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6, rtol=1e-4), name


def test_under_bf16_autocast_it_matches_the_models_attention(models):
    reference, varlen = models
    examples = _examples([10, 25, 10])
    tensors, _ = collate(examples, 3, packing=True)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        packed = varlen(input_ids=tensors["input_ids"], position_ids=tensors["position_ids"], use_cache=False,
                        **{SEGMENTS: segments(tensors["position_ids"])}).logits[0].float()
        alone = reference(input_ids=torch.from_numpy(examples[1][0])[None], use_cache=False).logits[0].float()
    assert torch.allclose(packed[10:35], alone, atol=5e-2)


def test_what_it_cannot_do_is_refused_not_approximated(models):
    from trainer.attention import varlen_attention

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
    from trainer import probes
    from trainer.attention import sliding_window

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

    from trainer.attention import sliding_window

    kind = config.pop("model_type")
    assert sliding_window(AutoConfig.for_model(kind, **config)) == window

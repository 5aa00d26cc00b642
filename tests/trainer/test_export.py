"""Quantized models in the formats serving engines load (quantize.format), on three architectures:
Llama, Qwen2, and Phi-3 (fused qkv_proj / gate_up_proj, a non-Llama layout). Each format is written,
then loaded by its own engine's loader, the way a user would — plain transformers `from_pretrained`,
llama.cpp (llama-cpp-python) for GGUF — and checked there: at 8 bits the same greedy tokens as the
fine-tuned model, at 4 bits validation perplexity within 10% of it (the bound this product states).
The models carry a Llama-2-style SentencePiece tokenizer: llama.cpp's converter refuses byte-level
BPE tokenizers whose pre-tokenizer it does not know."""

import importlib.util
import json

import pytest
import torch

from tests import zoo
from tests.conftest import write_config
from trainer.config import load_config
from trainer.errors import UserError
from trainer.dev.tiny import corpus, sentencepiece_tokenizer

ARCHS = {"llama": "llama", "qwen2": "qwen2", "phi3": "phi3-fused-qkv"}
FOUR_BIT_BOUND = 1.10  # perplexity after / before, 4 bits
HAS_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_llama_cpp = pytest.mark.skipif(not HAS_LLAMA_CPP, reason="llama-cpp-python is not installed (make setup builds it)")


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, flashcards_records, flashcards_file):
    """arch -> (run directory holding final/, data file): a short fine-tune of a tiny model with 256-wide
    layers (GGUF's k-quants work in blocks of 256)."""
    from trainer.train import finetune

    root = tmp_path_factory.mktemp("export")
    made = {}

    def make(arch):
        if arch not in made:
            base = root / arch / "base"
            tok = sentencepiece_tokenizer(corpus(flashcards_records), base)
            cls, shapes, _ = zoo.ARCHITECTURES[ARCHS[arch]]
            config = cls(**dict(shapes, hidden_size=256, intermediate_size=512), vocab_size=len(tok),
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=None,
                         tie_word_embeddings=False)
            torch.manual_seed(0)
            from transformers import AutoModelForCausalLM

            AutoModelForCausalLM.from_config(config).save_pretrained(str(base))
            out = root / arch / "out"
            finetune(load_config(write_config(root / arch / "train.yaml", base, flashcards_file, out,
                                              training={"max_steps": 60, "learning_rate": 0.003, "save_steps": 1000})))
            assert (out / "final" / "tokenizer.model").exists()  # carried over for llama.cpp's converter
            made[arch] = out
        return made[arch]

    return make


def _quantize(tmp_path, out, data, **quantize):
    from trainer.post import quantize as q

    cfg = load_config(write_config(tmp_path / "q.yaml", out / "final", data, out,
                                   quantize={"enabled": True, "eval_samples": 12, "sample_prompts": 1,
                                             "max_new_tokens": 6, "calibration_samples": 16, "group_size": 32,
                                             **quantize}))
    return q.run(cfg), cfg


def _greedy_hf(path, prompt_ids, n=8):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(prompt_ids):].tolist()


def _greedy_llama_cpp(path, prompt_ids, n=8):
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=256, verbose=False, seed=0)
    tokens = []
    for token in llm.generate(prompt_ids, top_k=1, temp=0.0, reset=True):
        tokens.append(token)
        if len(tokens) == n:
            break
    return tokens


def _prompt(out):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out / "final"))
    return tok("### Instruction:\nWhat does insulin do?\n\n### Response:\n").input_ids


CASES = [("llama", "compressed-tensors", 8), ("llama", "compressed-tensors", 4), ("llama", "auto-round", 4),
         ("qwen2", "compressed-tensors", 8), ("qwen2", "auto-round", 4),
         ("phi3", "compressed-tensors", 8), ("phi3", "auto-round", 4)]


@pytest.mark.parametrize("arch,fmt,bits", CASES, ids=[f"{a}-{f}-{b}" for a, f, b in CASES])
def test_hugging_face_formats_load_with_plain_from_pretrained(tmp_path, finetuned, flashcards_file, arch, fmt, bits):
    out = finetuned(arch)
    section, _ = _quantize(tmp_path, out, flashcards_file, format=fmt, bits=bits)
    quantized = out / "quantized"
    config = json.loads((quantized / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == {"compressed-tensors": "compressed-tensors", "auto-round": "auto-round"}[fmt]
    assert section["format"] == fmt and section["engine"] == "transformers"
    assert section["size_bytes_after"] < section["size_bytes_before"]
    prompt = _prompt(out)
    served = _greedy_hf(quantized, prompt)  # plain transformers: what a user (and vLLM's loader) reads
    if bits == 8:
        assert served == _greedy_hf(out / "final", prompt)
        assert section["perplexity_after"] == pytest.approx(section["perplexity_before"], rel=0.01)
    else:
        assert section["perplexity_after"] <= section["perplexity_before"] * FOUR_BIT_BOUND
    assert "vllm serve" in section["serve"]["vllm"]


GGUF = [("llama", "gguf:q8_0", 8), ("llama", "gguf:q4_k_m", 4), ("phi3", "gguf:q8_0", 8), ("phi3", "gguf:q4_k_m", 4)]


def test_autoround_tunes_on_training_examples_and_the_result_is_served(tmp_path, finetuned, flashcards_file):
    """algorithm autoround: sign-gradient tuning steps per decoder block on calibration blocks cut from
    training examples (no dataset download: the offline test environment would fail one)."""
    out = finetuned("llama")
    section, _ = _quantize(tmp_path, out, flashcards_file, algorithm="autoround", iters=4, bits=4)
    assert section["algorithm"] == "autoround" and section["iters"] == 4 and section["calibration_samples"] == 16
    assert section["perplexity_after"] <= section["perplexity_before"] * FOUR_BIT_BOUND
    assert len(_greedy_hf(out / "quantized", _prompt(out))) == 8


@needs_llama_cpp
@pytest.mark.parametrize("arch,fmt,bits", GGUF, ids=[f"{a}-{f}" for a, f, _ in GGUF])
def test_gguf_runs_in_llama_cpp_and_is_measured_there(tmp_path, finetuned, flashcards_file, monkeypatch,
                                                       arch, fmt, bits):
    import llama_cpp

    opened = []
    real = llama_cpp.Llama

    def counting(*args, **kwargs):
        opened.append(kwargs.get("model_path"))
        return real(*args, **kwargs)

    monkeypatch.setattr(llama_cpp, "Llama", counting)
    out = finetuned(arch)
    section, _ = _quantize(tmp_path, out, flashcards_file, format=fmt, bits=bits)
    kind = fmt.split(":")[1]
    gguf = out / "quantized" / f"model-{kind}.gguf"
    assert gguf.exists() and (out / "quantized" / "Modelfile").read_text() == f"FROM ./model-{kind}.gguf\n"
    assert opened and all(p.endswith(f"model-{kind}.gguf") for p in opened)  # the figures came from llama.cpp
    assert section["engine"] == "llama.cpp" and section["size_bytes_after"] == gguf.stat().st_size
    assert "ollama create" in section["serve"]["ollama"] and f"-m model-{kind}.gguf" in section["serve"]["llama-cli"]
    prompt = _prompt(out)
    if bits == 8:
        assert _greedy_llama_cpp(gguf, prompt) == _greedy_hf(out / "final", prompt)
        assert section["perplexity_after"] == pytest.approx(section["perplexity_before"], rel=0.01)
    else:
        assert section["perplexity_after"] <= section["perplexity_before"] * FOUR_BIT_BOUND


def test_gguf_of_a_model_the_pinned_converter_lacks_is_refused_before_training(tmp_path, finetuned,
                                                                                flashcards_file):
    """AutoRound's bundled llama.cpp conversion cannot load its Qwen2 module against gguf 0.19 (a newer
    architecture constant is missing): refused at start-up with the fix, before any training."""
    from trainer.train import finetune

    base = finetuned("qwen2") / "final"
    out = tmp_path / "out"
    cfg = load_config(write_config(tmp_path / "c.yaml", base, flashcards_file, out,
                                   quantize={"enabled": True, "format": "gguf:q8_0", "bits": 8}))
    with pytest.raises(UserError, match="quantize.format gguf:q8_0: llama.cpp's converter .* Fix: quantize.format: "
                                        "compressed-tensors"):
        finetune(cfg)
    assert not (out / "checkpoints").exists()


@pytest.mark.parametrize("quantize,words", [
    ({"algorithm": "gptq"}, "compressed-tensors cannot hold a GPTQ result"),
    ({"algorithm": "autoround", "format": "inc"}, "autoround writes compressed-tensors"),
    ({"format": "gguf:q8_0", "bits": 4}, "gguf:q8_0 stores 8-bit weights"),
    ({"format": "ggml"}, "unsupported format 'ggml'"),
])
def test_format_and_algorithm_must_agree(tmp_path, tiny_model, flashcards_file, quantize, words):
    from trainer.config import ConfigError

    with pytest.raises(ConfigError, match=words):
        load_config(write_config(tmp_path / "c.yaml", tiny_model, flashcards_file, tmp_path / "out",
                                 quantize={"enabled": True, **quantize}))

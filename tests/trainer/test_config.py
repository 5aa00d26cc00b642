import subprocess
import sys

import pytest

from trainer.config import ConfigError, TrainerConfig, apply_overrides, load_config, load_config_text

MIN = "model: {name_or_path: m}\ndata: {file: d.json}\n"


def test_minimal_config_gets_documented_defaults():
    cfg = load_config_text(MIN)
    assert cfg.training.learning_rate == 2e-4 and cfg.data.packing is None and cfg.lora.enabled is True
    assert cfg.quantize.bits == 4 and cfg.quantize.algorithm == "rtn"
    assert str(cfg.final_dir).endswith("output/final")


def test_roundtrip_through_yaml():
    cfg = load_config_text(MIN + "training: {max_steps: 5}\nlora: {target_modules: [q_proj, k_proj]}\n")
    again = load_config_text(cfg.to_yaml())
    assert again == cfg


def test_unknown_key_names_nearest_valid_and_line(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(MIN + "training:\n  max_steps: 5\n  learnig_rate: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(f)
    msg = str(err.value)
    assert f"{f}:5:" in msg and "training.learnig_rate" in msg and "did you mean 'learning_rate'" in msg


@pytest.mark.parametrize("text,words", [
    (MIN + "training: {use_ipex: true}\n", "training.use_ipex: Intel Extension for PyTorch is discontinued"),
    (MIN + "training: {ddp_backend: ccl}\n", "training.ddp_backend: the oneCCL bindings are discontinued"),
    (MIN + "model: {name_or_path: m, compute_dtype: fp16}\n", "compute_dtype: invalid value 'fp16'"),
    ("model: {name_or_path: m}\ndata: {}\n", "neither is set"),
    ("model: {name_or_path: m}\ndata: {file: a.json, dataset: b}\n", "both are set"),
    ("model: {}\ndata: {file: a.json}\n", "name_or_path: is required"),
    (MIN + "training: {per_device_train_batch_size: 0}\n", "per_device_train_batch_size: must be >= 1"),
    (MIN + "training: {max_steps: ten}\n", "must be an integer"),
    (MIN + "data2: {}\n", "did you mean 'data'"),
    (MIN + "quantize: {bits: 2}\n", "unsupported bits 2"),
    (MIN + "quantize: {algorithm: hqq}\n", "unsupported algorithm 'hqq'"),
    ("model: {name_or_path: m}\ndata: {file: d.xlsx}\n", "unsupported file type 'd.xlsx'"),
    ("model: {name_or_path: m}\ndata: {file: d.jsonl, validation_split: test}\n",
     "data.validation_split: names a split of a hub dataset, but data is a file. Fix: data.validation_file"),
    ("model: {name_or_path: m}\ndata: {file: d.jsonl, format: chatml}\n", "invalid value 'chatml'"),
    ("model: {name_or_path: m}\ndata: {file: d.parquet.gz}\n", "unsupported file type 'd.parquet.gz'"),
    (MIN + "model: [\n", "not valid YAML"),
    (MIN + "data: {file: d.json, template: alpacca}\n", "did you mean 'alpaca'"),
    (MIN + "data: {file: d.json, prompt_no_input: 'no placeholder'}\n", "must contain {instruction}"),
])
def test_bad_values(text, words):
    with pytest.raises(ConfigError, match=None) as err:
        load_config_text(text)
    assert words in str(err.value)


def test_set_overrides_parse_yaml_values():
    raw = apply_overrides({"training": {"max_steps": 5}}, ["training.max_steps=9", "lora.enabled=false",
                                                            "lora.target_modules=[q_proj, o_proj]"])
    assert raw == {"training": {"max_steps": 9}, "lora": {"enabled": False, "target_modules": ["q_proj", "o_proj"]}}
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides({}, ["nonsense"])


def test_learning_rate_in_exponent_form():
    assert load_config_text(MIN + "training: {learning_rate: 1e-4}\n").training.learning_rate == 1e-4


def test_config_module_imports_nothing_heavy():
    code = ("import sys, trainer.config as c; c.load_config_text('model: {name_or_path: m}\\ndata: {file: d.json}');"
            "heavy = [m for m in ('torch', 'transformers', 'datasets', 'peft') if m in sys.modules];"
            "print(heavy); sys.exit(1 if heavy else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_key_is_documented_in_the_dataclasses():
    cfg = TrainerConfig.from_dict({"model": {"name_or_path": "m"}, "data": {"file": "x.json"}})
    assert set(cfg.to_dict()) == {"model", "data", "training", "lora", "quantize", "tracking", "output_dir"}

"""Every architecture of tests/zoo.py, full and LoRA, under real torchrun with 2 processes over gloo:
the probe's packing decision, the model's own loss, and a final/ that loads and generates."""

import re

import pytest

from tests import zoo
from tests.conftest import write_config
from tests.integration.procs import start, stop, torchrun, wait


@pytest.fixture(scope="module")
def zoo_run(tmp_path_factory, tokenizer, flashcards_records):
    from trainer.dev.tiny import write_json

    root = tmp_path_factory.mktemp("zoo-run")
    data = write_json(root / "cards.json", flashcards_records[:80])
    configs = {}
    for name in zoo.ARCHITECTURES:
        model = zoo.write(name, root / "models" / name, tokenizer)
        for mode in ("full", "lora"):
            out = root / f"{name}-{mode}"
            configs[(name, mode)] = write_config(
                root / f"{name}-{mode}.yaml", model, data, out,
                data={"max_seq_length": 256, "validation_fraction": 0.1},
                training={"max_steps": 3, "per_device_train_batch_size": 2, "logging_steps": 1, "save_steps": 3,
                          "learning_rate": 0.003},
                lora={"enabled": mode == "lora", "r": 4})
    log = root / "run.log"
    proc = start(torchrun(2, "-m", "tests.integration.zoo_driver", *map(str, configs.values())), log)
    try:
        code = wait(proc, 600, log)
    finally:
        stop(proc)
    text = log.read_text()
    assert code == 0, text[-6000:]
    sections = {}
    for chunk in text.split("=== ")[1:]:
        path = chunk.split("\n", 1)[0].strip()
        sections[path] = chunk
    return configs, sections


@pytest.mark.parametrize("name", list(zoo.ARCHITECTURES))
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_architecture_trains_under_torchrun(zoo_run, name, mode):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.config import load_config

    configs, sections = zoo_run
    cfg = load_config(configs[(name, mode)])
    log = sections[str(configs[(name, mode)])]
    assert "world 2 (backend gloo" in log
    if zoo.expected(name) == zoo.VARLEN:
        assert "packing: examples packed padding-free, variable-length attention" in log, log[-3000:]
    elif zoo.expected(name) == zoo.PACKED:
        assert "packing: examples packed padding-free; probe" in log, log[-3000:]
    else:
        assert re.search(r"packing: padding per micro-batch instead: on \w+ packed examples would attend", log), log
    assert "equal to the model's own loss" in log
    assert ("LoRA r=4 on " in log) == (mode == "lora")
    assert "eval_loss" in log and "done: 3 steps" in log
    model = AutoModelForCausalLM.from_pretrained(str(cfg.final_dir))
    tok = AutoTokenizer.from_pretrained(str(cfg.final_dir))
    ids = tok("What is the main effect of insulin", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False).shape[1] == ids.shape[1] + 2
    assert (cfg.adapter_dir).exists() == (mode == "lora")

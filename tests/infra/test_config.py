"""One test per bad-input rule: each refused with the key named, before anything is declared."""

import pytest

from infra.config import StackConfigError, parse, stack_file_lines
from tests.infra.harness import Recorder, render

DS = {"dataset": {"name": "org/data"}, "storage": {"className": "nfs-rwx"}}


def cfg(**overrides):
    raw = {**DS}
    raw.update(overrides)
    return raw


BAD = [
    # (stack config, key the message must name, words the message must contain)
    (cfg(workers=0), "workers", ">= 1"),
    (cfg(workers="two"), "workers", "integer"),
    (cfg(workers=2.5), "workers", "integer"),
    (cfg(workers=4, minWorkers=5), "minWorkers", "minWorkers <= workers <= maxWorkers"),
    (cfg(workers=4, maxWorkers=3), "maxWorkers", "minWorkers <= workers <= maxWorkers"),
    (cfg(workers=4, maxWorkers=6), "maxWorkers", "would never add a pod"),
    (cfg(storage={"accessMode": "ReadWriteMany"}), "storage.className", "would never bind"),
    (cfg(storage={"className": "x", "adopt": "steal"}), "storage.adopt", "upsert, import, none"),
    (cfg(terminationGracePeriodSeconds=5), "terminationGracePeriodSeconds", ">= 30"),
    (cfg(rendezvous="zookeeper"), "rendezvous", "etcd, c10d"),
    (cfg(resources={"memory": "16 GB"}), "resources.memory", "not a Kubernetes quantity"),
    (cfg(resources={"cpu": "four"}), "resources.cpu", "not a Kubernetes quantity"),
    (cfg(jobName="Llama_2"), "jobName", "DNS-1035"),
    (cfg(jobName="2llama"), "jobName", "DNS-1035"),
    (cfg(jobName="a" * 41), "jobName", "at most 40"),
    (cfg(dataset={"name": "org/data", "file": "x.json"}), "dataset", "both are set"),
    (cfg(dataset={}), "dataset", "neither is set"),
    (cfg(storage={"accessMode": "ReadWriteOnce"}), "storage.accessMode", "ReadWriteMany"),
    (cfg(etcdReplicas=2), "etcdReplicas", "1 or 3"),
    (cfg(etcdImage="quay.io/coreos/etcd:v3.6.0"), "etcdImage", "3.5.x"),
    (cfg(etcdImage="quay.io/coreos/etcd:latest"), "etcdImage", "3.5.x"),
    (cfg(image="ghcr.io/me/trainer:latest"), "image", "not pinned"),
    (cfg(image="ghcr.io/me/trainer"), "image", "not pinned"),
    (cfg(training={"max_stepz": 10}), "training", "did you mean 'max_steps'"),
    (cfg(training={"learning_rate": -1}), "training", "learning_rate: must be > 0"),
    (cfg(lora={"r": 0}), "lora", "lora.r"),
    (cfg(quantize={"bits": 3}), "quantize", "use 4 or 8"),
    (cfg(quantize={"algorithm": "smoothquant"}), "quantize", "rtn, gptq, awq"),
    (cfg(dataset={"name": "org/data", "template": "vicuna"}), "dataset", "alpaca, chat, text"),
    (cfg(wokers=2), "wokers", "did you mean 'workers'"),
    (cfg(resources={"memroy": "1Gi"}), "resources.memroy", "did you mean 'memory'"),
    (cfg(storage={"createClass": True}), "storage.className", "required"),
    (cfg(extraEnv={"HF_TOKEN": "hf_x"}), "extraEnv", "--secret hfToken"),
    (cfg(resources={"gpus": 1}, procsPerWorker=2), "procsPerWorker", "one process per GPU"),
    (cfg(training={"ddp_backend": "nccl"}), "training", "needs GPUs"),
    (cfg(namespace="Team_A"), "namespace", "DNS-1123"),
    (cfg(runPolicy={"cleanPodPolicy": "Sometimes"}), "runPolicy.cleanPodPolicy", "None, Running, All"),
]


@pytest.mark.parametrize("raw,key,words", BAD, ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD)])
def test_bad_value_is_refused_with_key_and_fix(raw, key, words):
    with pytest.raises(StackConfigError) as err:
        parse(raw)
    message = str(err.value)
    assert f"'llm-finetune:{key}'" in message, message
    assert words in message, message


def test_plain_text_token_is_refused():
    with pytest.raises(StackConfigError, match="--secret hfToken"):
        parse({**DS, "hfToken": "hf_plain"}, token_is_secret=False)


def test_error_names_stack_file_and_line(tmp_path):
    (tmp_path / "Pulumi.acme.yaml").write_text(
        "config:\n  llm-finetune:model: m\n  llm-finetune:workers: 2\n"
        "  llm-finetune:resources:\n    cpu: '4'\n    memory: 16 GB\n")
    source, lines = stack_file_lines("acme", tmp_path)
    raw = {"model": "m", "workers": 2, "resources": {"cpu": "4", "memory": "16 GB"}, **DS}
    with pytest.raises(StackConfigError) as err:
        parse(raw, source=source, lines=lines)
    assert "Pulumi.acme.yaml line 6" in str(err.value)


def test_bad_config_declares_nothing(monkeypatch):
    """The program stops in config parsing: no resource reaches the engine."""
    seen = []
    original = Recorder.new_resource

    def spy(self, args):
        seen.append(args.typ)
        return original(self, args)

    monkeypatch.setattr(Recorder, "new_resource", spy)
    with pytest.raises(StackConfigError):
        render({**DS, "workers": 0})
    assert seen == []


def test_string_numbers_from_config_set_path_are_decoded():
    # `pulumi config set --path training.max_steps 20` stores the string "20".
    parsed = parse({**DS, "training": {"max_steps": "20", "learning_rate": "1e-4"}, "workers": "3"})
    assert parsed.trainer.training.max_steps == 20
    assert parsed.trainer.training.learning_rate == pytest.approx(1e-4)
    assert parsed.workers == 3


def test_defaults_come_from_pulumi_yaml():
    parsed = parse(DS)
    assert (parsed.workers, parsed.rendezvous, parsed.storage.access_mode) == (2, "etcd", "ReadWriteMany")
    assert parsed.storage.retain_on_destroy is True
    assert parsed.min_workers == parsed.max_workers == parsed.workers


def test_dataset_keys_in_camel_or_snake_case():
    parsed = parse({**DS, "dataset": {"name": "org/data", "maxSeqLength": 256, "train_on_prompt": True}})
    assert parsed.trainer.data.max_seq_length == 256 and parsed.trainer.data.train_on_prompt is True


def test_relative_dataset_file_lives_on_volume_and_waits_for_upload():
    parsed = parse({**DS, "dataset": {"file": "finance-alpaca.json", "template": "chat",
                                      "validationFile": "finance-val.jsonl.gz", "skipInvalid": True}})
    assert parsed.trainer.data.file == "/data/finance-alpaca.json"
    assert parsed.trainer.data.validation_file == "/data/finance-val.jsonl.gz"
    assert parsed.trainer.data.skip_invalid is True
    assert parsed.trainer.data.file_wait_seconds == 1800

"""Every stack file, and variations of it, renders into objects a real cluster would accept."""

import json
from pathlib import Path

import pytest

from tests.infra.harness import (ROOT, assert_pod_security, pod_specs, render, stack_config, validate_all,
                                 validate_pytorchjob)

STACK_FILES = sorted(ROOT.glob("Pulumi.*.yaml"))
TOKEN = "hf_TestTokenThatMustNotLeak0123456789"


def test_the_three_stack_files_exist():
    assert {p.name for p in STACK_FILES} >= {"Pulumi.dev.yaml", "Pulumi.medical-meadow.yaml",
                                             "Pulumi.financial-chatbot.yaml"}


@pytest.mark.parametrize("stack_file", STACK_FILES, ids=lambda p: p.name)
def test_stack_file_renders_valid_and_restricted(stack_file: Path):
    raw = stack_config(stack_file)
    assert "hfToken" not in raw, "no secret is committed"
    raw["hfToken"] = TOKEN  # as after `pulumi config set --secret hfToken ...`
    rendered = render(raw, stack=stack_file.stem.split(".", 1)[1])
    validate_all(rendered)
    for where, spec in pod_specs(rendered).items():
        assert_pod_security(spec, where)
    kinds = sorted(r.kind for r in rendered.resources)
    assert "PyTorchJob" in kinds and "PersistentVolumeClaim" in kinds and "Secret" in kinds
    assert ("StatefulSet" in kinds) == (raw.get("rendezvous", "etcd") == "etcd")


def test_seed_presets_train_what_the_seeds_trained():
    med = render({**stack_config(ROOT / "Pulumi.medical-meadow.yaml"), "hfToken": TOKEN})
    trainer = _trainer_config(med)
    assert trainer["model"]["name_or_path"] == "meta-llama/Llama-2-7b-hf"
    assert trainer["data"]["dataset"] == "medalpaca/medical_meadow_medical_flashcards"
    fin = render({**stack_config(ROOT / "Pulumi.financial-chatbot.yaml"), "hfToken": TOKEN})
    trainer = _trainer_config(fin)
    assert trainer["model"]["name_or_path"] == "meta-llama/Llama-2-7b-chat-hf"
    assert trainer["data"]["file"] == "/data/finance-alpaca.json"
    assert "financial assistant" in trainer["data"]["system_prompt"]


def _trainer_config(rendered):
    import yaml

    return yaml.safe_load(rendered.one("ConfigMap")["data"]["config.yaml"])


VARIATIONS = {
    "eight-workers-elastic": {"workers": 8, "minWorkers": 4},
    "c10d": {"rendezvous": "c10d"},
    "etcd-three": {"etcdReplicas": 3},
    "gpu-nodes": {"image": "ghcr.io/x/trainer-cuda:1.0", "resources": {
        "gpus": 8, "cpu": "96", "memory": "1000Gi", "nodeSelector": {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]},
        "procsPerWorker": 8, "training": {"ddp_backend": "nccl", "fsdp": True}},
    "single-worker-rwo": {"workers": 1, "storage": {"accessMode": "ReadWriteOnce", "className": "standard-rwo"}},
    "storage-class": {"storage": {"createClass": True, "className": "fast-rwx", "provisioner": "nfs.csi.k8s.io",
                                  "parameters": {"server": "nfs.local", "share": "/exports"}}},
    "full-finetune-8bit-gptq": {"lora": {"enabled": False}, "quantize": {"bits": 8, "algorithm": "gptq", "format": "inc"}},
    "intel": {"intelRuntime": True, "extraEnv": {"OMP_DISPLAY_ENV": "true"}},
    "namespace-and-name": {"namespace": "ml-team", "jobName": "mistral-ft"},
}


@pytest.mark.parametrize("name", sorted(VARIATIONS))
def test_variations_render_valid(name):
    raw = {"dataset": {"name": "org/data"}, "storage": {"className": "nfs-rwx"}, **VARIATIONS[name]}
    rendered = render(raw)
    validate_all(rendered)
    for where, spec in pod_specs(rendered).items():
        assert_pod_security(spec, where)


def test_schema_validation_catches_a_broken_job():
    """The validators are not vacuous: a job the operator would refuse fails them."""
    job = render({"dataset": {"name": "org/data"}, "storage": {"className": "nfs-rwx"}}).one("PyTorchJob")
    validate_pytorchjob(job)
    broken = json.loads(json.dumps(job))
    broken["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["name"] = "trainer"
    with pytest.raises(AssertionError, match="pytorch"):
        validate_pytorchjob(broken)
    typo = json.loads(json.dumps(job))
    typo["spec"]["elasticPolicy"]["rdzvBackEnd"] = "etcd-v2"
    with pytest.raises(Exception, match="rdzvBackEnd"):
        validate_pytorchjob(typo)
    both = json.loads(json.dumps(job))
    both["spec"]["elasticPolicy"]["nProcPerNode"] = 1
    with pytest.raises(AssertionError, match="nprocPerNode"):
        validate_pytorchjob(both)

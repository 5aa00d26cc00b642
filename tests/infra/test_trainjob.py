"""Kubeflow Trainer v2: the same stack renders a TrainJob that passes the CRD, its CEL rules and the
restricted Pod Security Standard; PyTorchJob stacks are unchanged."""

import json

import pytest

from infra.config import StackConfigError, parse
from tests.infra.harness import (ROOT, assert_pod_security, effective_trainjob_pod, pod_specs, render, runtimes,
                                 stack_config, validate_all, validate_trainjob)

V2 = {"jobApi": "trainer-v2", "dataset": {"name": "org/data"}, "storage": {"className": "nfs-rwx"}}
TOKEN = "hf_TrainJobTokenNeverInEnv0123456789"
V1_ONLY = ("minWorkers", "maxWorkers", "maxRestarts", "etcdReplicas", "etcdImage", "etcdStorage", "runPolicy",
           "rendezvous")

VARIATIONS = {
    "one-node": {"workers": 1},
    "eight-nodes": {"workers": 8},
    "gpus": {"image": "ghcr.io/x/trainer-cuda:1.0", "procsPerWorker": 8, "training": {"fsdp": True},
             "resources": {"gpus": 8, "cpu": "96", "memory": "1000Gi",
                           "nodeSelector": {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"},
                           "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}},
    "cpu-explicit-processes": {"procsPerWorker": 2, "resources": {"cpu": "32", "memory": "128Gi"}},
    "tolerations": {"resources": {"tolerations": [{"key": "dedicated", "value": "ml", "effect": "NoSchedule"}]}},
    "token": {"hfToken": TOKEN},
    "no-token": {},
    "other-runtime": {"trainerRuntime": "torch-distributed-xeon"},
}


def _job(rendered):
    return rendered.one("TrainJob")


@pytest.mark.parametrize("name", sorted(VARIATIONS))
def test_variations_render_a_valid_restricted_trainjob(name):
    rendered = render({**V2, **VARIATIONS[name]})
    validate_all(rendered)
    for where, spec in pod_specs(rendered).items():
        assert_pod_security(spec, where)
    kinds = {r.kind for r in rendered.resources}
    assert "TrainJob" in kinds and "PyTorchJob" not in kinds
    assert not {"StatefulSet", "NetworkPolicy"} & kinds  # no etcd: the runtime's static rendezvous
    job = _job(rendered)
    trainer = job["spec"]["trainer"]
    assert trainer["numNodes"] == VARIATIONS[name].get("workers", 2)
    assert trainer["numProcPerNode"] == VARIATIONS[name].get("procsPerWorker", 1)  # explicit, also on CPU
    assert trainer["command"][:3] == ["python", "-m", "trainer.runtime.launch"]


@pytest.mark.parametrize("stack_file", sorted(ROOT.glob("Pulumi.*.yaml")), ids=lambda p: p.name)
def test_every_stack_file_renders_on_trainer_v2(stack_file):
    raw = {k: v for k, v in stack_config(stack_file).items() if k not in V1_ONLY}
    rendered = render({**raw, "jobApi": "trainer-v2", "hfToken": TOKEN})
    validate_all(rendered)
    for where, spec in pod_specs(rendered).items():
        assert_pod_security(spec, where)


def test_the_pod_has_every_mount_the_pytorchjob_pod_has():
    v1 = render({**{k: v for k, v in V2.items() if k != "jobApi"}, "hfToken": TOKEN})
    v2 = render({**V2, "hfToken": TOKEN})
    worker = v1.one("PyTorchJob")["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    node = effective_trainjob_pod(v2.one("TrainJob"), runtimes(v2))
    c1, c2 = worker["containers"][0], next(c for c in node["containers"] if c["name"] == "node")
    assert c1["volumeMounts"] == c2["volumeMounts"]
    assert [v["name"] for v in worker["volumes"]] == [v["name"] for v in node["volumes"]]
    assert node["terminationGracePeriodSeconds"] == worker["terminationGracePeriodSeconds"]
    assert node["securityContext"] == worker["securityContext"] and c2["securityContext"] == c1["securityContext"]
    assert c1["command"] == c2["command"] and c1["resources"] == c2["resources"]
    # The token: a mounted file, never an env value, never in the TrainJob's env.
    env = {e["name"]: e.get("value") for e in c2["env"]}
    assert env["HF_TOKEN_PATH"] == "/var/run/secrets/huggingface/token"
    assert TOKEN not in json.dumps(v2.one("TrainJob"))
    assert [r.kind for r in v2.resources if TOKEN in json.dumps(r.inputs)] == ["Secret"]


def test_outputs_and_commands_speak_trainjob():
    rendered = render({**V2, "namespace": "ml", "jobName": "tj"})
    out = rendered.outputs
    assert out["jobApi"] == "trainer-v2" and out["rendezvousId"] == "static: tj-node-0-0.tj:29500"
    cmds = out["commands"]
    assert cmds["watchJob"] == "kubectl -n ml get trainjob tj -w"
    assert cmds["watchPods"] == "kubectl -n ml get pods -l jobset.sigs.k8s.io/jobset-name=tj -w"
    assert "job-completion-index=0 -c node" in cmds["followLogs"]


def test_a_config_change_replaces_the_trainjob():
    job = next(r for r in render(V2).resources if r.kind == "TrainJob")
    assert job.options.replace_on_changes == ["spec", "metadata.labels"] and job.options.delete_before_replace is True


@pytest.mark.parametrize("key,value", [("rendezvous", "etcd"), ("minWorkers", 1), ("maxWorkers", 4),
                                       ("maxRestarts", 5), ("etcdReplicas", 3), ("runPolicy", {"cleanPodPolicy": "All"})])
def test_options_only_v1_understands_are_refused(key, value):
    with pytest.raises(StackConfigError, match=rf"'llm-finetune:{key}'.*only mean something to the Training "
                                               r"Operator v1.*Fix: pulumi config rm"):
        parse({**V2, key: value})


def test_reserved_torchrun_variables_are_refused():
    with pytest.raises(StackConfigError, match="'llm-finetune:extraEnv'.*PET_MASTER_PORT is set by the job's operator"):
        parse({**V2, "extraEnv": {"PET_MASTER_PORT": "1234"}})


def test_validators_are_not_vacuous():
    job = _job(render({**V2, "trainerRuntime": "torch-distributed-xeon"}))  # with the stack's runtime patch
    validate_trainjob(job)
    for mutate, words in (
        (lambda j: j["spec"]["trainer"].__setitem__("numProcsPerNode", 2), "numProcsPerNode"),
        (lambda j: j["spec"]["trainer"]["env"].append({"name": "PET_NODE_RANK", "value": "0"}), "reserves"),
        (lambda j: j["metadata"].__setitem__("name", "Bad_Name"), "RFC 1035"),
        (lambda j: j["spec"]["trainer"].pop("numProcPerNode"), "numProcPerNode"),
        (lambda j: (j["spec"].__setitem__("runtimeRef", {"name": "torch-distributed"}),
                    j["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
                    .__setitem__("name", "trainer")), "replicated job 'trainer'"),
    ):
        broken = json.loads(json.dumps(job))
        mutate(broken)
        with pytest.raises(Exception, match=words):
            validate_trainjob(broken)


def test_pytorchjob_stacks_are_unchanged_by_the_new_key():
    base = {"dataset": {"name": "org/data"}, "storage": {"className": "nfs-rwx"}}
    implicit, explicit = render(base), render({**base, "jobApi": "training-operator-v1"})
    assert implicit.one("PyTorchJob") == explicit.one("PyTorchJob")

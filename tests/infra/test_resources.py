"""Each resource of the FineTuneJob component, under Pulumi mocks."""

import json

import pytest

from tests.infra.harness import render, validate_core
from trainer.config import load_config_text

DS = {"dataset": {"name": "org/data"}, "storage": {"className": "nfs-rwx"}}
TOKEN = "hf_DoNotLeakThisToken987654321"


def _worker(rendered):
    job = rendered.one("PyTorchJob")
    return job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]


def test_every_child_is_parented_by_one_component(rendered):
    kinds = [r.typ for r in rendered.resources]
    assert kinds.count("llm-finetune:index:FineTuneJob") == 1
    # Child names derive from the component name.
    assert all(r.name.startswith("llm-finetune") for r in rendered.resources)


# ---- token -------------------------------------------------------------------------------------

def test_token_is_in_the_secret_and_nowhere_else():
    rendered = render({**DS, "hfToken": TOKEN})
    holders = [r for r in rendered.resources if TOKEN in json.dumps(r.inputs)]
    assert [r.kind for r in holders] == ["Secret"]
    secret = holders[0]
    # Marked secret for Pulumi (encrypted in state), not a plain string.
    assert "4dabf18193072939515e22adb298388d" in json.dumps(secret.inputs["stringData"])
    assert TOKEN not in json.dumps(rendered.outputs)
    worker = _worker(rendered)
    env = {e["name"]: e.get("value") for e in worker["containers"][0]["env"]}
    assert TOKEN not in json.dumps(env)
    assert not {"HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"} & set(env)
    assert env["HF_TOKEN_PATH"] == "/var/run/secrets/huggingface/token"
    mount = next(m for m in worker["containers"][0]["volumeMounts"] if m["name"] == "hf-token")
    assert mount["readOnly"] is True and mount["mountPath"] == "/var/run/secrets/huggingface"


def test_no_token_no_secret(rendered):
    assert rendered.of_kind("Secret") == []
    worker = _worker(rendered)
    assert not any(v["name"] == "hf-token" for v in worker["volumes"])
    assert "HF_TOKEN_PATH" not in json.dumps(worker)


# ---- storage -----------------------------------------------------------------------------------

def test_claim_is_shared_rwx_and_kept_on_destroy(rendered):
    pvc = rendered.one("PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["spec"]["resources"]["requests"]["storage"] == "100Gi"
    assert pvc["spec"]["storageClassName"] == "nfs-rwx"
    assert rendered.of_kind("StorageClass") == []
    claim = next(r for r in rendered.resources if r.kind == "PersistentVolumeClaim")
    assert claim.options.retain_on_delete is True
    dropped = render({**DS, "storage": {"className": "nfs-rwx", "retainOnDestroy": False}})
    assert next(r for r in dropped.resources if r.kind == "PersistentVolumeClaim").options.retain_on_delete is False


def test_storage_class_only_when_asked_and_its_disk_goes_with_the_claim():
    rendered = render({**DS, "storage": {"createClass": True, "className": "ssd", "provisioner": "pd.csi.storage.gke.io",
                                         "parameters": {"type": "pd-ssd"}, "accessMode": "ReadWriteOnce"},
                       "workers": 1})
    sc = rendered.one("StorageClass")
    assert sc["provisioner"] == "pd.csi.storage.gke.io" and sc["parameters"] == {"type": "pd-ssd"}
    # Delete: `kubectl delete pvc` removes the disk too (a Retain class left a billed volume behind);
    # keeping the model across `pulumi destroy` is the claim's retainOnDestroy.
    assert sc["volumeBindingMode"] == "WaitForFirstConsumer" and sc["reclaimPolicy"] == "Delete"
    assert rendered.one("PersistentVolumeClaim")["spec"]["storageClassName"] == "ssd"


# ---- config map --------------------------------------------------------------------------------

def test_config_map_carries_a_valid_trainer_config():
    rendered = render({**DS, "model": "org/model", "training": {"max_steps": 7}, "lora": {"r": 4}})
    text = rendered.one("ConfigMap")["data"]["config.yaml"]
    trainer = load_config_text(text)
    assert trainer.model.name_or_path == "org/model"
    assert trainer.training.max_steps == 7 and trainer.lora.r == 4
    run = rendered.outputs["run"]
    assert len(run) == 8 and trainer.output_dir == f"/data/output/llm-finetune/{run}"  # one directory per run
    worker = _worker(rendered)
    container = worker["containers"][0]
    assert {"name": "trainer-config", "mountPath": "/etc/llm-finetune", "readOnly": True} in container["volumeMounts"]
    assert container["command"][-1] == "/etc/llm-finetune/config.yaml"


# ---- data access -------------------------------------------------------------------------------

def test_data_access_pod_mounts_the_volume_and_is_pinned(rendered):
    pod = rendered.one("Pod")
    c = pod["spec"]["containers"][0]
    assert ":" in c["image"] and not c["image"].endswith(":latest")
    assert {"name": "data", "mountPath": "/data"} in c["volumeMounts"]
    assert pod["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == "llm-finetune-data"
    # Same uid as the trainer image, so copied files are readable by the workers.
    assert pod["spec"]["securityContext"]["runAsUser"] == _worker(rendered)["securityContext"]["runAsUser"]


# ---- etcd --------------------------------------------------------------------------------------

def test_etcd_is_pinned_v2_enabled_and_internal(rendered):
    sts = rendered.one("StatefulSet")
    c = sts["spec"]["template"]["spec"]["containers"][0]
    assert c["image"].startswith("quay.io/coreos/etcd:v3.5.")
    assert "--enable-v2=true" in c["args"]
    assert sts["spec"]["replicas"] == 1
    services = {s.name: s.manifest() for s in rendered.of_kind("Service")}
    assert all(s["spec"].get("type", "ClusterIP") == "ClusterIP" for s in services.values())
    assert services["llm-finetune-etcd-peers"]["spec"]["clusterIP"] == "None"
    job = rendered.one("PyTorchJob")
    elastic = job["spec"]["elasticPolicy"]
    assert elastic["rdzvBackend"] == "etcd-v2"
    assert elastic["rdzvHost"] == "llm-finetune-etcd-client.default.svc" and elastic["rdzvPort"] == 2379


def test_three_member_etcd_forms_one_cluster():
    rendered = render({**DS, "etcdReplicas": 3})
    args = rendered.one("StatefulSet")["spec"]["template"]["spec"]["containers"][0]["args"]
    initial = next(a for a in args if a.startswith("--initial-cluster="))
    assert initial.count("=http://") == 3 and "llm-finetune-etcd-2=" in initial


def test_network_policy_admits_client_port_only_from_this_jobs_workers(rendered):
    policy = rendered.one("NetworkPolicy")
    worker_labels = rendered.one("PyTorchJob")["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["metadata"]["labels"]
    etcd_labels = rendered.one("StatefulSet")["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    sel = policy["spec"]["podSelector"]["matchLabels"]
    assert sel.items() <= etcd_labels.items()
    client_rules = [r for r in policy["spec"]["ingress"] if {"protocol": "TCP", "port": 2379} in r["ports"]]
    for rule in client_rules:
        for peer in rule["from"]:
            assert set(peer) == {"podSelector"}  # no namespaceSelector / ipBlock: nothing outside
            matched = peer["podSelector"]["matchLabels"]
            assert matched.items() <= worker_labels.items() or matched.items() <= etcd_labels.items()
    assert any(r["from"][0]["podSelector"]["matchLabels"].items() <= worker_labels.items() for r in client_rules)


def test_c10d_creates_no_etcd():
    rendered = render({**DS, "rendezvous": "c10d"})
    assert not {"StatefulSet", "Service", "NetworkPolicy"} & {r.kind for r in rendered.resources}
    elastic = rendered.one("PyTorchJob")["spec"]["elasticPolicy"]
    assert elastic["rdzvBackend"] == "c10d" and "rdzvHost" not in elastic


def test_nothing_is_exposed_outside_the_cluster(rendered):
    text = json.dumps([r.inputs for r in rendered.resources])
    for exposed in ("LoadBalancer", "NodePort", "hostPort", "hostNetwork", "Ingress\""):
        assert exposed not in text.replace('"policyTypes": ["Ingress"]', "")


# ---- PyTorchJob --------------------------------------------------------------------------------

def test_pytorchjob_spec():
    rendered = render({**DS, "workers": 3, "minWorkers": 2, "procsPerWorker": 2, "terminationGracePeriodSeconds": 240,
                       "maxRestarts": 5, "resources": {"cpu": "16", "memory": "64Gi", "shmSize": "16Gi",
                                                       "nodeSelector": {"pool": "xeon"},
                                                       "tolerations": [{"key": "dedicated", "value": "ml",
                                                                        "effect": "NoSchedule"}]},
                       "runPolicy": {"cleanPodPolicy": "Running", "ttlSecondsAfterFinished": 3600}})
    job = rendered.one("PyTorchJob")
    assert job["apiVersion"] == "kubeflow.org/v1" and job["kind"] == "PyTorchJob"
    assert job["metadata"]["annotations"]["pulumi.com/skipAwait"] == "true"  # returns once submitted
    spec = job["spec"]
    assert spec["nprocPerNode"] == "2"
    assert spec["elasticPolicy"]["minReplicas"] == 2 and spec["elasticPolicy"]["maxReplicas"] == 3
    assert spec["elasticPolicy"]["maxRestarts"] == 5
    assert spec["runPolicy"]["cleanPodPolicy"] == "Running" and spec["runPolicy"]["ttlSecondsAfterFinished"] == 3600
    # The operator sums restarts over all pods: one event restarting every worker counts 3 times.
    assert spec["runPolicy"]["backoffLimit"] == 3 * (5 + 1)
    worker = spec["pytorchReplicaSpecs"]["Worker"]
    assert worker["replicas"] == 3
    assert worker["restartPolicy"] == "ExitCode"  # launcher: 2 input error, 1 gave up, 143 preempted
    pod = worker["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 240
    c = pod["containers"][0]
    assert c["name"] == "pytorch"
    assert c["command"][:5] == ["python", "-m", "trainer.runtime.launch", "finetune", "--config"]
    assert c["resources"]["requests"] == c["resources"]["limits"] == {"cpu": "16", "memory": "64Gi"}
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["HF_HOME"].startswith("/data/")  # caches on the shared volume
    assert env["LLM_FINETUNE_GRACE_SECONDS"] == "240" and env["LLM_FINETUNE_LAUNCH_ATTEMPTS"] == "3"
    assert pod["nodeSelector"] == {"pool": "xeon"}
    assert pod["tolerations"] == [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}]


def test_gpus_and_intel_runtime_env():
    rendered = render({**DS, "image": "ghcr.io/x/trainer-cuda:1", "resources": {"gpus": 4}, "procsPerWorker": 4})
    c = _worker(rendered)["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "4"
    intel = render({**DS, "intelRuntime": True})
    env = {e["name"]: e["value"] for e in _worker(intel)["containers"][0]["env"]}
    assert "libiomp5.so" in env["LD_PRELOAD"] and env["KMP_BLOCKTIME"] == "1"
    assert not any(k.startswith(("CCL_", "FI_")) for k in env)  # oneCCL is discontinued
    plain = {e["name"] for e in _worker(render(DS))["containers"][0]["env"]}
    assert "LD_PRELOAD" not in plain


def test_stack_outputs_have_ready_to_paste_commands():
    rendered = render({"dataset": {"file": "finance.json"}, "namespace": "ml", "jobName": "fin",
                       "storage": {"className": "nfs-rwx"}})
    out = rendered.outputs
    run = out["run"]
    assert out["outputDir"] == f"/data/output/fin/{run}"
    assert out["jobName"] == "fin" and out["namespace"] == "ml"
    assert out["volumeClaim"] == "fin-data" and out["dataAccessPod"] == "fin-data-access"
    cmds = out["commands"]
    assert cmds["watchJob"] == "kubectl -n ml get pytorchjob fin -w"
    assert cmds["followLogs"] == "kubectl -n ml logs -f fin-worker-0 -c pytorch"
    # Upload-then-rename: the workers never read a half-copied file.
    assert cmds["uploadDataset"] == ("kubectl -n ml cp ./finance.json fin-data-access:/data/finance.json.partial && "
                                     "kubectl -n ml exec fin-data-access -- mv /data/finance.json.partial "
                                     "/data/finance.json")
    assert cmds["copyModel"] == f"kubectl -n ml cp fin-data-access:/data/output/fin/{run}/final ./fin-final"
    assert cmds["listRuns"] == "kubectl -n ml exec fin-data-access -- ls -la /data/output/fin"
    assert cmds["getTrainerConfig"] == (f"kubectl -n ml get configmap fin-config-{run} "
                                        "-o jsonpath='{.data.config\\.yaml}' > config.yaml")
    assert "quantized" in cmds["copyQuantizedModel"]


def test_core_validation_is_not_vacuous(rendered):
    pod = rendered.one("Pod")
    pod["spec"]["containers"][0]["imagePullPolicy"] = "Sometimes"
    pod["spec"]["restartPolicyy"] = "Always"
    with pytest.raises(Exception):
        validate_core(pod)

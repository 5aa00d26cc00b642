"""On a shared cluster: the Kueue queue label and suspension, the workers' priority class, and the
trackers' settings and credentials, for both job APIs, against the CRDs and the restricted PSS."""

import json

import pytest

from infra.config import StackConfigError, parse
from tests.infra.harness import SECRET_SIG, assert_pod_security, pod_specs, render, validate_all

DS = {"dataset": {"name": "org/data"}, "storage": {"className": "nfs-rwx"}}
APIS = {"training-operator-v1": "PyTorchJob", "trainer-v2": "TrainJob"}
QUEUE = "kueue.x-k8s.io/queue-name"
KEY = "wandb-KeyThatMustNeverBeInAPodSpec0123"
TOKEN = "mlflow-TokenThatMustNeverBeInAPodSpec"


def _job(rendered, api):
    (declared,) = rendered.of_kind(APIS[api])
    return declared, declared.manifest()


@pytest.mark.parametrize("api", sorted(APIS))
def test_a_queued_job_is_labelled_and_created_suspended(api):
    rendered = render({**DS, "jobApi": api, "queueName": "team-a"})
    validate_all(rendered)
    for where, spec in pod_specs(rendered).items():
        assert_pod_security(spec, where)
    declared, job = _job(rendered, api)
    assert job["metadata"]["labels"][QUEUE] == "team-a"
    suspended = job["spec"]["runPolicy"]["suspend"] if api == "training-operator-v1" else job["spec"]["suspend"]
    assert suspended is True
    # Only the job is a Kueue workload: no other object (pods, volume-prep Job, etcd) carries the label.
    others = [r.name for r in rendered.resources if r is not declared and QUEUE in json.dumps(r.inputs)]
    assert others == []
    if api == "training-operator-v1":  # nor the worker pods: Kueue reads the job's label
        assert QUEUE not in job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["metadata"]["labels"]
    # Kueue unsuspends an admitted job; `pulumi up` must not undo that (nor replace the TrainJob for it).
    field = "spec.runPolicy.suspend" if api == "training-operator-v1" else "spec.suspend"
    assert declared.options.ignore_changes == [field]
    assert "get workloads" in rendered.outputs["commands"]["watchAdmission"]
    assert f"-e '^{APIS[api].lower()}-{job['metadata']['name']}-'" in rendered.outputs["commands"]["watchAdmission"]


@pytest.mark.parametrize("api", sorted(APIS))
def test_without_a_queue_nothing_of_kueue_is_rendered(api):
    rendered = render({**DS, "jobApi": api})
    declared, job = _job(rendered, api)
    assert QUEUE not in job["metadata"]["labels"]
    assert "suspend" not in job["spec"] and "suspend" not in job["spec"].get("runPolicy", {})
    assert not declared.options.ignore_changes
    assert "watchAdmission" not in rendered.outputs["commands"]
    assert not [r.name for r in rendered.resources if "kueue.x-k8s.io" in json.dumps(r.inputs)]


def test_pytorchjob_priority_in_the_pod_template_and_the_run_policy():
    rendered = render({**DS, "priorityClassName": "batch-low", "queueName": "team-a"})
    validate_all(rendered)
    _, job = _job(rendered, "training-operator-v1")
    assert job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["priorityClassName"] == "batch-low"
    # Kueue's KubeflowJob.PriorityClass() reads this first; the operator's gang scheduling too.
    assert job["spec"]["runPolicy"]["schedulingPolicy"] == {"priorityClass": "batch-low"}
    # The data-access pod and etcd are not preemptible training: they keep the default priority.
    assert all(spec.get("priorityClassName") is None for where, spec in pod_specs(rendered).items()
               if "Worker" not in where)


def test_trainjob_priority_through_a_training_runtime_of_the_stack():
    rendered = render({**DS, "jobApi": "trainer-v2", "priorityClassName": "batch-low", "workers": 3})
    validate_all(rendered)  # the TrainingRuntime against the runtime CRD, the node pod built from it
    for where, spec in pod_specs(rendered).items():
        assert_pod_security(spec, where)
    runtime = rendered.one("TrainingRuntime")
    _, job = _job(rendered, "trainer-v2")
    assert job["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "TrainingRuntime",
                                         "name": runtime["metadata"]["name"]}
    assert runtime["metadata"]["namespace"] == job["metadata"]["namespace"]
    assert runtime["metadata"]["labels"]["trainer.kubeflow.org/framework"] == "torch"
    node = pod_specs(rendered)[f"{rendered.of_kind('TrainJob')[0].name}/node"]
    assert node["priorityClassName"] == "batch-low"
    assert node["containers"][0]["command"][:3] == ["python", "-m", "trainer.runtime.launch"]
    assert job["spec"]["trainer"]["numNodes"] == 3


@pytest.mark.parametrize("raw, key, words", [
    ({"queueName": "Team A"}, "queueName", "not a label value"),
    ({"queueName": "q" * 64}, "queueName", "at most 63"),
    ({"queueName": "-team"}, "queueName", "starting and ending"),
    ({"priorityClassName": "Batch_Low"}, "priorityClassName", "not a PriorityClass name"),
    ({"priorityClassName": "system-node-critical"}, "priorityClassName", "cluster's own components"),
    ({"jobApi": "trainer-v2", "trainerRuntime": "torch-xeon", "priorityClassName": "low"}, "priorityClassName",
     "set priorityClassName in that runtime"),
    ({"jobApi": "trainer-v2", "trainerRuntime": "torch-xeon", "queueName": "team-a"}, "queueName",
     "field is immutable.*pulumi config rm trainerRuntime"),
    ({"queueName": "team-a", "workloadPriorityClass": "Batch_Low"}, "workloadPriorityClass",
     "not a WorkloadPriorityClass name"),
    ({"workloadPriorityClass": "batch-low"}, "workloadPriorityClass", "the job is not queued"),
    ({"activeDeadlineSeconds": -5}, "activeDeadlineSeconds", "must be >= 0, got -5"),
])
def test_bad_queue_or_priority_is_refused_at_preview(raw, key, words):
    with pytest.raises(StackConfigError, match=words) as err:
        parse({**DS, **raw})
    assert f"'llm-finetune:{key}'" in str(err.value) and str(err.value).count("Fix:") == 1


@pytest.mark.parametrize("api", sorted(APIS))
def test_workload_priority_class_is_the_jobs_kueue_label(api):
    rendered = render({**DS, "jobApi": api, "queueName": "team-a", "workloadPriorityClass": "batch-low"})
    validate_all(rendered)
    declared, job = _job(rendered, api)
    assert job["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] == "batch-low"
    # Kueue's priority only: the pods keep the cluster's default scheduling priority.
    assert all(spec.get("priorityClassName") is None for spec in pod_specs(rendered).values())
    others = [r.name for r in rendered.resources if r is not declared and "priority-class" in json.dumps(r.inputs)]
    assert others == []


@pytest.mark.parametrize("api", sorted(APIS))
def test_active_deadline_reaches_the_jobs_operator(api):
    rendered = render({**DS, "jobApi": api, "activeDeadlineSeconds": 86400})
    validate_all(rendered)
    declared, job = _job(rendered, api)
    where = job["spec"]["runPolicy"] if api == "training-operator-v1" else job["spec"]
    assert where["activeDeadlineSeconds"] == 86400
    _, without = _job(render({**DS, "jobApi": api}), api)
    assert "activeDeadlineSeconds" not in json.dumps(without)
    # Immutable on a TrainJob (CEL): a new deadline is a new job, as any spec change.
    assert "spec" in declared.options.replace_on_changes if api == "trainer-v2" else True


def test_trackers_get_their_settings_and_credentials_as_files():
    raw = {**DS, "training": {"reportTo": ["tensorboard", "mlflow", "wandb"]},
           "tracking": {"mlflowTrackingUri": "http://mlflow.mlflow.svc:5000", "wandbProject": "llm",
                        "wandbEntity": "team", "runName": "medical"},
           "wandbApiKey": KEY, "mlflowTrackingToken": TOKEN}
    rendered = render(raw)
    validate_all(rendered)
    for where, spec in pod_specs(rendered).items():
        assert_pod_security(spec, where)
    (secret,) = [r for r in rendered.of_kind("Secret") if r.name.endswith("-tracking")]
    assert secret.inputs["stringData"][SECRET_SIG]  # a secret Output, encrypted in state
    assert secret.inputs["stringData"]["value"] == {"wandb-api-key": KEY, "mlflow-token": TOKEN}
    _, job = _job(rendered, "training-operator-v1")
    text = json.dumps(job)
    assert KEY not in text and TOKEN not in text  # never a value in the pod spec
    pod = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
    assert env["WANDB_API_KEY_FILE"] == "/var/run/secrets/llm-finetune-tracking/wandb-api-key"
    assert env["MLFLOW_TRACKING_TOKEN_FILE"] == "/var/run/secrets/llm-finetune-tracking/mlflow-token"
    assert "WANDB_API_KEY" not in env and "MLFLOW_TRACKING_TOKEN" not in env
    (volume,) = [v for v in pod["volumes"] if v["name"] == "tracking"]
    assert volume["secret"]["secretName"] == secret.manifest()["metadata"]["name"]
    hf = [v for v in pod["volumes"] if v["name"] == "hf-token"]
    assert hf == []  # no token, no token volume (and the tracking volume is not mistaken for it)
    # The trainer config the workers read: the trackers and where they write.
    (cm,) = rendered.of_kind("ConfigMap")
    import yaml

    trainer = yaml.safe_load(cm.manifest()["data"]["config.yaml"])
    assert trainer["training"]["report_to"] == ["tensorboard", "mlflow", "wandb"]
    assert trainer["tracking"] == {"run_name": "medical", "mlflow_tracking_uri": "http://mlflow.mlflow.svc:5000",
                                   "mlflow_experiment": "llm-finetune", "wandb_project": "llm",
                                   "wandb_entity": "team", "wandb_mode": "online"}
    # TensorBoard from the data-access pod, on its loopback only, through kubectl port-forward.
    (access,) = rendered.of_kind("Pod")
    (tb,) = [c for c in access.manifest()["spec"]["containers"] if c["name"] == "tensorboard"]
    assert tb["command"][tb["command"].index("--host") + 1] == "127.0.0.1" and "ports" not in tb
    assert all(m["readOnly"] for m in tb["volumeMounts"] if m["name"] == "data")
    commands = rendered.outputs["commands"]
    assert commands["tensorboard"] == f"kubectl -n default port-forward pod/{access.manifest()['metadata']['name']} 6006:6006"
    assert commands["progress"].endswith(f"cat {rendered.outputs['outputDir']}/progress.txt")


def test_adding_a_tracker_resumes_the_same_run():
    before = render(DS).outputs
    after = render({**DS, "training": {"reportTo": ["tensorboard"]}, "tracking": {"runName": "x"}}).outputs
    assert before["run"] == after["run"] and before["outputDir"] == after["outputDir"]
    assert "tensorboard" not in before["commands"] and "tensorboard" in after["commands"]


@pytest.mark.parametrize("raw, key, words", [
    ({"training": {"reportTo": ["wandb"]}, "tracking": {"wandbProject": "p"}}, "training", "no wandbApiKey"),
    ({"training": {"reportTo": ["mlflow"]}}, "tracking", "mlflow_tracking_uri"),
    ({"training": {"reportTo": ["mlflow"]}, "tracking": {"mlflowTrackingUri": "file:/tmp/mlruns"}},
     "tracking.mlflowTrackingUri", "lost with it"),
    ({"training": {"reportTo": ["tensorbord"]}}, "training", "did you mean 'tensorboard'"),
    ({"wandbApiKey": "<secret>"}, "wandbApiKey", "does not include wandb"),
    ({"tracking": {"wandbMod": "offline"}}, "tracking.wandbMod", "did you mean 'wandbMode'"),
])
def test_tracker_settings_are_checked_at_preview(raw, key, words):
    with pytest.raises(StackConfigError, match=words) as err:
        parse({**DS, **raw})
    assert f"'llm-finetune:{key}'" in str(err.value)


def test_a_tracker_credential_in_plain_text_is_refused():
    raw = {**DS, "training": {"reportTo": ["wandb"]}, "tracking": {"wandbProject": "p"}, "wandbApiKey": KEY}
    with pytest.raises(StackConfigError, match="pulumi config set --secret wandbApiKey"):
        parse(raw, plain=("wandbApiKey",))
    assert parse(raw).tracker_secrets == ("wandbApiKey",)


def test_fsdp_with_a_world_that_can_shrink_to_one_process_is_refused_at_preview():
    with pytest.raises(StackConfigError, match="training.fsdp: true with a single process") as err:
        parse({**DS, "workers": 1, "training": {"fsdp": True}})
    assert "pulumi config set --path training.fsdp false" in str(err.value)
    with pytest.raises(StackConfigError, match="single process"):
        parse({**DS, "workers": 2, "minWorkers": 1, "training": {"fsdp": True}})
    assert parse({**DS, "workers": 2, "training": {"fsdp": True}}).trainer.training.fsdp


@pytest.mark.parametrize("quantize, words", [
    ({}, "vllm serve ./llm-finetune-quantized"),
    ({"format": "auto-round"}, "vllm serve ./llm-finetune-quantized"),
    ({"format": "gguf:q4_k_m"}, "ollama create llm-finetune -f ./llm-finetune-quantized/Modelfile"),
    ({"format": "gguf:q8_0", "bits": 8}, "-m ./llm-finetune-quantized/model-q8_0.gguf"),
    ({"format": "inc", "algorithm": "gptq"}, "load_quantized('./llm-finetune-quantized')"),
])
def test_the_stack_says_how_to_copy_and_serve_each_quantized_format(quantize, words):
    rendered = render({**DS, "quantize": quantize})
    commands = rendered.outputs["commands"]
    assert commands["copyQuantizedModel"].endswith("/quantized ./llm-finetune-quantized")
    assert words in commands["serveQuantized"]
    (cm,) = rendered.of_kind("ConfigMap")
    import yaml

    assert yaml.safe_load(cm.manifest()["data"]["config.yaml"])["quantize"]["format"] == quantize.get(
        "format", "compressed-tensors")


def test_a_quantize_format_that_cannot_hold_the_algorithm_is_refused_at_preview():
    with pytest.raises(StackConfigError, match="cannot hold a GPTQ result") as err:
        parse({**DS, "quantize": {"algorithm": "gptq"}})
    assert "'llm-finetune:quantize'" in str(err.value)

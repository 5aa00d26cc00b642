"""Every CEL rule of the CRDs the stack writes, evaluated (tests/infra/cel.py): on every object every
preset and job API renders, on each change a later `pulumi up` makes, and on Kueue's start of a
queued TrainJob. The mutations at the end show a violated rule is caught."""

import copy
import re

import pytest

from tests.infra import cel
from tests.infra.harness import ROOT, render, stack_config

V1_ONLY = ("minWorkers", "maxWorkers", "maxRestarts", "etcdReplicas", "etcdImage", "etcdStorage", "runPolicy",
           "rendezvous")
DS = {"dataset": {"name": "org/data"}, "storage": {"className": "nfs-rwx"}}
APIS = ("training-operator-v1", "trainer-v2")
CHECKED = ("TrainJob", "TrainingRuntime", "PyTorchJob")
STACKS = sorted(ROOT.glob("Pulumi.*.yaml"))


def _objects(rendered) -> dict[str, dict]:
    return {r.kind: r.manifest() for r in rendered.resources if r.kind in CHECKED}


def _config(stack_file, api) -> dict:
    raw = stack_config(stack_file)
    if api == "trainer-v2":
        raw = {k: v for k, v in raw.items() if k not in V1_ONLY}
    return {**raw, "jobApi": api}


def test_the_cel_implementation_reads_every_rule_of_the_crds():
    counts = {}
    for kind in ("TrainJob", "ClusterTrainingRuntime", "PyTorchJob"):
        found = list(cel.rules(cel.schema(kind)))
        for _, r in found:
            cel.program(r["rule"])  # compiles: cel-python understands it
        counts[kind] = len(found)
    assert counts == {"TrainJob": 19, "ClusterTrainingRuntime": 11, "PyTorchJob": 1}


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("stack_file", STACKS, ids=lambda p: p.name)
@pytest.mark.parametrize("queued", [False, True], ids=["direct", "queued"])
def test_every_rendered_object_passes_its_rules(stack_file, api, queued):
    raw = {**_config(stack_file, api), **({"queueName": "team-a", "workloadPriorityClass": "batch-low"} if queued else {})}
    objects = _objects(render(raw))
    assert objects, "no Kubeflow object rendered"
    for kind, obj in objects.items():
        assert cel.validate(kind, obj) == []


# Changes a user makes between two `pulumi up`s (the job API's own keys on top of a preset).
CHANGES = {
    "image": {"image": "ghcr.io/x/trainer:2.0"},
    "workers": {"workers": 4},
    "learning-rate": {"training": {"learningRate": 1e-5}},
    "resources": {"resources": {"cpu": "2000m", "memory": "0.5Ti"}},
    "queue": {"queueName": "team-b"},
    "priority": {"priorityClassName": "batch-high"},
    "deadline": {"activeDeadlineSeconds": 3600},
    "labels-only: a new run id": {"runId": "second"},
}


def _action(declared_old, declared_new) -> str:
    """What the engine does to a resource between two renders: create (a new name), replace (a change
    under a replace_on_changes path), update, or same."""
    old, new = declared_old.manifest(), declared_new.manifest()
    if old["metadata"]["name"] != new["metadata"]["name"]:
        return "create"
    if old == new:
        return "same"
    paths = declared_new.options.replace_on_changes or [] if declared_new.options else []
    if any(_at(old, p) != _at(new, p) for p in paths):
        return "replace"
    return "update"


def _at(obj, dotted):
    for key in dotted.split("."):
        obj = obj.get(key) if isinstance(obj, dict) else None
    return obj


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_later_pulumi_up_never_breaks_a_transition_rule(api, change):
    base = {**DS, "jobApi": api, "queueName": "team-a"}
    before, after = render(base), render({**base, **CHANGES[change]})
    actions = {}
    for kind in CHECKED:
        olds, news = before.of_kind(kind), after.of_kind(kind)
        if not olds or not news:
            continue
        action = actions[kind] = _action(olds[0], news[0])
        stored = cel.kueue_created(olds[0].manifest()) if kind == "TrainJob" else olds[0].manifest()
        if action == "update":  # in place: the API server checks the new object against the stored one
            new = news[0].manifest()
            if kind == "TrainJob":  # server-side apply keeps what others own: Kueue's patch and its suspend
                new["spec"]["runtimePatches"] = stored["spec"]["runtimePatches"]
            assert cel.validate(kind, new, old=stored) == [], f"{kind} updated in place"
    # The job is replaced whenever its spec changes; in place only for metadata.
    job_kind = "TrainJob" if api == "trainer-v2" else "PyTorchJob"
    assert actions[job_kind] in ("replace", "update", "same")
    if change == "queue":  # Kueue's webhook refuses a new queue-name label on a running job: a new workload
        assert actions[job_kind] == "replace"
    if api == "trainer-v2" and change in ("image", "learning-rate", "resources", "priority", "workers"):
        assert actions["TrainingRuntime"] in ("create", "same") and actions["TrainJob"] == "replace"


@pytest.mark.parametrize("stack_file", STACKS, ids=lambda p: p.name)
def test_kueue_starts_a_queued_trainjob_without_a_cel_violation(stack_file):
    raw = {**_config(stack_file, "trainer-v2"), "queueName": "team-a", "workloadPriorityClass": "batch-low",
           "activeDeadlineSeconds": 7200}
    raw["resources"] = {**raw.get("resources", {}), "cpu": "3500m", "memory": "24576Mi"}  # written unlike Go
    raw["extraEnv"] = {**raw.get("extraEnv", {}), "SET_BUT_EMPTY": ""}  # Go drops `value: ""`
    job = render(raw).one("TrainJob")
    assert "runtimePatches" not in job["spec"], "the stack's pod settings belong in its runtime"
    stored = cel.kueue_created(job)
    started = cel.kueue_start(stored, {"cloud.google.com/machine-family": "c3"},
                              [{"key": "spot", "operator": "Exists", "effect": "NoSchedule"}])
    assert started["spec"]["trainer"] == stored["spec"]["trainer"], "spec.trainer must come back as written"
    assert cel.validate("TrainJob", started, old=stored) == []


def test_the_models_catch_what_broke_kueues_start_upstream():
    """A user's own cluster runtime gets the pod settings as a runtime patch (and queueing is refused
    there): under Kueue's round trip that patch's containers change, which is kubeflow/trainer#3888."""
    job = render({**DS, "jobApi": "trainer-v2", "trainerRuntime": "torch-distributed-xeon"}).one("TrainJob")
    stored = cel.kueue_created(job)
    found = cel.validate("TrainJob", cel.kueue_start(stored, {}, []), old=stored)
    assert any(v.rule == "self == oldSelf" and "containers" in v.path for v in found), found


def _mutations():
    v2 = render({**DS, "jobApi": "trainer-v2", "queueName": "team-a"})
    job, runtime = v2.one("TrainJob"), v2.one("TrainingRuntime")
    v1 = render({**DS, "queueName": "team-a"}).one("PyTorchJob")

    def renamed(j):
        j["metadata"]["name"] = "Fine_Tune"
        return "TrainJob", j, None

    def image_in_place(j):
        old = copy.deepcopy(j)
        j["spec"]["trainer"]["image"] = "other:1"
        return "TrainJob", j, old

    def unnormalized_quantity(j):
        j["spec"]["trainer"]["resourcesPerNode"]["limits"]["cpu"] = "4000m"
        stored = cel.kueue_created(j)
        return "TrainJob", cel.kueue_start(stored, {}, []), stored

    def two_frameworks(r):
        r["spec"]["mlPolicy"]["mpi"] = {}
        return "TrainingRuntime", r, None

    def queue_in_place(p):
        old = copy.deepcopy(p)
        p["spec"]["runPolicy"]["schedulingPolicy"] = {"queue": "b"}
        old["spec"]["runPolicy"]["schedulingPolicy"] = {"queue": "a"}
        return "PyTorchJob", p, old

    return [(renamed, job, "metadata.name"), (image_in_place, job, "trainer"),
            (unnormalized_quantity, job, "trainer"), (two_frameworks, runtime, "mlPolicy"),
            (queue_in_place, v1, "queue")]


@pytest.mark.parametrize("index", range(5))
def test_a_violated_rule_is_caught(index):
    mutate, obj, where = _mutations()[index]
    kind, new, old = mutate(copy.deepcopy(obj))
    found = cel.validate(kind, new, old=old)
    assert found and any(where.split(".")[-1] in (v.path + v.rule) for v in found), found


# Rules no object of the stack reaches, and why (the rest must all have been evaluated above).
PATCH_POD = ".spec.runtimePatches[*].trainingRuntimeSpec.template.spec.replicatedJobs[*].template.spec.template.spec"
UNREACHED = {
    ("TrainJob", ".spec.initializer"): "no initializer: the trainer downloads onto the shared volume itself",
    ("TrainJob", ".spec.initializer.dataset.storageUri"): "no initializer",
    ("TrainJob", ".spec.initializer.model.storageUri"): "no initializer",
    ("TrainJob", f"{PATCH_POD}.imagePullSecrets"): "not set by the stack",
    ("TrainJob", f"{PATCH_POD}.initContainers"): "not set by the stack",
    ("TrainJob", f"{PATCH_POD}.serviceAccountName"): "not set by the stack",
    ("TrainJob", ".status.trainerStatus"): "status: the trainer's progress report (tests/trainer/test_progress.py)",
    ("TrainingRuntime", ".spec.mlPolicy.flux.numProcPerNode"): "torch, not flux",
    ("TrainingRuntime", ".spec.mlPolicy.torch.envInjection.targets[*].containerNames"): "no env injection",
    ("TrainingRuntime", ".spec.template.spec.failurePolicy"): "not set by the stack",
    ("TrainingRuntime", ".spec.template.spec.network"): "not set by the stack",
    ("TrainingRuntime", ".spec.template.spec.startupPolicy"): "not set by the stack",
    ("TrainingRuntime", ".spec.template.spec.successPolicy"): "not set by the stack",
    ("TrainingRuntime", ".spec.template.spec.volumeClaimPolicies"): "the claim is the stack's own PVC",
    ("TrainingRuntime", ".spec.template.spec.volumeClaimPolicies[*]"): "the claim is the stack's own PVC",
    ("TrainingRuntime", ".spec.template.spec.replicatedJobs[*].dependsOn"): "one replicated job",
}


def test_every_rule_the_stack_reaches_is_evaluated(monkeypatch):
    seen = set()
    original = cel._walk

    def spy(kind, node, value, old, path, out):
        for r in node.get("x-kubernetes-validations") or []:
            if "oldSelf" not in r["rule"] or old is not cel.MISSING:
                seen.add((kind, re.sub(r"\[\d+\]", "[*]", path) or "."))
        return original(kind, node, value, old, path, out)

    monkeypatch.setattr(cel, "_walk", spy)
    for api in APIS:
        test_every_rendered_object_passes_its_rules(STACKS[0], api, True)
        for change in CHANGES:
            test_a_later_pulumi_up_never_breaks_a_transition_rule(api, change)
    test_kueue_starts_a_queued_trainjob_without_a_cel_violation(STACKS[0])
    test_the_models_catch_what_broke_kueues_start_upstream()
    for index in range(5):
        test_a_violated_rule_is_caught(index)
    every = {("TrainingRuntime" if kind == "ClusterTrainingRuntime" else kind, path, r["rule"])
             for kind in ("TrainJob", "ClusterTrainingRuntime", "PyTorchJob") for path, r in cel.rules(cel.schema(kind))}
    missed = {(kind, path) for kind, path, rule in every if (kind, path) not in seen}
    assert missed <= set(UNREACHED), sorted(missed - set(UNREACHED))
    assert len(every) - len(missed) >= 13


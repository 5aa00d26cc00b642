"""Render the Pulumi program under Pulumi's own mocks and validate what it declares."""

from __future__ import annotations

import copy
import functools
import json
import runpy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pulumi
import yaml

from infra.jobs import trainjob

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "reference" / "kubeflow-training-operator"
TRAINER_V2 = ROOT / "reference" / "kubeflow-trainer-v2"
KUBERNETES_VERSION = "1.30.0"
SECRET_SIG = "4dabf18193072939515e22adb298388d"  # pulumi's marker for a secret value in mock inputs


@dataclass
class Declared:
    typ: str
    name: str
    inputs: dict
    secret_paths: list[str] = field(default_factory=list)
    provider: Any = None
    resource_id: Any = None
    options: Any = None
    """The ResourceOptions the program passed (retain, replace, provider, import...)."""

    @property
    def kind(self) -> str:
        return self.typ.rsplit(":", 1)[-1]

    def manifest(self) -> dict:
        """The object as the provider would send it: secrets unwrapped, whole floats back to ints."""
        return _plain(self.inputs)


def _plain(value):
    if isinstance(value, dict):
        if SECRET_SIG in value:
            return _plain(value.get("value"))
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)  # protobuf Struct carries every number as a double
    return value


class Recorder(pulumi.runtime.Mocks):
    def __init__(self):
        self.resources: list[Declared] = []
        self.options: dict[str, Any] = {}

    def new_resource(self, args: pulumi.runtime.MockResourceArgs):
        self.resources.append(Declared(args.typ, args.name, copy.deepcopy(args.inputs), provider=args.provider,
                                       resource_id=args.resource_id, options=self.options.get(args.name)))
        return [args.resource_id or f"{args.name}-id", args.inputs]

    def call(self, args: pulumi.runtime.MockCallArgs):
        return {}


@dataclass
class Rendered:
    resources: list[Declared]
    outputs: dict[str, Any]

    def of_kind(self, kind: str) -> list[Declared]:
        return [r for r in self.resources if r.kind == kind]

    def one(self, kind: str) -> dict:
        found = self.of_kind(kind)
        assert len(found) == 1, f"expected one {kind}, got {[r.name for r in found]}"
        return found[0].manifest()


def config_values(raw: dict[str, Any]) -> dict[str, str]:
    """Stack config as the Pulumi engine hands it to the program: strings, objects as JSON."""
    return {f"llm-finetune:{k}": v if isinstance(v, str) else json.dumps(v) for k, v in raw.items()}


def render(raw: dict[str, Any], *, secret_keys: tuple[str, ...] = ("hfToken", "mlflowTrackingToken", "wandbApiKey"),
           stack: str = "test") -> Rendered:
    """Run __main__.py under mocks with this stack config; return what it declared and exported."""
    recorder = Recorder()
    pulumi.runtime.set_mocks(recorder, project="llm-finetune", stack=stack, preview=False)
    pulumi.runtime.set_all_config(config_values(raw), [f"llm-finetune:{k}" for k in secret_keys if k in raw])
    exported: dict[str, Any] = {}
    original_export = pulumi.export

    def capture(name, value):
        exported[name] = value
        original_export(name, value)

    original_init = pulumi.CustomResource.__init__

    def remember_options(self, t, name, props=None, opts=None, *args, **kwargs):
        # The mocks see inputs, not options: record what the program asked of the engine.
        recorder.options[name] = opts
        return original_init(self, t, name, props, opts, *args, **kwargs)

    @pulumi.runtime.test
    def program():
        pulumi.export = capture
        pulumi.CustomResource.__init__ = remember_options
        try:
            runpy.run_path(str(ROOT / "__main__.py"), run_name="__main__")
        finally:
            pulumi.export = original_export
            pulumi.CustomResource.__init__ = original_init
        return pulumi.Output.all(**{k: pulumi.Output.from_input(v) for k, v in exported.items()})

    program()
    resolved: dict[str, Any] = {}

    @pulumi.runtime.test
    def collect():
        return pulumi.Output.all(**exported).apply(resolved.update)

    collect()
    return Rendered(recorder.resources, resolved)


def stack_config(stack_file: Path) -> dict[str, Any]:
    doc = yaml.safe_load(stack_file.read_text())
    return {k.split(":", 1)[1]: v for k, v in (doc.get("config") or {}).items() if k.startswith("llm-finetune:")}


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


def validate_core(manifest: dict) -> None:
    """Against the Kubernetes JSON schemas, strictly (unknown fields are errors)."""
    kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)


@functools.lru_cache(maxsize=1)
def pytorchjob_schema() -> dict:
    crd = yaml.safe_load((REFERENCE / "kubeflow.org_pytorchjobs.yaml").read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return _strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))


def _strict(node):
    """The API server prunes unknown fields silently; make them errors so a typo cannot hide."""
    if isinstance(node, dict):
        if "properties" in node and "additionalProperties" not in node \
                and not node.get("x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
        for value in node.values():
            _strict(value)
    elif isinstance(node, list):
        for value in node:
            _strict(value)
    return node


_DNS1035 = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"


def validate_pytorchjob(job: dict) -> None:
    """The operator's CRD schema plus the webhook rules in reference/.../NOTES.md."""
    jsonschema.validate(job, pytorchjob_schema())
    import re

    name = job["metadata"]["name"]
    assert re.match(_DNS1035, name) and len(name) <= 63, f"metadata.name {name!r} is not a DNS-1035 label"
    specs = job["spec"].get("pytorchReplicaSpecs")
    assert specs, "spec.pytorchReplicaSpecs is required"
    assert set(specs) <= {"Master", "Worker"}, f"replica types {sorted(specs)}: only Master and Worker"
    for rtype, spec in specs.items():
        containers = spec["template"]["spec"].get("containers") or []
        assert containers, f"{rtype} needs at least one container"
        assert all(c.get("image") for c in containers), f"{rtype}: every container needs an image"
        assert any(c.get("name") == "pytorch" for c in containers), f"{rtype}: a container must be named pytorch"
    if "Master" in specs:
        assert specs["Master"].get("replicas") == 1, "Master.replicas must be 1"
    if "Worker" in specs and specs["Worker"].get("replicas") is not None:
        assert specs["Worker"]["replicas"] >= 1, "Worker.replicas must be >= 1"
    elastic = job["spec"].get("elasticPolicy")
    if elastic is not None:
        assert "Worker" in specs, "elasticPolicy needs a Worker replica spec"
        assert not ("nProcPerNode" in elastic and "nprocPerNode" in job["spec"]), \
            "set spec.nprocPerNode, not both it and the deprecated elasticPolicy.nProcPerNode"
        assert elastic.get("rdzvBackend", "c10d") in ("c10d", "etcd", "etcd-v2")
        if elastic.get("minReplicas") is not None and elastic.get("maxReplicas") is not None:
            assert elastic["minReplicas"] <= elastic["maxReplicas"]


@functools.lru_cache(maxsize=1)
def trainjob_schema() -> dict:
    crd = yaml.safe_load((TRAINER_V2 / "trainer.kubeflow.org_trainjobs.yaml").read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1")
    return _strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))


@functools.lru_cache(maxsize=1)
def torch_runtime() -> dict:
    return yaml.safe_load((TRAINER_V2 / "torch_distributed.yaml").read_text())


def validate_trainjob(job: dict) -> None:
    """The TrainJob CRD's schema (strict) plus, by hand, its CEL rules and the torch plugin's
    (NOTES.md): what jsonschema does not check."""
    import re

    jsonschema.validate(job, trainjob_schema())
    name = job["metadata"]["name"]
    assert re.match(r"^[a-z]([-a-z0-9]*[a-z0-9])?$", name), f"metadata.name {name!r} is not an RFC 1035 label"
    assert len(name) <= 63, f"metadata.name {name!r} is longer than 63 characters"
    spec = job["spec"]
    patches = spec.get("runtimePatches") or []
    assert len(patches) <= 16, "at most 16 runtimePatches"
    managers = [p["manager"] for p in patches]
    assert len(managers) == len(set(managers)), "runtimePatches are keyed by manager"
    trainer = spec["trainer"]
    reserved = {"PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT"}
    assert not reserved & {e["name"] for e in trainer.get("env", [])}, "trainer.env sets a name the torch plugin reserves"
    assert isinstance(trainer.get("numProcPerNode"), int), "numProcPerNode must be set, an integer (CPU: else one per core)"
    if spec["runtimeRef"]["name"] == "torch-distributed":
        runtime_jobs = {r["name"] for r in torch_runtime()["spec"]["template"]["spec"]["replicatedJobs"]}
        for patch in patches:
            for rj in patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]:
                assert rj["name"] in runtime_jobs, f"runtimePatches name replicated job {rj['name']!r} the runtime lacks"
                for c in rj["template"]["spec"]["template"]["spec"].get("containers", []):
                    assert "env" not in c, "env goes in spec.trainer.env, not through runtimePatches"


@functools.lru_cache(maxsize=1)
def trainingruntime_schema() -> dict:
    """A namespaced TrainingRuntime: at v2.3.0 its CRD's spec schema is the ClusterTrainingRuntime's
    (compared field by field: only the description differs), so the reference CRD validates it."""
    crd = yaml.safe_load((TRAINER_V2 / "trainer.kubeflow.org_clustertrainingruntimes.yaml").read_text())
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1")
    schema = _strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
    schema["properties"]["kind"] = {"type": "string", "enum": ["TrainingRuntime"]}
    return schema


def validate_trainingruntime(runtime: dict) -> None:
    jsonschema.validate(runtime, trainingruntime_schema())
    jobs = runtime["spec"]["template"]["spec"]["replicatedJobs"]
    reference = torch_runtime()["spec"]
    assert runtime["spec"]["mlPolicy"] == reference["mlPolicy"], "not the torch-distributed runtime's ML policy"
    assert [j["name"] for j in jobs] == [j["name"] for j in reference["template"]["spec"]["replicatedJobs"]]
    for rj, ref in zip(jobs, reference["template"]["spec"]["replicatedJobs"]):
        assert rj["template"]["metadata"]["labels"] == ref["template"]["metadata"]["labels"], \
            "the trainer's ancestor label (which replicated job gets spec.trainer)"
        names = [c["name"] for c in rj["template"]["spec"]["template"]["spec"]["containers"]]
        assert names == [c["name"] for c in ref["template"]["spec"]["template"]["spec"]["containers"]]


def effective_pod_spec(job: dict, runtime: dict) -> dict:
    """The `node` pod spec the Trainer controller builds (the tests' model of it): the runtime's template with the patches
    applied (containers merged by name). What the Pod Security Standard is checked against."""
    base = next(r for r in runtime["spec"]["template"]["spec"]["replicatedJobs"] if r["name"] == trainjob.CONTAINER)
    spec = copy.deepcopy(base["template"]["spec"]["template"]["spec"])
    for patch in job["spec"].get("runtimePatches", []):
        for rj in patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]:
            if rj["name"] != trainjob.CONTAINER:
                continue
            pod_patch = rj["template"]["spec"]["template"]["spec"]
            for key, value in pod_patch.items():
                if key != "containers":
                    spec[key] = copy.deepcopy(value)
            for c in pod_patch.get("containers", []):
                target = next(x for x in spec["containers"] if x["name"] == c["name"])
                target.update(copy.deepcopy(c))
    node = next(x for x in spec["containers"] if x["name"] == trainjob.CONTAINER)
    trainer = job["spec"]["trainer"]
    node.update(
        {
            "image": trainer["image"],
            "command": trainer["command"],
            "env": trainer["env"],
            "resources": trainer["resourcesPerNode"],
        }
    )
    return spec


def effective_trainjob_pod(job: dict, runtimes: Any = ()) -> dict:
    """The node pod of a TrainJob: from the rendered TrainingRuntime it references, else torch-distributed."""
    ref = job["spec"]["runtimeRef"]
    runtime = torch_runtime()
    if ref.get("kind") == "TrainingRuntime":
        (runtime,) = [r for r in runtimes if r["metadata"]["name"] == ref["name"]]
    return effective_pod_spec(job, runtime)


def validate_all(rendered: Rendered) -> None:
    from tests.infra import cel

    for r in rendered.resources:
        if r.kind in cel.CRDS:  # the CRD's CEL rules too (tests/infra/cel.py)
            assert cel.validate(r.kind, r.manifest()) == [], r.name
        if r.kind == "PyTorchJob":
            validate_pytorchjob(r.manifest())
        elif r.kind == "TrainJob":
            job = r.manifest()
            validate_trainjob(job)
            # The pod the controller builds from runtime + patches is a valid Kubernetes pod spec.
            validate_core({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "node-0"},
                           "spec": effective_trainjob_pod(job, runtimes(rendered))})
        elif r.kind == "TrainingRuntime":
            validate_trainingruntime(r.manifest())
        elif r.typ.startswith("kubernetes:"):
            validate_core(r.manifest())


def pod_specs(rendered: Rendered) -> dict[str, dict]:
    """Every pod spec the stack controls, by owner."""
    out = {}
    for r in rendered.resources:
        m = r.manifest()
        if r.kind == "Pod":
            out[r.name] = m["spec"]
        elif r.kind == "StatefulSet":
            out[r.name] = m["spec"]["template"]["spec"]
        elif r.kind == "Job":
            out[r.name] = m["spec"]["template"]["spec"]
        elif r.kind == "PyTorchJob":
            for rtype, spec in m["spec"]["pytorchReplicaSpecs"].items():
                out[f"{r.name}/{rtype}"] = spec["template"]["spec"]
        elif r.kind == "TrainJob":
            out[f"{r.name}/node"] = effective_trainjob_pod(m, runtimes(rendered))
    return out


def runtimes(rendered: Rendered) -> list[dict]:
    return [r.manifest() for r in rendered.of_kind("TrainingRuntime")]


# The one pod that needs more than restricted, and why (infra/storage.py ownership_job_manifest):
# changing the owner of a root-owned ReadWriteMany share needs root with CHOWN/FOWNER/DAC_OVERRIDE.
BASELINE_ONLY = ("-volume-prep",)


def assert_pod_security(pod_spec: dict, where: str) -> None:
    """Restricted for every pod, except the documented one-shot volume preparation: baseline."""
    if where.endswith(BASELINE_ONLY):
        assert_baseline(pod_spec, where)
    else:
        assert_restricted(pod_spec, where)


def assert_baseline(pod_spec: dict, where: str) -> None:
    """The baseline Pod Security Standard (v1.30): no privilege, host namespaces, hostPath or added
    capabilities beyond the default set."""
    default_caps = {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD", "NET_BIND_SERVICE",
                    "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"}
    assert not pod_spec.get("hostNetwork") and not pod_spec.get("hostPID") and not pod_spec.get("hostIPC"), where
    assert all("hostPath" not in v for v in pod_spec.get("volumes") or []), f"{where}: hostPath"
    for c in pod_spec["containers"] + pod_spec.get("initContainers", []):
        sc = c.get("securityContext") or {}
        assert not sc.get("privileged"), f"{where}/{c['name']}: privileged"
        assert set(sc.get("capabilities", {}).get("add", [])) <= default_caps, f"{where}/{c['name']}: capabilities"
        assert not any(p.get("hostPort") for p in c.get("ports", [])), f"{where}/{c['name']}: hostPort"


def assert_restricted(pod_spec: dict, where: str) -> None:
    """The restricted Pod Security Standard (v1.30), the checks that apply to our pods."""
    psc = pod_spec.get("securityContext") or {}
    assert psc.get("seccompProfile", {}).get("type") in ("RuntimeDefault", "Localhost"), f"{where}: seccomp"
    assert not pod_spec.get("hostNetwork") and not pod_spec.get("hostPID") and not pod_spec.get("hostIPC"), where
    for v in pod_spec.get("volumes") or []:
        allowed = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                   "projected", "secret"}
        assert set(v) - {"name"} <= allowed, f"{where}: volume type {set(v) - {'name'}} not allowed"
    for c in pod_spec["containers"] + pod_spec.get("initContainers", []):
        sc = c.get("securityContext") or {}
        assert sc.get("allowPrivilegeEscalation") is False, f"{where}/{c['name']}: allowPrivilegeEscalation"
        assert sc.get("capabilities", {}).get("drop") == ["ALL"], f"{where}/{c['name']}: drop ALL"
        assert not set(sc.get("capabilities", {}).get("add", [])) - {"NET_BIND_SERVICE"}
        non_root = sc.get("runAsNonRoot", psc.get("runAsNonRoot"))
        assert non_root is True, f"{where}/{c['name']}: runAsNonRoot"
        assert sc.get("runAsUser", psc.get("runAsUser")) != 0, f"{where}/{c['name']}: runAsUser 0"
        assert not sc.get("privileged"), f"{where}/{c['name']}: privileged"
        assert not any(p.get("hostPort") for p in c.get("ports", [])), f"{where}/{c['name']}: hostPort"

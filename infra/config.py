"""Stack config: parsed once into frozen dataclasses and validated before any resource exists.

Every key is declared (type, default, description) in Pulumi.yaml; the defaults below are read
from there, not repeated. A wrong value raises :class:`StackConfigError` (a ``pulumi.RunError``,
so ``pulumi preview`` prints one clean message) naming the key, the stack file and line, and the
value that would be valid.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import typing
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Optional

import yaml
from pulumi import RunError  # printed without a traceback

from infra import quantity
from trainer.config import (
    ConfigError,
    DataConfig,
    LoraConfig,
    QuantizeConfig,
    TrainerConfig,
    TrackingConfig,
    TrainingConfig,
    key_lines,
    world_problem,
)

PROJECT = "llm-finetune"
ROOT = Path(__file__).resolve().parent.parent


class StackConfigError(RunError):
    """Bad stack config: names the key, where it is set and the fix."""


# Mount points inside the worker pods (the trainer config refers to them).
DATA_MOUNT = "/data"
CONFIG_MOUNT = "/etc/llm-finetune"
TOKEN_MOUNT = "/var/run/secrets/huggingface"
TOKEN_KEY = "token"

_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
# Kubernetes resource.Quantity grammar (apimachinery quantity.go): sign, digits, optional suffix.
_QUANTITY = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E|[eE][+-]?\d+)?$")
_ETCD_TAG = re.compile(r":v?3\.5\.\d+(-[0-9A-Za-z.]+)?(@sha256:[0-9a-f]{64})?$")
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
# A label value (apimachinery validation.IsValidLabelValue): Kueue's queue-name is a label.
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
# Tracker credentials: stack secrets -> keys of the tracking Secret, mounted as files in the workers.
TRACKER_SECRETS = {"mlflowTrackingToken": ("mlflow", "mlflow-token"), "wandbApiKey": ("wandb", "wandb-api-key")}
TRACKING_MOUNT = "/var/run/secrets/llm-finetune-tracking"
SYSTEM_PRIORITIES = ("system-node-critical", "system-cluster-critical")
ACCESS_MODES = ("ReadWriteMany", "ReadWriteOnce", "ReadWriteOncePod", "ReadOnlyMany")
ADOPT = ("upsert", "import", "none")
JOB_APIS = ("training-operator-v1", "trainer-v2")  # one module each in infra/jobs
# Trainer v2 (v2.2+) has no elastic policy and no etcd rendezvous (its torch plugin injects a static
# rendezvous on node 0), and no run policy of the PyTorchJob kind.
V1_ONLY = ("minWorkers", "maxWorkers", "maxRestarts", "etcdReplicas", "etcdImage", "etcdStorage", "runPolicy")
RESERVED_ENV = ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT")
CLEAN_POD_POLICIES = ("None", "Running", "All")
TORCH_RUNTIME = "torch-distributed"  # the ClusterTrainingRuntime Trainer v2 installs
TOKEN_ENV_NAMES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_TOKEN")


@lru_cache(maxsize=1)
def schema() -> dict[str, dict[str, Any]]:
    """Every stack key -> {type, default, description[, properties]}, read from Pulumi.yaml.

    Scalar keys come from its `config:` block; object keys from `x-nested-config` (Pulumi's
    project schema has no object type), their default built from their properties' defaults.
    """
    doc = yaml.safe_load((ROOT / "Pulumi.yaml").read_text())
    keys = {k.split(":", 1)[-1]: v for k, v in doc["config"].items()}
    for name, spec in doc["x-nested-config"].items():
        props = spec.get("properties")
        keys[name] = {**spec, "type": "object", "default": {k: p.get("default") for k, p in props.items()} if props else {}}
    return keys


def stack_file_lines(stack: str, directory: Path = ROOT) -> tuple[str, dict[tuple[str, ...], int]]:
    """Line of every `llm-finetune:` key (and nested key) in Pulumi.<stack>.yaml, for error messages."""
    path = directory / f"Pulumi.{stack}.yaml"
    if not path.exists():
        return "", {}
    node = yaml.compose(path.read_text(), Loader=yaml.SafeLoader)
    lines: dict[tuple[str, ...], int] = {}
    if node is not None:
        for k, v in getattr(node, "value", []):
            if k.value == "config" and isinstance(v, yaml.MappingNode):
                for ck, cv in v.value:
                    name = str(ck.value)
                    if name.startswith(PROJECT + ":"):
                        key = (name.split(":", 1)[1],)
                        lines[key] = ck.start_mark.line + 1
                        lines.update(key_lines(cv, key))
    return path.name, lines


# --------------------------------------------------------------------------------------------
# The parsed config
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Toleration:
    key: Optional[str]
    operator: str
    value: Optional[str]
    effect: Optional[str]


@dataclass(frozen=True)
class Resources:
    cpu: str
    memory: str
    gpus: int
    shm_size: str
    node_selector: tuple[tuple[str, str], ...]
    tolerations: tuple[Toleration, ...]


@dataclass(frozen=True)
class Storage:
    class_name: Optional[str]
    size: str
    access_mode: str
    create_class: bool
    provisioner: str
    parameters: tuple[tuple[str, str], ...]
    volume_binding_mode: str
    retain_on_destroy: bool
    adopt: str
    prepare_ownership: bool


@dataclass(frozen=True)
class StackConfig:
    namespace: str
    job_name: str
    image: str
    image_pull_policy: str
    workers: int
    min_workers: int
    max_workers: int
    procs_per_worker: int
    max_restarts: int
    rendezvous: str
    etcd_replicas: int
    etcd_image: str
    data_access_image: str
    resources: Resources
    storage: Storage
    intel_runtime: bool
    extra_env: tuple[tuple[str, str], ...]
    clean_pod_policy: str
    ttl_seconds_after_finished: int
    has_token: bool
    job_api: str
    trainer_runtime: str
    run_id: str
    run_hash: str
    """The run's identity: the trainer config and runId (output directory, ConfigMap name)."""
    grace_seconds: int
    launch_attempts: int
    etcd_storage: str
    queue_name: str
    """Kueue LocalQueue ('' : not queued): the kueue.x-k8s.io/queue-name label of the training job."""
    priority_class: str
    """PriorityClass of the worker pods ('' : the cluster's default)."""
    workload_priority_class: str
    """Kueue WorkloadPriorityClass ('' : none): the kueue.x-k8s.io/priority-class label of the job."""
    active_deadline_seconds: int
    """Seconds the job may run before its operator stops it (0: no deadline)."""
    tracker_secrets: tuple[str, ...]
    """Stack secrets holding tracker credentials (keys of TRACKER_SECRETS) that are set."""
    trainer: TrainerConfig = field(repr=False)

    @property
    def output_dir(self) -> str:
        return self.trainer.output_dir

    @property
    def config_path(self) -> str:
        return f"{CONFIG_MOUNT}/config.yaml"


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------


class _Ctx:
    def __init__(self, raw: Mapping[str, Any], source: str, lines: Mapping[tuple[str, ...], int]):
        self.raw = raw
        self.source = source
        self.lines = lines

    def fail(self, key: str, message: str) -> typing.NoReturn:
        path = tuple(key.split("."))
        where = ""
        for depth in range(len(path), 0, -1):
            if path[:depth] in self.lines:
                where = f" ({self.source} line {self.lines[path[:depth]]})"
                break
        if not where and self.source:
            where = f" (stack file {self.source})"
        raise StackConfigError(f"config key '{PROJECT}:{key}'{where}: {message}")

    def get(self, key: str) -> Any:
        top, _, rest = key.partition(".")
        value = self.raw.get(top)
        if rest:
            value = value.get(rest) if isinstance(value, Mapping) else None
        if value is None:
            spec = schema()[top]
            default = spec.get("default")
            if rest:
                default = (default or {}).get(rest) if isinstance(default, Mapping) else None
            return default
        return value

    def integer(self, key: str, minimum: int) -> int:
        value = self.get(key)
        if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(key, f"must be an integer >= {minimum}, got {value!r}. Fix: pulumi config set {key} {max(minimum, 1)}")
        if value < minimum:
            self.fail(key, f"must be >= {minimum}, got {value}. Fix: pulumi config set {key} {max(minimum, 1)}")
        return value

    def boolean(self, key: str) -> bool:
        value = self.get(key)
        if isinstance(value, str) and value.lower() in ("true", "false"):
            value = value.lower() == "true"
        if not isinstance(value, bool):
            self.fail(key, f"must be true or false, got {value!r}")
        return value

    def string(self, key: str, choices: tuple[str, ...] = ()) -> str:
        value = self.get(key)
        if not isinstance(value, str) or not value:
            self.fail(key, f"must be a non-empty string, got {value!r}")
        if choices and value not in choices:
            near = difflib.get_close_matches(value, choices, n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            self.fail(key, f"invalid value {value!r}{hint}; valid values: {', '.join(choices)}")
        return value

    def quantity(self, key: str) -> str:
        value = self.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str) or not _QUANTITY.match(value.strip()):
            self.fail(
                key,
                f"{value!r} is not a Kubernetes quantity; write it like 16Gi, 512Mi, 8 or 500m "
                "(binary suffixes Ki Mi Gi Ti, no space)",
            )
        try:
            # The form the API's Go clients write back (Kueue's update of a queued job): "2000m" -> "2".
            return quantity.canonical(value)
        except quantity.QuantityError as e:
            self.fail(key, str(e))

    def mapping(self, key: str) -> Mapping[str, Any]:
        value = self.get(key)
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.fail(key, f"must be an object (set nested keys with pulumi config set --path {key}.NAME VALUE), got {value!r}")
        return value


def _known_keys(ctx: _Ctx) -> None:
    known = schema()
    for key in ctx.raw:
        if key not in known:
            near = difflib.get_close_matches(key, list(known), n=1)
            hint = f"; did you mean '{near[0]}'?" if near else ""
            ctx.fail(key, f"unknown key{hint} (Pulumi.yaml lists every key). Fix: pulumi config rm {key}")
    for section in ("resources", "storage", "dataset", "runPolicy", "tracking"):
        allowed = list(known[section]["properties"])
        for sub in ctx.mapping(section):
            if sub not in allowed and _camel(sub) not in allowed:  # the trainer's snake_case works too
                near = difflib.get_close_matches(sub, allowed, n=1)
                hint = f"; did you mean '{near[0]}'?" if near else ""
                ctx.fail(f"{section}.{sub}", f"unknown key{hint}; valid keys: {', '.join(allowed)}")


def parse(
    raw: Mapping[str, Any],
    *,
    source: str = "",
    lines: Optional[Mapping[tuple[str, ...], int]] = None,
    token_is_secret: Optional[bool] = None,
    plain: tuple[str, ...] = (),
) -> StackConfig:
    """Parse raw stack config (key -> value, objects already decoded) into a validated StackConfig, one
    section at a time; what spans sections (the world size against the trainer config, GPUs against
    processes) is checked last.

    ``token_is_secret`` is False when hfToken was set without --secret, and ``plain`` names the other
    secret keys (tracker credentials) set that way: refused, since the value would then sit in plain
    text in the stack file and the state.
    """
    ctx = _Ctx(raw, source, lines or {})
    _known_keys(ctx)
    has_token, tracker_secrets = _secrets(ctx, token_is_secret, plain)
    job_name, namespace = _names(ctx)
    job_api, trainer_runtime = _job_api(ctx)
    workers = _workers(ctx)
    rendezvous, etcd_replicas, etcd_image = _rendezvous(ctx, job_api)
    image, pull = _image(ctx)
    resources = _resources(ctx)
    storage = _storage(ctx, workers.maximum)
    extra_env = _extra_env(ctx)
    run_id = str(ctx.get("runId") or "")
    trainer_cfg, run_hash = _trainer_config(ctx, job_name, run_id)
    _world(ctx, trainer_cfg, workers, resources.gpus)
    queue, priority, workload_priority = _scheduling(ctx, job_api, trainer_runtime)
    _trackers(ctx, trainer_cfg, tracker_secrets)
    return StackConfig(
        namespace=namespace,
        job_name=job_name,
        image=image,
        image_pull_policy=pull,
        workers=workers.workers,
        min_workers=workers.minimum,
        max_workers=workers.maximum,
        procs_per_worker=workers.procs,
        max_restarts=ctx.integer("maxRestarts", 0),
        rendezvous=rendezvous,
        etcd_replicas=etcd_replicas,
        etcd_image=etcd_image,
        data_access_image=ctx.string("dataAccessImage"),
        resources=resources,
        storage=storage,
        intel_runtime=ctx.boolean("intelRuntime"),
        extra_env=extra_env,
        clean_pod_policy=ctx.string("runPolicy.cleanPodPolicy", CLEAN_POD_POLICIES),
        ttl_seconds_after_finished=ctx.integer("runPolicy.ttlSecondsAfterFinished", 0),
        has_token=has_token,
        job_api=job_api,
        trainer_runtime=trainer_runtime,
        run_id=run_id,
        run_hash=run_hash,
        grace_seconds=ctx.integer("terminationGracePeriodSeconds", 30),
        launch_attempts=ctx.integer("launchAttempts", 1),
        etcd_storage=ctx.quantity("etcdStorage"),
        queue_name=queue,
        priority_class=priority,
        workload_priority_class=workload_priority,
        active_deadline_seconds=ctx.integer("activeDeadlineSeconds", 0),
        tracker_secrets=tracker_secrets,
        trainer=trainer_cfg,
    )


def _secrets(ctx: _Ctx, token_is_secret: Optional[bool], plain: tuple[str, ...]) -> tuple[bool, tuple[str, ...]]:
    """hfToken and the tracker credentials: whether each is set, refused where set without --secret."""
    raw = ctx.raw
    has_token = raw.get("hfToken") not in (None, "")
    if has_token and token_is_secret is False:
        ctx.fail("hfToken", "is stored in plain text. Fix: pulumi config rm hfToken && pulumi config set --secret hfToken hf_...")
    for key in TRACKER_SECRETS:
        if key in plain and raw.get(key) not in (None, ""):
            ctx.fail(key, f"is stored in plain text. Fix: pulumi config rm {key} && pulumi config set --secret {key} ...")
    return has_token, tuple(k for k in TRACKER_SECRETS if raw.get(k) not in (None, ""))


def _names(ctx: _Ctx) -> tuple[str, str]:
    """jobName and namespace, as the names of what they become."""
    job_name = ctx.string("jobName")
    if not _DNS1035.match(job_name):
        ctx.fail(
            "jobName",
            f"{job_name!r} is not a DNS-1035 label: lower-case letters, digits and '-', "
            "starting with a letter, ending with a letter or digit, at most 63 characters "
            "(e.g. llama2-medical)",
        )
    # The longest child name is "<job>-etcd-client"/"<job>-data-access"; StatefulSet pods add "-N".
    if len(job_name) > 40:
        ctx.fail(
            "jobName",
            f"{job_name!r} is {len(job_name)} characters; at most 40, so derived names "
            "(<jobName>-data-access, <jobName>-etcd-0) stay valid labels",
        )
    namespace = ctx.string("namespace")
    if not _DNS1123.match(namespace):
        ctx.fail("namespace", f"{namespace!r} is not a valid namespace name (DNS-1123 label, e.g. ml-training)")
    return job_name, namespace


def _job_api(ctx: _Ctx) -> tuple[str, str]:
    """jobApi and trainerRuntime; the Training Operator v1's keys refused on Trainer v2."""
    job_api = ctx.string("jobApi", JOB_APIS)
    trainer_runtime = ctx.string("trainerRuntime")
    if not _DNS1123.match(trainer_runtime):
        ctx.fail("trainerRuntime", f"{trainer_runtime!r} is not a runtime name (e.g. torch-distributed)")
    if job_api == "trainer-v2":
        set_v1 = [k for k in V1_ONLY if k in ctx.raw]
        if ctx.raw.get("rendezvous") == "etcd":
            set_v1.insert(0, "rendezvous")
        if set_v1:
            ctx.fail(
                set_v1[0],
                f"{', '.join(set_v1)} only mean something to the Training Operator v1: Trainer v2 "
                "has no elastic range, no etcd rendezvous (its torch runtime injects a static "
                "rendezvous on node 0) and no run policy; restarts of the whole job are the "
                "launcher's (launchAttempts). Fix: pulumi config rm "
                + " && pulumi config rm ".join(set_v1)
                + ", or jobApi training-operator-v1",
            )
    return job_api, trainer_runtime


@dataclass(frozen=True)
class _Workers:
    workers: int
    minimum: int
    maximum: int
    procs: int


def _workers(ctx: _Ctx) -> _Workers:
    """workers, minWorkers, maxWorkers (the elastic range) and procsPerWorker."""
    workers = ctx.integer("workers", 1)
    min_workers = ctx.integer("minWorkers", 0) or workers  # 0: same as workers (Pulumi.yaml)
    max_workers = ctx.integer("maxWorkers", 0) or workers
    if not min_workers <= workers <= max_workers:
        key = "minWorkers" if min_workers > workers else "maxWorkers"
        ctx.fail(
            key,
            f"need minWorkers <= workers <= maxWorkers, got {min_workers} <= {workers} <= {max_workers}. "
            f"Fix: pulumi config set {key} {workers}",
        )
    if max_workers > workers:
        ctx.fail(
            "maxWorkers",
            f"{max_workers} > workers {workers} would never add a pod: the operator scales a "
            "PyTorchJob up only through an HPA on elasticPolicy.metrics, which this stack does not "
            f"create (only PET_NNODES would widen). Fix: pulumi config set maxWorkers {workers} "
            "(minWorkers below workers lets the job go on without lost pods)",
        )
    return _Workers(workers, min_workers, max_workers, ctx.integer("procsPerWorker", 1))


def _rendezvous(ctx: _Ctx, job_api: str) -> tuple[str, int, str]:
    """rendezvous, etcdReplicas and etcdImage. Trainer v2: torchrun's static c10d store on node 0,
    injected by the runtime."""
    rendezvous = "c10d" if job_api == "trainer-v2" else ctx.string("rendezvous", ("etcd", "c10d"))
    etcd_replicas = ctx.integer("etcdReplicas", 1)
    if etcd_replicas not in (1, 3):
        ctx.fail(
            "etcdReplicas",
            f"must be 1 or 3 (an etcd cluster needs an odd quorum; 1 for a single job, "
            f"3 to survive a node loss), got {etcd_replicas}",
        )
    etcd_image = ctx.string("etcdImage")
    if not _ETCD_TAG.search(etcd_image):
        ctx.fail(
            "etcdImage",
            f"{etcd_image!r} must be pinned to an etcd 3.5.x tag (e.g. "
            "quay.io/coreos/etcd:v3.5.17): torchrun's etcd-v2 rendezvous needs the v2 API, "
            "which etcd 3.6 removed",
        )
    return rendezvous, etcd_replicas, etcd_image


def _image(ctx: _Ctx) -> tuple[str, str]:
    """image (pinned: every worker runs the same trainer) and imagePullPolicy."""
    image = ctx.string("image")
    if image.endswith(":latest") or ("@" not in image and ":" not in image.rsplit("/", 1)[-1]):
        ctx.fail(
            "image",
            f"{image!r} is not pinned; use a version tag or digest "
            "(e.g. ghcr.io/you/llm-finetune-cpu:0.1.0) so every worker runs the same trainer",
        )
    return image, ctx.string("imagePullPolicy", ("IfNotPresent", "Always", "Never"))


def _resources(ctx: _Ctx) -> Resources:
    """resources.*: a worker pod's requests, GPUs, shared memory, node selector and tolerations."""
    res = ctx.mapping("resources")
    node_selector = res.get("nodeSelector") or {}
    if not isinstance(node_selector, Mapping) or not all(isinstance(v, str) for v in node_selector.values()):
        ctx.fail(
            "resources.nodeSelector",
            'must map label names to string values, e.g. {"node.kubernetes.io/instance-type": "c7i.8xlarge"}',
        )
    tolerations = []
    for i, t in enumerate(res.get("tolerations") or []):
        if (
            not isinstance(t, Mapping)
            or t.get("operator", "Equal") not in ("Equal", "Exists")
            or t.get("effect") not in (None, "", "NoSchedule", "PreferNoSchedule", "NoExecute")
        ):
            ctx.fail(
                "resources.tolerations",
                f"entry {i} {t!r} is not a toleration: {{key, operator: "
                "Equal|Exists, value, effect: NoSchedule|PreferNoSchedule|NoExecute}",
            )
        tolerations.append(Toleration(t.get("key"), t.get("operator", "Equal"), t.get("value"), t.get("effect") or None))
    return Resources(
        cpu=ctx.quantity("resources.cpu"),
        memory=ctx.quantity("resources.memory"),
        gpus=ctx.integer("resources.gpus", 0),
        shm_size=ctx.quantity("resources.shmSize"),
        node_selector=tuple(sorted((str(k), str(v)) for k, v in node_selector.items())),
        tolerations=tuple(tolerations),
    )


def _storage(ctx: _Ctx, max_workers: int) -> Storage:
    """storage.*: the shared volume's claim, its class (created or named) and what destroy does to it."""
    storage = ctx.mapping("storage")
    access_mode = ctx.string("storage.accessMode", ACCESS_MODES)
    if access_mode in ("ReadWriteOnce", "ReadWriteOncePod") and max_workers > 1:
        ctx.fail(
            "storage.accessMode",
            f"{access_mode} lets only one node mount the volume, but up to "
            f"{max_workers} workers share it. Fix: pulumi config set --path "
            "storage.accessMode ReadWriteMany (with a class that supports it: "
            "NFS, Filestore, EFS, CephFS), or workers 1",
        )
    if access_mode == "ReadOnlyMany":
        ctx.fail("storage.accessMode", "ReadOnlyMany cannot hold checkpoints; use ReadWriteMany")
    size = ctx.quantity("storage.size")
    create_class = ctx.boolean("storage.createClass")
    class_name = storage.get("className") or None
    if class_name is not None and not _DNS1123.match(str(class_name).replace(".", "-")):
        ctx.fail("storage.className", f"{class_name!r} is not a valid StorageClass name")
    if create_class and class_name is None:
        ctx.fail("storage.className", "is required when storage.createClass is true (the name of the class to create)")
    if access_mode == "ReadWriteMany" and class_name is None:
        ctx.fail(
            "storage.className",
            "is empty, so the claim would use the cluster's default class, and most "
            "managed defaults are ReadWriteOnce block storage: a ReadWriteMany claim "
            "would never bind. Fix: pulumi config set --path storage.className <an RWX "
            "class: NFS, Filestore, EFS, Azure Files, CephFS> (kubectl get storageclass), "
            "or storage.createClass true with a provisioner",
        )
    provisioner = ctx.string("storage.provisioner") if create_class else str(ctx.get("storage.provisioner") or "")
    parameters = ctx.mapping("storage.parameters")
    return Storage(
        class_name=class_name,
        size=size,
        access_mode=access_mode,
        create_class=create_class,
        provisioner=provisioner,
        parameters=tuple(sorted((str(k), str(v)) for k, v in parameters.items())),
        volume_binding_mode=ctx.string("storage.volumeBindingMode", ("WaitForFirstConsumer", "Immediate")),
        retain_on_destroy=ctx.boolean("storage.retainOnDestroy"),
        adopt=ctx.string("storage.adopt", ADOPT),
        prepare_ownership=ctx.boolean("storage.prepareOwnership"),
    )


def _extra_env(ctx: _Ctx) -> tuple[tuple[str, str], ...]:
    """extraEnv: names torchrun's operator sets and token variables refused."""
    extra_env = ctx.mapping("extraEnv")
    for name, value in extra_env.items():
        if not _ENV_NAME.match(name):
            ctx.fail("extraEnv", f"{name!r} is not a valid environment variable name")
        if name in RESERVED_ENV:
            ctx.fail(
                "extraEnv",
                f"{name} is set by the job's operator for torchrun (PET_NNODES, PET_NPROC_PER_NODE, "
                "PET_NODE_RANK, PET_MASTER_ADDR, PET_MASTER_PORT); use workers and procsPerWorker",
            )
        if name.upper() in TOKEN_ENV_NAMES:
            ctx.fail(
                "extraEnv",
                f"{name} would put the token in a plain env value; use "
                "pulumi config set --secret hfToken hf_... (mounted as a file)",
            )
        if not isinstance(value, (str, int, float, bool)):
            ctx.fail("extraEnv", f"{name} must be a string value, got {value!r}")
    return tuple(sorted((str(k), str(v)) for k, v in extra_env.items()))


def _world(ctx: _Ctx, cfg: TrainerConfig, workers: _Workers, gpus: int) -> None:
    """What spans sections: the trainer config against the processes the job starts and its GPUs."""
    problem = world_problem(cfg, workers.minimum * workers.procs)
    if problem:
        ctx.fail(
            "training",
            problem.replace("training.fsdp: false", "pulumi config set --path training.fsdp false").replace(
                "(python -m trainer.runtime.launch --nproc-per-node 2 ..., or workers/procsPerWorker in the stack)",
                "(pulumi config set workers 2, or procsPerWorker 2)",
            ),
        )
    if gpus == 0 and cfg.training.ddp_backend == "nccl":
        ctx.fail("training", "ddp_backend nccl needs GPUs; set resources.gpus or use gloo/ccl")
    if gpus > 0 and workers.procs > gpus:
        ctx.fail(
            "procsPerWorker",
            f"{workers.procs} processes per worker but only {gpus} GPUs each; one process per "
            f"GPU. Fix: pulumi config set procsPerWorker {gpus}",
        )


def _scheduling(ctx: _Ctx, job_api: str, trainer_runtime: str) -> tuple[str, str, str]:
    """queueName (Kueue), priorityClassName and workloadPriorityClass, validated as what they become:
    label values and the names of a PriorityClass and a WorkloadPriorityClass object."""
    queue = str(ctx.get("queueName") or "")
    if queue and (len(queue) > 63 or not _LABEL_VALUE.match(queue)):
        ctx.fail(
            "queueName",
            f"{queue!r} is not a label value (Kueue reads the kueue.x-k8s.io/queue-name label): "
            "at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or "
            "digit. Fix: pulumi config set queueName <your LocalQueue> (kubectl get localqueues)",
        )
    if queue and job_api == "trainer-v2" and trainer_runtime != TORCH_RUNTIME:
        ctx.fail(
            "queueName",
            f"a queued TrainJob on your trainerRuntime {trainer_runtime!r} would carry the stack's pod "
            "settings as runtimePatches, which Kueue's start of the job may fail to reproduce (CEL "
            "'field is immutable': kubeflow/trainer#3888), leaving it suspended. Fix: pulumi config "
            "rm trainerRuntime (the stack's own runtime, built like torch-distributed, carries the "
            "pod), or pulumi config rm queueName",
        )
    workload_priority = str(ctx.get("workloadPriorityClass") or "")
    if workload_priority:
        # A label value (kueue.x-k8s.io/priority-class) that names a cluster-scoped object: both rules.
        if len(workload_priority) > 63 or not _DNS1123_SUBDOMAIN.match(workload_priority):
            ctx.fail(
                "workloadPriorityClass",
                f"{workload_priority!r} is not a WorkloadPriorityClass name (lower-case "
                "letters, digits, '-' and '.', at most 63). Fix: pulumi config set "
                "workloadPriorityClass <name> (kubectl get workloadpriorityclasses)",
            )
        if not queue:
            ctx.fail(
                "workloadPriorityClass",
                "only Kueue reads it, and the job is not queued. Fix: pulumi config set "
                "queueName <your LocalQueue>, or pulumi config rm workloadPriorityClass",
            )
    priority = str(ctx.get("priorityClassName") or "")
    if priority:
        if len(priority) > 253 or not _DNS1123_SUBDOMAIN.match(priority):
            ctx.fail(
                "priorityClassName",
                f"{priority!r} is not a PriorityClass name (lower-case DNS subdomain). "
                "Fix: pulumi config set priorityClassName <name> (kubectl get priorityclasses)",
            )
        if priority in SYSTEM_PRIORITIES:
            ctx.fail(
                "priorityClassName",
                f"{priority} is for the cluster's own components (the API server admits "
                "it only in kube-system). Fix: pulumi config set priorityClassName "
                "<a class of yours> (kubectl get priorityclasses)",
            )
        if job_api == "trainer-v2" and trainer_runtime != TORCH_RUNTIME:
            ctx.fail(
                "priorityClassName",
                f"on Trainer v2 the stack sets it through a TrainingRuntime of its own, "
                f"built like {TORCH_RUNTIME}; your trainerRuntime {trainer_runtime!r} is not "
                "one the stack can copy. Fix: set priorityClassName in that runtime's "
                "pod template and pulumi config rm priorityClassName, or pulumi config "
                f"rm trainerRuntime",
            )
    return queue, priority, workload_priority


def _trackers(ctx: _Ctx, cfg: TrainerConfig, secrets: tuple[str, ...]) -> None:
    """What a tracker in training.reportTo needs from the stack, at preview."""
    trackers = cfg.training.trackers
    if "wandb" in trackers and cfg.tracking.wandb_mode == "online" and "wandbApiKey" not in secrets:
        ctx.fail(
            "training",
            "reportTo includes wandb (online) but the stack has no wandbApiKey. Fix: pulumi config "
            "set --secret wandbApiKey <key>, or pulumi config set --path tracking.wandbMode offline",
        )
    uri = cfg.tracking.mlflow_tracking_uri or ""
    if (
        "mlflow" in trackers
        and uri.startswith("file:")
        and not uri[len("file:") :].lstrip("/").startswith(DATA_MOUNT.lstrip("/") + "/")
    ):
        ctx.fail(
            "tracking.mlflowTrackingUri",
            f"{uri} is a file store inside the pod, lost with it. Fix: an MLflow "
            f"server (http://...), or a path on the shared volume "
            f"(file:{DATA_MOUNT}/mlruns)",
        )
    for key in secrets:
        tracker = TRACKER_SECRETS[key][0]
        if tracker not in trackers:
            ctx.fail(
                key,
                f"is set but training.reportTo does not include {tracker}: the secret would be mounted "
                f"for nothing. Fix: pulumi config set --path 'training.reportTo[0]' {tracker}, or "
                f"pulumi config rm {key}",
            )


def _trainer_config(ctx: _Ctx, job_name: str, run_id: str) -> tuple[TrainerConfig, str]:
    """Render the trainer config from the stack's model/dataset/training/lora/quantize keys; with the
    run's identity (a hash of that config and runId), which names its output directory."""
    model = ctx.get("model")
    if isinstance(model, str):
        model = {"name_or_path": model}
    model = {**model, "dtype": ctx.string("modelDtype", ("auto", "bf16", "fp32", "pure-bf16"))}
    data: dict[str, Any] = {}
    for key, value in ctx.mapping("dataset").items():
        if value is None or value == "" or (key in ("maxSeqLength", "maxExamples") and value in (0, "0")):
            continue  # unset: the trainer's default applies
        if key == "name":
            data["dataset"] = value
        elif key == "config":
            data["dataset_config"] = value
        elif key in ("file", "validationFile", "validation_file"):
            # Relative files live on the shared volume; workers wait for an upload that comes
            # after `pulumi up` created the data-access pod.
            data[_snake(key)] = value if str(value).startswith("/") else f"{DATA_MOUNT}/{value}"
            data.setdefault("file_wait_seconds", 1800)
        else:
            data[_snake(key)] = value
    raw = {
        "model": model,
        "data": _typed(DataConfig, data),
        "training": _typed(TrainingConfig, {_snake(k): v for k, v in ctx.mapping("training").items()}),
        "lora": _typed(LoraConfig, {_snake(k): v for k, v in ctx.mapping("lora").items()}),
        "quantize": _typed(QuantizeConfig, {_snake(k): v for k, v in ctx.mapping("quantize").items()}),
        "tracking": _typed(TrackingConfig, {_snake(k): v for k, v in ctx.mapping("tracking").items() if v not in (None, "")}),
        "output_dir": f"{DATA_MOUNT}/output/{job_name}",
    }
    try:
        cfg = TrainerConfig.from_dict(raw)
    except ConfigError as exc:
        msg = str(exc)
        section, _, rest = msg.partition(".")
        stack_key = {"data": "dataset", "model": "model", "<config>": "training"}.get(section, section)
        ctx.fail(stack_key, f"invalid trainer config: {msg}")
    # One run, one directory: a changed config (or runId) trains afresh beside the earlier runs,
    # whose results stay where they are; an unchanged one resumes its own checkpoints.
    run_hash = run_hash_of(cfg, run_id)
    return dataclasses.replace(cfg, output_dir=f"{DATA_MOUNT}/output/{job_name}/{run_hash}"), run_hash


def run_hash_of(cfg: TrainerConfig, run_id: str) -> str:
    """8 hex digits of SHA-256 over the whole trainer config (output_dir aside) and runId. Where the
    metrics go (training.report_to, tracking) is not what is trained: adding a tracker to a running
    stack resumes the same run."""
    import hashlib

    content = {k: v for k, v in cfg.to_dict().items() if k not in ("output_dir", "tracking")}
    content["training"] = {k: v for k, v in content["training"].items() if k != "report_to"}
    blob = json.dumps({"trainer": content, "runId": run_id}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


def _typed(cls, section: Mapping[str, Any]) -> dict[str, Any]:
    """`pulumi config set --path training.max_steps 20` stores the string "20": decode scalars
    (as YAML) for every key the trainer does not declare as a string."""
    hints = typing.get_type_hints(cls)
    out = {}
    for key, value in section.items():
        hint = hints.get(key)
        is_str = hint is str or (typing.get_origin(hint) is typing.Union and str in typing.get_args(hint))
        if isinstance(value, str) and hint is not None and not is_str:
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                pass
        out[key] = value
    return out


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)([A-Z])", r"_\1", name).lower()


# --------------------------------------------------------------------------------------------
# Reading from Pulumi
# --------------------------------------------------------------------------------------------


def _decode(value: Optional[str]) -> Any:
    if value is None:
        return None
    try:
        return json.loads(value)
    except (TypeError, ValueError):
        return value


def load() -> StackConfig:
    """Read this stack's config through the Pulumi runtime and parse it."""
    import pulumi
    from pulumi.runtime import config as runtime_config

    prefix = PROJECT + ":"
    # The language host hands config over with set_all_config; PULUMI_CONFIG is the older route.
    all_config = {**runtime_config.get_config_env(), **runtime_config.CONFIG.get()}
    raw = {k[len(prefix) :]: _decode(v) for k, v in all_config.items() if k.startswith(prefix)}

    def is_secret(key: str) -> bool:
        return runtime_config.is_config_secret(prefix + key) or prefix + key in runtime_config.get_config_secret_keys_env()

    # Secret values never enter the parsed config (they stay secret Outputs, see load_secret).
    for key in ("hfToken", *TRACKER_SECRETS):
        if raw.get(key) not in (None, ""):
            raw[key] = "<secret>"
    token_is_secret = is_secret("hfToken") if raw.get("hfToken") else None
    plain = tuple(k for k in TRACKER_SECRETS if raw.get(k) and not is_secret(k))
    source, lines = stack_file_lines(pulumi.get_stack())
    return parse(raw, source=source, lines=lines, token_is_secret=token_is_secret, plain=plain)


def load_token():
    """The Hugging Face token as a secret Output, or None for public models."""
    return load_secret("hfToken")


def load_secret(key: str):
    """A secret stack value as a secret Output, or None when unset."""
    import pulumi

    return pulumi.Config(PROJECT).get_secret(key)

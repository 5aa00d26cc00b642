"""FineTuneJob: the one ComponentResource every resource of the stack is a child of."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, cast

import pulumi
import pulumi_kubernetes as k8s

from infra.common import Names
from infra.config import DATA_MOUNT, TOKEN_KEY, TRACKER_SECRETS, StackConfig
from infra.data_access import TENSORBOARD_PORT, data_access_pod_manifest
from infra.rendezvous import etcd_manifests
from infra.secret import secret_manifest, tracking_secret_manifest
from infra.jobs import JobApi, for_api, pod_volumes
from infra.storage import claim_manifest, ownership_job_manifest, storage_class_manifest
from infra.trainer_config import config_map_manifest, config_map_name


@dataclass
class FineTuneJobArgs:
    config: StackConfig
    hf_token: Optional[pulumi.Input[str]] = None
    """The token as a secret Output (pulumi.Config.get_secret); never a plain string."""
    tracker_credentials: Optional[dict[str, pulumi.Input[str]]] = None
    """Stack key (mlflowTrackingToken, wandbApiKey) -> secret Output, for those the config has."""


def commands(cfg: StackConfig) -> dict[str, str]:
    """Ready-to-paste kubectl commands for the stack outputs."""
    ns, job = cfg.namespace, cfg.job_name
    pod = Names(job).data_access
    run_dir = cfg.output_dir
    data_file = cfg.trainer.data.file or f"{DATA_MOUNT}/dataset.json"
    result = {
        **for_api(cfg.job_api).commands(cfg),
        # Upload under a temporary name, then rename: the workers never see a half-copied file.
        "uploadDataset": (
            f"kubectl -n {ns} cp ./{data_file.rsplit('/', 1)[-1]} {pod}:{data_file}.partial && "
            f"kubectl -n {ns} exec {pod} -- mv {data_file}.partial {data_file}"
        ),
        "copyModel": f"kubectl -n {ns} cp {pod}:{run_dir}/final ./{job}-final",
        "copyQuantizedModel": f"kubectl -n {ns} cp {pod}:{run_dir}/quantized ./{job}-quantized",
        "copyReport": f"kubectl -n {ns} cp {pod}:{run_dir}/report.json ./{job}-report.json",
        "listOutputs": f"kubectl -n {ns} exec {pod} -- ls -la {run_dir}",
        "listRuns": f"kubectl -n {ns} exec {pod} -- ls -la {DATA_MOUNT}/output/{job}",
        # Step of total, time left, the last losses (written by the trainer at every logging step).
        "progress": f"kubectl -n {ns} exec {pod} -- cat {run_dir}/progress.txt",
        "getTrainerConfig": (
            f"kubectl -n {ns} get configmap {config_map_name(cfg)} -o jsonpath='{{.data.config\\.yaml}}' > config.yaml"
        ),
    }
    q = cfg.trainer.quantize
    if q.enabled:
        # After copyQuantizedModel: serving the format it holds with its engine.
        local = f"./{job}-quantized"
        if q.format.startswith("gguf:"):
            gguf = f"model-{q.format.split(':', 1)[1]}.gguf"
            result["serveQuantized"] = (
                f"ollama create {job} -f {local}/Modelfile && ollama run {job}   # or: "
                f"llama-cli -m {local}/{gguf} -p 'Question: ...' -n 64"
            )
        elif q.format == "inc":
            result["serveQuantized"] = f"python -c \"from trainer.post.measure import load_quantized; load_quantized('{local}')\""
        else:
            result["serveQuantized"] = f"vllm serve {local}   # or AutoModelForCausalLM.from_pretrained('{local}')"
    if "tensorboard" in cfg.trainer.training.trackers:
        # Served by the data-access pod on its loopback; open http://localhost:6006 while this runs.
        result["tensorboard"] = f"kubectl -n {ns} port-forward pod/{pod} {TENSORBOARD_PORT}:{TENSORBOARD_PORT}"
    return result


@dataclass
class SharedVolume:
    """The claim every pod mounts, the class created for it (storage.createClass), and the one-shot Job
    that makes a root-owned share writable by the pods' uid before any of them mounts it."""

    claim: k8s.core.v1.PersistentVolumeClaim
    name: pulumi.Output  # the claim's created name: pods that mount it wait for it
    storage_class: Optional[k8s.storage.v1.StorageClass]
    prep: Optional[k8s.batch.v1.Job]

    @property
    def ready(self) -> list[pulumi.Resource]:
        """What a pod mounting the volume must wait for (no value flows from the Job: depends_on)."""
        return [self.prep] if self.prep is not None else []


@dataclass
class Credentials:
    """The Secrets (Hugging Face token, tracker credentials) and the trainer config's ConfigMap, mounted
    as files by the pods, never env values; pods name them by their created names."""

    hf_token: Optional[k8s.core.v1.Secret]
    tracking: Optional[k8s.core.v1.Secret]
    config_map: k8s.core.v1.ConfigMap

    def link(self, manifest: dict) -> dict:
        """Dependencies flow through outputs: the pod volumes name the ConfigMap and Secrets by their
        created names, so the job (or runtime) is submitted only after they exist."""
        for volumes in pod_volumes(manifest):
            for volume in volumes:
                if "configMap" in volume:
                    volume["configMap"] = {"name": self.config_map.metadata.apply(lambda m: m["name"])}
                created = {"hf-token": self.hf_token, "tracking": self.tracking}.get(volume["name"])
                if "secret" in volume and created is not None:
                    volume["secret"] = {**volume["secret"], "secretName": created.metadata.apply(lambda m: m["name"])}
        return manifest


class FineTuneJob(pulumi.ComponentResource):
    """Composes the stack: the shared volume, the credentials, the data-access pod, the rendezvous and
    the job of the configured job API (infra/jobs). Built from small functions rather than child
    components: a component between the stack and its resources would change every resource's URN,
    and `pulumi up` would replace the claim (and the model on it) of every existing stack."""

    def __init__(self, name: str, args: FineTuneJobArgs, opts: Optional[pulumi.ResourceOptions] = None):
        super().__init__("llm-finetune:index:FineTuneJob", name, None, opts)
        cfg = args.config
        child = pulumi.ResourceOptions(parent=self)
        self.volume = shared_volume(name, cfg, self)
        self.credentials = credentials(name, args, self)
        pod = _with_claim(data_access_pod_manifest(cfg), self.volume.name)
        self.data_access = k8s.core.v1.Pod(
            f"{name}-data-access",
            metadata=pod["metadata"],
            spec=pod["spec"],
            opts=pulumi.ResourceOptions(parent=self, depends_on=self.volume.ready),
        )
        self.etcd = rendezvous_resources(name, cfg, child)
        api = for_api(cfg.job_api)
        job = api.manifest(cfg)
        self.runtime, self.job = self._job(name, cfg, api, job)
        self.outputs = {
            "jobName": _created_name(self.job),
            "namespace": cfg.namespace,
            "volumeClaim": self.volume.name,
            "dataAccessPod": self.data_access.metadata.apply(lambda m: m["name"]),
            "outputDir": cfg.output_dir,
            "run": cfg.run_hash,
            "rendezvousId": api.rendezvous(job),
            "jobApi": cfg.job_api,
            "rendezvous": cfg.rendezvous,
            "commands": commands(cfg),
        }
        self.register_outputs(self.outputs)

    def _job(
        self, name: str, cfg: StackConfig, api: JobApi, job: dict
    ) -> tuple[Optional[k8s.apiextensions.CustomResource], k8s.apiextensions.CustomResource]:
        """The job API's runtime object where it has one (created first: the job names it), and the job
        (`job`: its rendered manifest, left as it is: the claim and credentials are linked into a copy)."""
        job_spec = self.credentials.link(_with_claim(job, self.volume.name))["spec"]
        created_runtime = None
        runtime = api.runtime(cfg)
        if runtime is not None:
            runtime = self.credentials.link(_with_claim(runtime, self.volume.name))
            # The TrainJob names it, so it must exist first: its name flows from the created object.
            created_runtime = k8s.apiextensions.CustomResource(
                f"{name}-runtime",
                api_version=runtime["apiVersion"],
                kind=runtime["kind"],
                metadata=runtime["metadata"],
                spec=runtime["spec"],
                opts=pulumi.ResourceOptions(parent=self),
            )
            job_spec["runtimeRef"] = {**job_spec["runtimeRef"], "name": _created_name(created_runtime)}
        depends = list(self.etcd) + self.volume.ready  # etcd up, volume prepared; no output links them
        # A changed pod template, elastic policy or process count replaces the job (the operator would
        # ignore it); same name, so the old one goes first.
        created_job = k8s.apiextensions.CustomResource(
            f"{name}-job",
            api_version=job["apiVersion"],
            kind=job["kind"],
            metadata=job["metadata"],
            spec=job_spec,
            opts=pulumi.ResourceOptions(
                parent=self,
                depends_on=depends,
                delete_before_replace=True,
                # And a new Kueue queue or WorkloadPriorityClass label: Kueue's webhook refuses either on a
                # running job (jobframework.ValidateJobOnUpdate), so it is a new workload, queued afresh.
                replace_on_changes=["spec" if key == "spec" else f"spec.{key}" for key in api.REPLACED_BY] + ["metadata.labels"],
                # Kueue unsuspends an admitted job: that is not drift for `pulumi up` to undo (or,
                # on a TrainJob, to replace the job for).
                ignore_changes=list(api.IGNORED_AFTER_CREATE) if cfg.queue_name else None,
            ),
        )
        return created_runtime, created_job


def shared_volume(name: str, cfg: StackConfig, parent: pulumi.Resource) -> SharedVolume:
    child = pulumi.ResourceOptions(parent=parent)
    storage_class = None
    sc = storage_class_manifest(cfg)
    if sc is not None:
        storage_class = k8s.storage.v1.StorageClass(
            f"{name}-storage-class",
            metadata=sc["metadata"],
            provisioner=sc["provisioner"],
            parameters=sc["parameters"],
            reclaim_policy=sc["reclaimPolicy"],
            volume_binding_mode=sc["volumeBindingMode"],
            allow_volume_expansion=sc["allowVolumeExpansion"],
            opts=child,
        )
    pvc = claim_manifest(cfg)
    spec = dict(pvc["spec"])
    if storage_class is not None:
        spec["storageClassName"] = storage_class.metadata.apply(lambda m: m["name"])
    claim = k8s.core.v1.PersistentVolumeClaim(
        f"{name}-data", metadata=pvc["metadata"], spec=cast(Any, spec), opts=claim_options(cfg, parent, name)
    )
    claim_name = claim.metadata.apply(lambda m: m["name"])
    prep = None
    manifest = ownership_job_manifest(cfg)
    if manifest is not None:
        manifest = _with_claim(manifest, claim_name)
        prep = k8s.batch.v1.Job(f"{name}-volume-prep", metadata=manifest["metadata"], spec=manifest["spec"], opts=child)
    return SharedVolume(claim, claim_name, storage_class, prep)


def credentials(name: str, args: FineTuneJobArgs, parent: pulumi.Resource) -> Credentials:
    cfg = args.config
    hf_token = None
    sec = secret_manifest(cfg)
    if sec is not None:
        if args.hf_token is None:
            raise ValueError("config says there is a token but none was passed")
        # The only place the token goes; Pulumi keeps it encrypted in state as a secret.
        hf_token = k8s.core.v1.Secret(
            f"{name}-hf-token",
            metadata=sec["metadata"],
            type=sec["type"],
            string_data={TOKEN_KEY: pulumi.Output.secret(args.hf_token)},
            opts=pulumi.ResourceOptions(parent=parent, additional_secret_outputs=["data", "stringData"]),
        )
    tracking = None
    tsec = tracking_secret_manifest(cfg)
    if tsec is not None:
        creds = args.tracker_credentials or {}
        missing = [k for k in cfg.tracker_secrets if creds.get(k) is None]
        if missing:
            raise ValueError(f"config says there are tracker credentials {missing} but none were passed")
        tracking = k8s.core.v1.Secret(
            f"{name}-tracking",
            metadata=tsec["metadata"],
            type=tsec["type"],
            string_data={TRACKER_SECRETS[k][1]: pulumi.Output.secret(creds[k]) for k in cfg.tracker_secrets},
            opts=pulumi.ResourceOptions(parent=parent, additional_secret_outputs=["data", "stringData"]),
        )
    cm = config_map_manifest(cfg)
    config_map = k8s.core.v1.ConfigMap(
        f"{name}-config", metadata=cm["metadata"], data=cm["data"], opts=pulumi.ResourceOptions(parent=parent)
    )
    return Credentials(hf_token, tracking, config_map)


def rendezvous_resources(name: str, cfg: StackConfig, child: pulumi.ResourceOptions) -> list[pulumi.CustomResource]:
    """The etcd the workers rendezvous through (training-operator-v1 with rendezvous etcd; none otherwise)."""
    created: list[pulumi.CustomResource] = []
    for manifest in etcd_manifests(cfg):
        kind = manifest["kind"]
        suffix = {"StatefulSet": "etcd", "NetworkPolicy": "etcd-policy"}.get(
            kind, manifest["metadata"]["name"][len(cfg.job_name) + 1 :]
        )
        cls = {
            "StatefulSet": k8s.apps.v1.StatefulSet,
            "Service": k8s.core.v1.Service,
            "NetworkPolicy": k8s.networking.v1.NetworkPolicy,
        }[kind]
        created.append(cls(f"{name}-{suffix}", metadata=manifest["metadata"], spec=manifest["spec"], opts=child))
    return created


def _created_name(resource: pulumi.CustomResource) -> pulumi.Output:
    """metadata.name as the cluster has it (a CustomResource's outputs are untyped)."""
    return cast(Any, resource).metadata.apply(lambda m: m["name"])


def claim_options(cfg: StackConfig, parent: pulumi.Resource, name: str = "llm-finetune") -> pulumi.ResourceOptions:
    """retainOnDestroy: `pulumi destroy` leaves the claim (and the model on it) in the cluster, and a later
    `pulumi up` takes it over instead of failing with AlreadyExists (pulumi-kubernetes >= 4.29 creates
    with a client-side create): `upsert` through a provider of its own that adopts an existing object
    (only for the claim: everything else still refuses to overwrite what it does not own), or `import`."""
    opts = pulumi.ResourceOptions(parent=parent, retain_on_delete=cfg.storage.retain_on_destroy)
    if cfg.storage.adopt == "upsert":
        provider = k8s.Provider(
            f"{name}-claim-provider", upsert_existing_objects=True, opts=pulumi.ResourceOptions(parent=parent)
        )
        return pulumi.ResourceOptions.merge(opts, pulumi.ResourceOptions(provider=provider))
    if cfg.storage.adopt == "import":
        return pulumi.ResourceOptions.merge(opts, pulumi.ResourceOptions(import_=f"{cfg.namespace}/{Names(cfg.job_name).claim}"))
    return opts


def _with_claim(manifest: dict, claim_name) -> dict:
    """Point every volume of a pod or PyTorchJob manifest at the created claim (an Output)."""
    import copy

    manifest = copy.deepcopy(manifest)
    if manifest["kind"] in ("PyTorchJob", "TrainJob", "TrainingRuntime"):
        volume_lists = pod_volumes(manifest)
    elif manifest["kind"] == "Job":
        volume_lists = [manifest["spec"]["template"]["spec"]["volumes"]]
    else:
        volume_lists = [manifest["spec"]["volumes"]]
    for volumes in volume_lists:
        for volume in volumes:
            if "persistentVolumeClaim" in volume:
                volume["persistentVolumeClaim"] = {"claimName": claim_name}
    return manifest

"""The training job, one module per job API; each renders the same pod (infra/jobs/pod.py) and offers
what `JobApi` names."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Protocol, cast

if TYPE_CHECKING:
    from infra.config import StackConfig


class JobApi(Protocol):
    """What the stack needs of a job API (infra/jobs/pytorchjob.py, infra/jobs/trainjob.py)."""

    KIND: str
    REPLACED_BY: tuple[str, ...]  # the spec fields whose change replaces the job
    IGNORED_AFTER_CREATE: tuple[str, ...]  # what Kueue changes on an admitted job (not drift)

    def manifest(self, cfg: StackConfig) -> dict: ...  # the job

    def runtime(self, cfg: StackConfig) -> Optional[dict]: ...  # a runtime object it names, created first

    def commands(self, cfg: StackConfig) -> dict[str, str]: ...  # the stack outputs' kubectl commands

    def rendezvous(self, job: dict) -> str: ...  # the run's rendezvous id, from the job manifest


def for_api(name: str) -> JobApi:
    from infra.jobs import pytorchjob, trainjob

    return cast(JobApi, {"training-operator-v1": pytorchjob, "trainer-v2": trainjob}[name])


def pod_volumes(manifest: dict) -> list[list[dict]]:
    """The volume lists of the worker pods a job manifest declares (to point them at created objects)."""
    if manifest["kind"] == "PyTorchJob":
        return [r["template"]["spec"]["volumes"] for r in manifest["spec"]["pytorchReplicaSpecs"].values()]
    if manifest["kind"] == "TrainJob":  # the stack's patch of a user's runtime (none on its own runtime)
        return [
            v
            for patch in manifest["spec"].get("runtimePatches", [])
            for v in _replicated_job_volumes(patch["trainingRuntimeSpec"])
        ]
    if manifest["kind"] == "TrainingRuntime":
        return _replicated_job_volumes(manifest["spec"])
    raise ValueError(manifest["kind"])


def _replicated_job_volumes(runtime_spec: dict) -> list[list[dict]]:
    """The pod volume lists of a (patch of a) training runtime's replicated jobs."""
    return [rj["template"]["spec"]["template"]["spec"]["volumes"] for rj in runtime_spec["template"]["spec"]["replicatedJobs"]]

"""The training job, one module per job API; each renders the same pod (infra/jobs/pod.py).

Each module offers `manifest(cfg)`, `commands(cfg)` and `REPLACED_BY` (the spec fields whose change
replaces the job).
"""

from __future__ import annotations

from types import ModuleType

JOB_APIS = ("training-operator-v1", "trainer-v2")


def for_api(name: str) -> ModuleType:
    from infra.jobs import pytorchjob, trainjob

    return {"training-operator-v1": pytorchjob, "trainer-v2": trainjob}[name]


def pod_volumes(manifest: dict) -> list[list[dict]]:
    """The volume lists of the worker pods a job manifest declares (to point them at created objects)."""
    if manifest["kind"] == "PyTorchJob":
        return [r["template"]["spec"]["volumes"] for r in manifest["spec"]["pytorchReplicaSpecs"].values()]
    if manifest["kind"] == "TrainJob":  # the stack's patch of a user's runtime (none on its own runtime)
        return [v for patch in manifest["spec"].get("runtimePatches", [])
                for v in _replicated_job_volumes(patch["trainingRuntimeSpec"])]
    if manifest["kind"] == "TrainingRuntime":
        return _replicated_job_volumes(manifest["spec"])
    raise ValueError(manifest["kind"])


def _replicated_job_volumes(runtime_spec: dict) -> list[list[dict]]:
    """The pod volume lists of a (patch of a) training runtime's replicated jobs."""
    return [rj["template"]["spec"]["template"]["spec"]["volumes"] for rj in runtime_spec["template"]["spec"]["replicatedJobs"]]

"""Day two under Pulumi mocks: run identity, job replacement, claim adoption after destroy, volume
ownership, etcd that survives, restarts that work."""

import pytest

from tests.infra.harness import assert_baseline, render, validate_all

BASE = {"dataset": {"name": "org/data"}, "storage": {"className": "nfs-rwx"}}


def _ids(raw):
    rendered = render(raw)
    job = rendered.one("PyTorchJob")
    return {"run": rendered.outputs["run"], "rdzv": job["spec"]["elasticPolicy"]["rdzvId"],
            "config_map": rendered.one("ConfigMap")["metadata"]["name"], "output": rendered.outputs["outputDir"]}


def test_identity_follows_what_is_trained_and_the_run_id_not_unrelated_keys():
    base = _ids(BASE)
    assert base["rdzv"].startswith("llm-finetune-") and base["config_map"] == f"llm-finetune-config-{base['run']}"
    trained = _ids({**BASE, "training": {"learning_rate": 0.001}})
    again = _ids({**BASE, "runId": "2"})
    for changed in (trained, again):  # a new run: new job incarnation, rendezvous, config and directory
        assert changed["run"] != base["run"] and changed["rdzv"] != base["rdzv"]
        assert changed["output"] != base["output"] and changed["config_map"] != base["config_map"]
    # Bigger pods: the same run (same directory, resumes its checkpoints) in a new job incarnation.
    resized = _ids({**BASE, "resources": {"cpu": "8", "memory": "32Gi"}})
    assert resized["run"] == base["run"] and resized["output"] == base["output"] and resized["rdzv"] != base["rdzv"]
    # Keys that do not shape the pods or the training change neither.
    ttl = _ids({**BASE, "runPolicy": {"ttlSecondsAfterFinished": 60}})
    assert ttl == base


def test_an_unchanged_up_changes_nothing():
    first, second = render(BASE), render(BASE)
    assert [(r.typ, r.name, r.manifest()) for r in first.resources] == \
           [(r.typ, r.name, r.manifest()) for r in second.resources]


def test_the_job_is_replaced_on_change_the_claim_never():
    rendered = render(BASE)
    job = next(r for r in rendered.resources if r.kind == "PyTorchJob")
    assert job.options.delete_before_replace is True
    assert set(job.options.replace_on_changes) == {"spec.pytorchReplicaSpecs", "spec.elasticPolicy",
                                                   "spec.nprocPerNode", "metadata.labels"}
    claim = next(r for r in rendered.resources if r.kind == "PersistentVolumeClaim")
    assert not claim.options.replace_on_changes and not claim.options.delete_before_replace
    assert claim.options.retain_on_delete is True


@pytest.mark.parametrize("adopt", ["upsert", "import", "none"])
def test_destroy_then_up_adopts_the_kept_claim(adopt):
    """After `pulumi destroy` (claim kept) a `pulumi up` would fail with AlreadyExists: the claim is
    taken over by a provider that upserts (only for it), or imported by its id."""
    rendered = render({**BASE, "namespace": "ml", "storage": {"className": "nfs-rwx", "adopt": adopt}})
    claim = next(r for r in rendered.resources if r.kind == "PersistentVolumeClaim")
    providers = [r for r in rendered.resources if r.typ == "pulumi:providers:kubernetes"]
    if adopt == "upsert":
        assert len(providers) == 1 and providers[0].inputs.get("upsertExistingObjects") in (True, "true")
        assert claim.provider and providers[0].name in claim.provider
        # Everything else keeps the default provider, which refuses to overwrite what it does not own.
        others = [r for r in rendered.resources if r.typ.startswith("kubernetes:") and r is not claim]
        assert others and not any(r.provider and providers[0].name in r.provider for r in others)
    else:
        assert providers == []
    assert claim.resource_id == ("ml/llm-finetune-data" if adopt == "import" else "")


def test_volume_ownership_is_prepared_once_with_the_least_privilege():
    rendered = render(BASE)
    validate_all(rendered)
    job = rendered.one("Job")
    spec = job["spec"]["template"]["spec"]
    assert_baseline(spec, "volume-prep")  # root with CHOWN/FOWNER/DAC_OVERRIDE only; documented
    c = spec["containers"][0]
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN", "FOWNER", "DAC_OVERRIDE"]}
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    script = c["command"][-1]
    assert ".llm-finetune-prepared ]; then" in script and "exit 0" in script  # once per volume
    assert "chown 1000:1000 /data /data/cache /data/output" in script and "-R" not in script
    assert spec["volumes"][0]["persistentVolumeClaim"]["claimName"] == "llm-finetune-data"
    later = [r for r in rendered.resources if r.kind in ("Pod", "PyTorchJob")]
    prep = next(r for r in rendered.resources if r.kind == "Job")
    for r in later:  # nothing mounts the volume before it is prepared
        assert any(getattr(d, "_name", None) == prep.name for d in r.options.depends_on), r.name
    off = render({**BASE, "storage": {"className": "nfs-rwx", "prepareOwnership": False}})
    assert off.of_kind("Job") == []


def test_etcd_members_keep_their_data_and_go_with_destroy():
    rendered = render({**BASE, "etcdReplicas": 3, "etcdStorage": "2Gi"})
    sts = rendered.one("StatefulSet")
    assert "volumes" not in sts["spec"]["template"]["spec"]  # no emptyDir: a restarted member keeps its id
    template = sts["spec"]["volumeClaimTemplates"][0]
    assert template["metadata"]["name"] == "data"
    assert template["spec"] == {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "2Gi"}}}
    assert sts["spec"]["persistentVolumeClaimRetentionPolicy"] == {"whenDeleted": "Delete", "whenScaled": "Retain"}
    mounts = sts["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    assert {"name": "data", "mountPath": "/var/lib/etcd"} in mounts
    validate_all(rendered)

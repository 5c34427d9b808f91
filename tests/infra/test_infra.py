"""Checks of the deployment files under infra/ and of docs/cluster.md.

Nothing here talks to Docker, Kubernetes or AWS. The checks are: every YAML file parses;
the files agree with each other (image, Ray version, GPUs, credentials) and with the
project (entrypoint, job config keys, Ray requirement); and no file holds a credential.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import subprocess
from importlib.util import find_spec
from pathlib import Path

import pytest
import yaml

from pipeline.config import JobConfig, load_config

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
KUBERAY = INFRA / "kuberay"
LAUNCHER = INFRA / "cluster" / "aws.yaml"
CLUSTER_DOC = ROOT / "docs" / "cluster.md"

IMAGE = "ghcr.io/your-org/sfam-pipeline:0.1.0"
RAY_VERSION = "2.60.0"
SERVICE_ACCOUNT = "sfam-audit"
CREDENTIALS_SECRET = "sfam-s3-credentials"
GPU = "nvidia.com/gpu"
DNS_1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def yaml_documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def kuberay_objects() -> list[tuple[Path, dict]]:
    return [(path, doc) for path in sorted(KUBERAY.glob("*.yaml")) for doc in yaml_documents(path)]


def find_object(kind: str, name: str) -> tuple[Path, dict]:
    found = [(p, d) for p, d in kuberay_objects() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name} under {KUBERAY}, found {len(found)}"
    return found[0]


def ray_job_specs() -> list[tuple[str, dict, Path]]:
    """(label, RayJob spec, file) for the RayJob and for the RayCronJob's job template."""
    _, rayjob = find_object("RayJob", "sfam-audit")
    cron_path, cron = find_object("RayCronJob", "sfam-audit-nightly")
    return [
        ("RayJob sfam-audit", rayjob["spec"], KUBERAY / "rayjob-audit.yaml"),
        ("RayCronJob sfam-audit-nightly", cron["spec"]["jobTemplate"], cron_path),
    ]


JOB_SPECS = pytest.mark.parametrize("label, spec, path", [pytest.param(*job, id=job[0].split()[0]) for job in ray_job_specs()])


def pod_templates(spec: dict) -> list[dict]:
    cluster = spec["rayClusterSpec"]
    return [cluster["headGroupSpec"]["template"]] + [group["template"] for group in cluster["workerGroupSpecs"]]


def gpu_group(spec: dict) -> dict:
    groups = [g for g in spec["rayClusterSpec"]["workerGroupSpecs"]
              if GPU in g["template"]["spec"]["containers"][0]["resources"].get("limits", {})]
    assert len(groups) == 1, "expected exactly one GPU worker group"
    return groups[0]


def walk(node):
    """Every mapping inside a parsed YAML document."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def shell_words(command: str) -> list[str]:
    """The words of `command` after bash's expansions, as KubeRay's submitter pod runs it."""
    result = subprocess.run(["bash", "-c", f"printf '%s\\n' {command}"], capture_output=True, text=True, check=True)
    return result.stdout.splitlines()


def parse_entrypoint(command: str) -> argparse.Namespace:
    """The entrypoint's arguments, parsed like jobs/audit.py parses them (importing it would pull in Ray)."""
    words = shell_words(command)
    assert words[:3] == ["python", "-m", "jobs.audit"], f"entrypoint must run `python -m jobs.audit`: {command!r}"
    parser = argparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--config", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    return parser.parse_args(words[3:])


def mounted_config(spec: dict, path: Path, config_path: str) -> str:
    """The text of the ConfigMap key that the head mounts at `config_path`."""
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    volumes = {v["name"]: v for v in head.get("volumes", [])}
    for mount in head["containers"][0].get("volumeMounts", []):
        prefix = mount["mountPath"].rstrip("/") + "/"
        if config_path.startswith(prefix) and "configMap" in volumes[mount["name"]]:
            configmap_name = volumes[mount["name"]]["configMap"]["name"]
            key = config_path[len(prefix):]
            configmaps = [d for d in yaml_documents(path) if d["kind"] == "ConfigMap" and d["metadata"]["name"] == configmap_name]
            assert configmaps, f"ConfigMap {configmap_name} must be defined in {path.name}"
            assert key in configmaps[0]["data"], f"ConfigMap {configmap_name} has no key {key}"
            return configmaps[0]["data"][key]
    raise AssertionError(f"{config_path} is not on a ConfigMap volume mounted on the head")


# --- all files ----------------------------------------------------------------------------

def test_expected_files_exist():
    for path in (DOCKERFILE, LAUNCHER, KUBERAY / "rayjob-audit.yaml", KUBERAY / "raycronjob-nightly.yaml",
                 KUBERAY / "serviceaccount.yaml", CLUSTER_DOC):
        assert path.is_file(), path


def test_every_yaml_file_parses_to_objects():
    files = sorted([*INFRA.rglob("*.yaml"), *INFRA.rglob("*.yml")])
    assert len(files) >= 4
    for path in files:
        documents = yaml_documents(path)
        assert documents, f"{path} holds no YAML document"
        assert all(isinstance(doc, dict) for doc in documents), path
    for path, doc in kuberay_objects():
        assert {"apiVersion", "kind", "metadata"} <= doc.keys(), path
        assert DNS_1123.match(doc["metadata"]["name"]), f"{path}: bad name {doc['metadata']['name']!r}"


def test_no_secret_objects_are_shipped():
    """Credentials are created out of band (kubectl create secret), never committed."""
    kinds = {doc["kind"] for _, doc in kuberay_objects()}
    assert "Secret" not in kinds


# --- KubeRay ------------------------------------------------------------------------------

def test_rayjob_lifecycle_fields():
    _, rayjob = find_object("RayJob", "sfam-audit")
    assert rayjob["apiVersion"] == "ray.io/v1"
    spec = rayjob["spec"]
    assert spec["entrypoint"] == "python -m jobs.audit --config /config/audit.yaml"
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] > 0
    assert isinstance(spec["activeDeadlineSeconds"], int) and spec["activeDeadlineSeconds"] > 0
    assert isinstance(spec["backoffLimit"], int) and spec["backoffLimit"] >= 0


# Field names of KubeRay's ray.io/v1 RayJobSpec and RayClusterSpec (ray-operator/apis/ray/v1),
# so that a misspelt field (which the API server would drop or reject) fails here first
RAYJOB_FIELDS = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata", "clusterSelector",
    "submitterConfig", "managedBy", "deletionPolicy", "deletionStrategy", "entrypoint", "runtimeEnvYAML", "jobId",
    "submissionMode", "entrypointResources", "entrypointNumCpus", "entrypointNumGpus", "ttlSecondsAfterFinished",
    "shutdownAfterJobFinishes", "suspend",
}
CLUSTER_FIELDS = {
    "rayVersion", "headGroupSpec", "workerGroupSpecs", "enableInTreeAutoscaling", "autoscalerOptions", "suspend",
    "gcsFaultToleranceOptions", "headServiceAnnotations", "managedBy",
}
HEAD_GROUP_FIELDS = {"rayStartParams", "template", "serviceType", "headService", "enableIngress"}
WORKER_GROUP_FIELDS = {
    "groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template", "numOfHosts",
    "idleTimeoutSeconds", "suspend", "scaleStrategy",
}


@JOB_SPECS
def test_only_kuberay_field_names(label, spec, path):
    assert set(spec) <= RAYJOB_FIELDS, set(spec) - RAYJOB_FIELDS
    cluster = spec["rayClusterSpec"]
    assert set(cluster) <= CLUSTER_FIELDS, set(cluster) - CLUSTER_FIELDS
    assert set(cluster["headGroupSpec"]) <= HEAD_GROUP_FIELDS
    for group in cluster["workerGroupSpecs"]:
        assert set(group) <= WORKER_GROUP_FIELDS, set(group) - WORKER_GROUP_FIELDS


@JOB_SPECS
def test_runtime_env(label, spec, path):
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["env_vars"]["PYTHONUNBUFFERED"] == "1", label


@JOB_SPECS
def test_cluster_image_version_and_gpus(label, spec, path):
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == RAY_VERSION, label
    for template in pod_templates(spec):
        for container in template["spec"]["containers"]:
            assert container["image"] == IMAGE, label
    head = cluster["headGroupSpec"]["template"]["spec"]
    assert GPU not in head["containers"][0]["resources"].get("limits", {}), f"{label}: the head is a CPU node"
    group = gpu_group(spec)
    resources = group["template"]["spec"]["containers"][0]["resources"]
    assert int(resources["limits"][GPU]) == 1
    assert int(resources.get("requests", {}).get(GPU, 1)) == 1, "GPU requests must equal limits"
    tolerations = group["template"]["spec"].get("tolerations", [])
    assert any(t.get("key") == GPU for t in tolerations), f"{label}: GPU workers need a toleration for GPU nodes"
    assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


@JOB_SPECS
def test_entrypoint_runs_the_audit_job_on_a_mounted_config(label, spec, path, tmp_path):
    entrypoint = spec["entrypoint"]
    # KubeRay pastes the entrypoint into `ray job submit ... -- ENTRYPOINT ; fi`
    assert not re.search(r"[;|&`]", entrypoint), f"{label}: the entrypoint must be one plain command"
    args = parse_entrypoint(entrypoint)
    config_file = tmp_path / "audit.yaml"
    config_file.write_text(mounted_config(spec, path, args.config))
    config = load_config(config_file, args.overrides)
    assert isinstance(config, JobConfig)
    assert config.manifest.startswith("s3://") and config.output.startswith("s3://")
    assert config.model.arch == "resnet50"
    group = gpu_group(spec)
    gpus_per_pod = int(group["template"]["spec"]["containers"][0]["resources"]["limits"][GPU])
    assert gpus_per_pod == 1 and 0 < config.gpus_per_actor <= gpus_per_pod
    assert config.num_actors * config.gpus_per_actor == group["replicas"] * gpus_per_pod, \
        f"{label}: num_actors x gpus_per_actor must equal the GPU worker replicas' GPUs"


@JOB_SPECS
def test_credentials_come_from_service_account_or_secret(label, spec, path):
    _, account = find_object("ServiceAccount", SERVICE_ACCOUNT)
    assert re.fullmatch(r"arn:aws:iam::\d{12}:role/[\w+=,.@/-]+", account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"])
    for template in pod_templates(spec):
        assert template["spec"]["serviceAccountName"] == SERVICE_ACCOUNT, label
        for container in template["spec"]["containers"]:
            refs = [source["secretRef"] for source in container.get("envFrom", []) if "secretRef" in source]
            assert refs == [{"name": CREDENTIALS_SECRET, "optional": True}], f"{label}: {container['name']}"
            for variable in container.get("env", []):
                assert "value" not in variable or not re.search(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY", variable["name"]), \
                    f"{label}: {variable['name']} has a literal value"


def test_raycronjob_schedule():
    path, cron = find_object("RayCronJob", "sfam-audit-nightly")
    assert cron["apiVersion"] == "ray.io/v1"
    spec = cron["spec"]
    # only fields of KubeRay's RayCronJob API (v1.6: schedule, suspend, jobTemplate; v1.7: timeZone)
    assert set(spec) <= {"schedule", "suspend", "jobTemplate", "timeZone"}
    fields = spec["schedule"].split()
    assert len(fields) == 5 and all(re.fullmatch(r"[\d*/,-]+", f) for f in fields), spec["schedule"]
    assert spec["schedule"] == "0 2 * * *"
    assert spec.get("suspend", False) is False
    job = spec["jobTemplate"]
    assert "spec" not in job, "jobTemplate is a RayJob spec itself, without a `spec:` wrapper"
    assert job["shutdownAfterJobFinishes"] is True and job["ttlSecondsAfterFinished"] > 0
    # RayCronJob has no concurrencyPolicy: the deadline keeps runs from overlapping
    assert 0 < job["activeDeadlineSeconds"] < 24 * 3600


def test_nightly_run_id_is_derived_from_the_utc_date(tmp_path):
    _, spec, path = ray_job_specs()[1]
    before = dt.datetime.now(dt.timezone.utc).date().isoformat()
    args = parse_entrypoint(spec["entrypoint"])
    after = dt.datetime.now(dt.timezone.utc).date().isoformat()
    config_file = tmp_path / "audit.yaml"
    config_file.write_text(mounted_config(spec, path, args.config))
    config = load_config(config_file, args.overrides)
    assert config.run_id in {f"nightly-{before}", f"nightly-{after}"}
    assert config.run_id.removeprefix("nightly-") in config.manifest


# --- cluster launcher ---------------------------------------------------------------------

def test_launcher_config_matches_rays_schema():
    jsonschema = pytest.importorskip("jsonschema")
    ray_spec = find_spec("ray")  # locates the installed Ray without `import ray`, which is slow
    if ray_spec is None:
        pytest.skip("ray is not installed")
    ray_dir = Path(ray_spec.submodule_search_locations[0])
    schema = json.loads((ray_dir / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(yaml.safe_load(LAUNCHER.read_text()), schema)


def test_launcher_head_and_autoscaled_gpu_workers():
    config = yaml.safe_load(LAUNCHER.read_text())
    assert config["provider"]["type"] == "aws" and config["provider"]["region"]
    assert config["docker"]["image"] == IMAGE
    assert config["idle_timeout_minutes"] > 0
    node_types = config["available_node_types"]
    head = node_types[config["head_node_type"]]
    assert head["node_config"]["InstanceType"] == "m5.2xlarge"
    assert head.get("max_workers", 0) == 0 and "GPU" not in head["resources"]
    gpu_types = [t for name, t in node_types.items() if t["resources"].get("GPU", 0) >= 1]
    assert len(gpu_types) == 1
    worker = gpu_types[0]
    assert worker["resources"]["GPU"] == 1
    assert worker["node_config"]["InstanceType"] == "g5.xlarge"
    assert worker["min_workers"] == 0 < worker["max_workers"] <= config["max_workers"]
    for node_type in node_types.values():  # S3 access through instance roles, not keys
        assert node_type["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::")
    keys = {key.lower() for mapping in walk(config) for key in mapping}
    assert not keys & {"aws_access_key_id", "aws_secret_access_key", "aws_session_token"}


# --- Dockerfile ---------------------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with comments dropped and continuation lines joined."""
    instructions, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        word, _, rest = pending.strip().partition(" ")
        instructions.append((word.upper(), rest.strip()))
        pending = ""
    return instructions


def test_dockerfile_base_is_a_cuda_ray_image_matching_the_project():
    bases = [args for word, args in dockerfile_instructions() if word == "FROM"]
    assert len(bases) == 1
    image = bases[0].split()[0]
    assert re.search(r"cuda|gpu|cu\d{3}", image), f"{image} is not a CUDA image"
    assert RAY_VERSION in image, f"the image's Ray must be the manifests' rayVersion {RAY_VERSION}"
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    ray_requirement = next(Requirement(d) for d in project["dependencies"] if Requirement(d).name == "ray")
    assert ray_requirement.specifier.contains(RAY_VERSION)


def test_dockerfile_installs_the_project_as_a_non_root_user():
    instructions = dockerfile_instructions()
    copied = " ".join(args for word, args in instructions if word == "COPY")
    for source in ("pyproject.toml", "README.md", "pipeline", "jobs"):  # README.md: pyproject's readme
        assert re.search(rf"(^|\s){re.escape(source)}(\s|$)", copied), f"{source} is not copied"
    runs = [args for word, args in instructions if word == "RUN"]
    assert any(re.search(r"pip install\b[^&|;]*\s\.(\s|$)", run) for run in runs), "no `pip install .`"
    users = [args for word, args in instructions if word == "USER"]
    assert users and users[-1] in {"1000", "ray", "1000:100"}, f"final USER is {users[-1:]}"
    assert any(word == "WORKDIR" for word, _ in instructions)
    env = " ".join(args for word, args in instructions if word in {"ENV", "ARG"})
    assert re.search(r"\bPYTHONUNBUFFERED=1\b", env)
    assert not re.search(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY", env, re.IGNORECASE)


# --- credentials --------------------------------------------------------------------------

# `: value` or `= value` with a literal value: not empty, not a $VARIABLE, not a <placeholder>
LITERAL = r"""[ \t]*[:=][ \t]*(?=\S)(?!["']*[ \t]*$)(?!["']?[$<])"""
CREDENTIAL_PATTERNS = {
    "AWS access key id": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "AWS secret access key": re.compile(r"(?im)aws_secret_access_key" + LITERAL),
    "AWS session token": re.compile(r"(?im)aws_session_token" + LITERAL),
    "password": re.compile(r"(?im)\bpassword" + LITERAL),
    "private key": re.compile(r"-----BEGIN[A-Z0-9 ]*PRIVATE KEY-----"),
}


def find_credentials(text: str) -> list[str]:
    return [f"{name}: {match.group(0)!r}" for name, pattern in CREDENTIAL_PATTERNS.items()
            for match in pattern.finditer(text)]


@pytest.mark.parametrize("planted", [
    "AKIA" + "IOSFODNN7EXAMPLE",  # AWS's documentation example, split so that this file holds none
    "aws_secret_access_key = " + "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "AWS_SECRET_ACCESS_KEY: " + "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    "  AWS_SECRET_ACCESS_KEY: '" + "abc12345'",
    "export AWS_SESSION_TOKEN=" + "FwoGZXIvYXdzEXAMPLE",
    "password: " + "hunter2",
    "-----BEGIN " + "RSA PRIVATE KEY-----\nMIIEow...",
    "-----BEGIN " + "OPENSSH PRIVATE KEY-----",
])
def test_credential_scanner_flags_planted_examples(planted):
    assert find_credentials(f"# some file\nkey: value\n{planted}\n")


@pytest.mark.parametrize("clean", [
    "envFrom:\n  - secretRef:\n      name: sfam-s3-credentials",
    "# the Secret holds AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
    '--from-literal=AWS_SECRET_ACCESS_KEY="$AWS_SECRET_ACCESS_KEY"',
    "AWS_SECRET_ACCESS_KEY: ${AWS_SECRET_ACCESS_KEY}",
    "aws_secret_access_key = <your key>",
    "password:\n",
    "eks.amazonaws.com/role-arn: arn:aws:iam::123456789012:role/sfam-audit-s3",
])
def test_credential_scanner_passes_references_and_mentions(clean):
    assert find_credentials(clean) == []


def test_no_credentials_in_infra_or_the_cluster_docs():
    files = [p for p in INFRA.rglob("*") if p.is_file()] + [CLUSTER_DOC]
    assert len(files) >= 5
    found = {str(p.relative_to(ROOT)): hits for p in files if (hits := find_credentials(p.read_text()))}
    assert found == {}


# --- docs ---------------------------------------------------------------------------------

def test_cluster_doc_names_the_commands_and_the_layout():
    text = CLUSTER_DOC.read_text()
    for needle in ("ray job submit --address http://", "--working-dir .", "python -m jobs.audit --config",
                   "kubectl apply -f infra/kuberay/rayjob-audit.yaml", "run_date=", "runs/", "_SUCCESS",
                   "hive_partitioning", "PARTITIONED BY (run_date string, run_id string)", "MSCK REPAIR TABLE"):
        assert needle in text, needle
    for command in re.findall(r"kubectl apply -f (infra/\S+)", text):
        assert (ROOT / command).is_file(), command

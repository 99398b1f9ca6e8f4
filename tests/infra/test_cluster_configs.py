"""Offline checks of the cluster definitions in infra/ (no cloud, no kubectl, no docker).

- Ray cluster launcher YAML: validated against the JSON schema shipped inside the installed Ray,
  then through Ray's own prepare/validate step (what `ray up` runs before touching a cloud).
- KubeRay manifests: structure, worker groups, and the autoscaling config Ray's in-tree
  autoscaler derives from them (the same code the head pod's sidecar runs).
- One Ray version across pyproject.toml, the Dockerfile, image tags and rayVersion.
- Every `cacr` command the manifests and infra/README.md run names a real subcommand, and every
  config file it names exists (training configs also load through pipeline.config).
- No credentials anywhere in infra/.
Each family of checks has a negative control, so a checker that silently accepts everything fails.
"""
from __future__ import annotations

import copy
import json
import re
import shlex
import tomllib
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
LAUNCHER_FILES = sorted((INFRA / "cluster").glob("*.yaml"))
K8S_FILES = sorted((INFRA / "k8s").glob("*.yaml"))
DOCKERFILE = INFRA / "docker" / "Dockerfile"
README = INFRA / "README.md"
TRAIN_CONFIG = ROOT / "conf" / "imagenet-symmetric.yaml"

CACR_SUBCOMMANDS = {"prepare", "inspect", "train", "tune", "evaluate", "export"}
# Subcommands whose --config is a training config (pipeline.config.Config); tune configs have
# their own format and are only required to exist.
TRAINING_CONFIG_SUBCOMMANDS = {"train"}
K8S_KINDS = {"RayCluster", "RayJob", "ServiceAccount"}
IRSA_ANNOTATION = "eks.amazonaws.com/role-arn"


# ---------------------------------------------------------------------------------------------
# Shared facts

def _ray_pin() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = [m.group(1) for d in deps if (m := re.fullmatch(r"\s*ray(?:\[[^\]]*\])?\s*==\s*([\w.]+)\s*", d))]
    assert len(pins) == 1, f"pyproject.toml must pin ray exactly once with ==, found {pins} in {deps}"
    return pins[0]


def _dockerfile_ray_version() -> str:
    text = DOCKERFILE.read_text()
    m = re.search(r"^ARG\s+RAY_VERSION=(\S+)\s*$", text, re.M)
    assert m, "infra/docker/Dockerfile must declare ARG RAY_VERSION=<version>"
    base = re.search(r"^FROM\s+(\S+)", text, re.M)
    assert base and base.group(1).startswith("rayproject/ray:${RAY_VERSION}"), (
        f"the Dockerfile's base image must be rayproject/ray:${{RAY_VERSION}}-..., got {base and base.group(1)}")
    return m.group(1)


def _load_yaml(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path} must hold a mapping"
    return data


def _ray_schema() -> dict[str, Any]:
    spec = find_spec("ray")
    assert spec and spec.submodule_search_locations, "ray is not installed"
    path = Path(list(spec.submodule_search_locations)[0]) / "autoscaler" / "ray-schema.json"
    return json.loads(path.read_text())


def _k8s_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _cluster_specs() -> Iterator[tuple[str, dict[str, Any]]]:
    """(label, RayCluster spec) for every RayCluster and every RayJob's rayClusterSpec."""
    for path in K8S_FILES:
        for i, doc in enumerate(_k8s_docs(path)):
            label = f"{path.relative_to(ROOT)}#{i} {doc.get('kind')}"
            if doc.get("kind") == "RayCluster":
                yield label, doc["spec"]
            elif doc.get("kind") == "RayJob":
                yield label, doc["spec"]["rayClusterSpec"]


def _data_resource() -> str:
    """The custom resource decode tasks require, as the cluster-scale config names it."""
    value = _load_yaml(TRAIN_CONFIG)["data"]["data_resource"]
    assert isinstance(value, str) and value, "conf/imagenet-symmetric.yaml must set data.data_resource"
    return value


def _pod_containers(template: dict[str, Any]) -> list[dict[str, Any]]:
    return template.get("spec", {}).get("containers", [])


# ---------------------------------------------------------------------------------------------
# Ray cluster launcher

def test_launcher_files_exist():
    names = {p.name for p in LAUNCHER_FILES}
    assert "aws.yaml" in names, "infra/cluster/aws.yaml is missing"
    assert len(names) >= 2, f"expected a second provider next to aws.yaml, found {sorted(names)}"


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.name)
def test_launcher_matches_rays_json_schema(path):
    jsonschema.validate(_load_yaml(path), _ray_schema())


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.name)
def test_launcher_passes_rays_prepare_and_validate(path):
    """What `ray up` does before any cloud call: merge provider defaults, then check node types
    (head_node_type exists, sum of min_workers <= max_workers, docker config)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(_load_yaml(path)))


def _bad(mutate):
    def apply(cfg):
        mutate(cfg)
        return cfg
    return apply


INVALID_LAUNCHER_VARIANTS = {
    "typo_top_level_key": _bad(lambda c: c.__setitem__("max_worker", c.pop("max_workers"))),
    "max_workers_is_a_string": _bad(lambda c: c.__setitem__("max_workers", "12")),
    "unknown_docker_key": _bad(lambda c: c["docker"].__setitem__("imagee", c["docker"]["image"])),
    "fractional_custom_resource": _bad(lambda c: c["available_node_types"]["data"]["resources"]
                                       .__setitem__("data", 0.5)),
    "node_type_without_node_config": _bad(lambda c: c["available_node_types"]["gpu"].pop("node_config")),
    "setup_commands_not_a_list": _bad(lambda c: c.__setitem__("setup_commands", "pip install .")),
    "missing_provider": _bad(lambda c: c.pop("provider")),
}


@pytest.mark.parametrize("variant", sorted(INVALID_LAUNCHER_VARIANTS))
def test_launcher_schema_rejects_invalid_variants(variant):
    cfg = INVALID_LAUNCHER_VARIANTS[variant](copy.deepcopy(_load_yaml(INFRA / "cluster" / "aws.yaml")))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(cfg, _ray_schema())


def test_ray_validate_rejects_inconsistent_node_types():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = _load_yaml(INFRA / "cluster" / "aws.yaml")
    cfg["head_node_type"] = "no-such-type"
    with pytest.raises(ValueError):
        validate_config(prepare_config(cfg))
    cfg = _load_yaml(INFRA / "cluster" / "aws.yaml")
    cfg["available_node_types"]["gpu"]["min_workers"] = cfg["max_workers"] + 1
    with pytest.raises(ValueError):
        validate_config(prepare_config(cfg))


def aws_launcher_problems(cfg: dict[str, Any], data_resource: str, ray_version: str) -> list[str]:
    problems = []
    types_ = cfg.get("available_node_types", {})
    head = cfg.get("head_node_type")
    workers = {k: v for k, v in types_.items() if k != head}
    if types_.get(head, {}).get("resources", {}).get("CPU") != 0:
        problems.append("head node type should advertise CPU: 0 (no training/decoding on the head)")
    gpu = [k for k, v in workers.items() if v.get("resources", {}).get("GPU", 0) > 0]
    data = [k for k, v in workers.items() if v.get("resources", {}).get(data_resource, 0) > 0]
    if not gpu:
        problems.append("no worker node type with GPUs")
    if not data:
        problems.append(f"no worker node type with the custom resource '{data_resource}'")
    for k in data:
        if workers[k]["resources"].get("GPU", 0):
            problems.append(f"data node type '{k}' should be CPU-only")
    total_max = 0
    for k, v in workers.items():
        lo, hi = v.get("min_workers", 0), v.get("max_workers")
        if hi is None or not 0 <= lo <= hi:
            problems.append(f"node type '{k}': need 0 <= min_workers <= max_workers, got {lo}, {hi}")
        else:
            total_max += hi
        if hi == 0:
            problems.append(f"node type '{k}' can never start (max_workers 0)")
    if total_max > cfg.get("max_workers", 0):
        problems.append(f"global max_workers {cfg.get('max_workers')} < sum of node max_workers {total_max}")
    for k, v in types_.items():
        if "Arn" not in v.get("node_config", {}).get("IamInstanceProfile", {}):
            problems.append(f"node type '{k}' has no IamInstanceProfile (S3 access must come from it)")
    docker = cfg.get("docker", {})
    if not docker.get("image") or not docker.get("container_name"):
        problems.append("docker.image and docker.container_name must be set")
    elif ray_version not in docker["image"].rsplit(":", 1)[-1]:
        problems.append(f"docker.image tag {docker['image']!r} does not carry Ray {ray_version}")
    return problems


def test_aws_launcher_has_head_gpu_and_data_node_types():
    cfg = _load_yaml(INFRA / "cluster" / "aws.yaml")
    assert aws_launcher_problems(cfg, _data_resource(), _ray_pin()) == []


@pytest.mark.parametrize("break_it", [
    lambda c: c["available_node_types"]["data"]["resources"].pop("data"),
    lambda c: c["available_node_types"]["gpu"]["resources"].pop("GPU"),
    lambda c: c["available_node_types"]["gpu"].__setitem__("min_workers", 9),
    lambda c: c["available_node_types"]["data"]["node_config"].pop("IamInstanceProfile"),
    lambda c: c["docker"].__setitem__("image", "rayproject/ray:2.9.0-gpu"),
    lambda c: c["available_node_types"]["head"]["resources"].pop("CPU"),
], ids=["no-data-resource", "no-gpu", "min-gt-max", "no-instance-profile", "image-version", "head-cpu"])
def test_aws_launcher_checker_catches_mistakes(break_it):
    cfg = _load_yaml(INFRA / "cluster" / "aws.yaml")
    break_it(cfg)
    assert aws_launcher_problems(cfg, _data_resource(), _ray_pin())


def test_local_launcher_gives_cpu_only_nodes_the_data_resource():
    cfg = _load_yaml(INFRA / "cluster" / "local.yaml")
    start = " ".join(cfg["worker_start_ray_commands"])
    m = re.search(r"--resources='(\{[^']*\})'", start)
    assert m, "local.yaml worker start must pass --resources='{...}' for CPU-only nodes"
    assert json.loads(m.group(1)).get(_data_resource(), 0) > 0
    assert "--num-cpus=0" in " ".join(cfg["head_start_ray_commands"])
    assert _ray_pin() in cfg["docker"]["image"].rsplit(":", 1)[-1]


# ---------------------------------------------------------------------------------------------
# KubeRay manifests

def test_k8s_files_exist():
    names = {p.name for p in K8S_FILES}
    for need in ("raycluster.yaml", "rayjob-train.yaml", "rayjob-tune.yaml"):
        assert need in names, f"infra/k8s/{need} is missing"


@pytest.mark.parametrize("path", K8S_FILES, ids=lambda p: p.name)
def test_k8s_documents_are_known_kinds(path):
    docs = _k8s_docs(path)
    assert docs, f"{path} holds no documents"
    for doc in docs:
        assert doc.get("kind") in K8S_KINDS, f"{path}: unexpected kind {doc.get('kind')!r}"
        want = "v1" if doc["kind"] == "ServiceAccount" else "ray.io/v1"
        assert doc.get("apiVersion") == want, f"{path}: {doc['kind']} needs apiVersion {want}"
        assert doc.get("metadata", {}).get("name"), f"{path}: {doc['kind']} without metadata.name"


def test_k8s_file_kinds():
    def kinds(name):
        return [d["kind"] for d in _k8s_docs(INFRA / "k8s" / name)]
    assert "RayCluster" in kinds("raycluster.yaml")
    assert kinds("rayjob-train.yaml") == ["RayJob"]
    assert kinds("rayjob-tune.yaml") == ["RayJob"]


def cluster_spec_problems(spec: dict[str, Any], data_resource: str, ray_version: str) -> list[str]:
    problems = []
    if str(spec.get("rayVersion")) != ray_version:
        problems.append(f"rayVersion {spec.get('rayVersion')!r} != pyproject's ray pin {ray_version}")
    if spec.get("enableInTreeAutoscaling") is not True:
        problems.append("enableInTreeAutoscaling must be true")
    head = spec.get("headGroupSpec")
    if not isinstance(head, dict) or not _pod_containers(head.get("template", {})):
        problems.append("headGroupSpec with a pod template and containers is required")
        head = {}
    groups = spec.get("workerGroupSpecs")
    if not isinstance(groups, list) or not groups:
        return problems + ["workerGroupSpecs must be a non-empty list"]
    gpu_groups, data_groups = [], []
    for g in groups:
        name = g.get("groupName")
        if not name:
            problems.append("a worker group without groupName")
        reps = [g.get(k) for k in ("minReplicas", "replicas", "maxReplicas")]
        if not all(isinstance(r, int) for r in reps) or not 0 <= reps[0] <= reps[1] <= reps[2] or reps[2] < 1:
            problems.append(f"group {name}: need 0 <= minReplicas <= replicas <= maxReplicas, maxReplicas >= 1;"
                            f" got {reps}")
        containers = _pod_containers(g.get("template", {}))
        if not containers:
            problems.append(f"group {name}: pod template has no containers")
            continue
        limits = containers[0].get("resources", {}).get("limits", {})
        gpus = int(limits.get("nvidia.com/gpu", 0))
        custom = {}
        rs = g.get("rayStartParams", {}).get("resources")
        if rs is not None:
            try:
                custom = json.loads(rs.strip()[1:-1].replace("\\", "")) if rs.strip().startswith('"') \
                    else json.loads(rs)
            except ValueError:
                problems.append(f"group {name}: rayStartParams.resources is not a JSON object string: {rs!r}")
        if gpus > 0:
            gpu_groups.append(name)
        if custom.get(data_resource, 0) > 0:
            data_groups.append(name)
            if gpus:
                problems.append(f"data group {name} should be CPU-only")
    if not gpu_groups:
        problems.append("no worker group requests nvidia.com/gpu")
    if not data_groups:
        problems.append(f"no worker group advertises the custom resource '{data_resource}' in rayStartParams")
    for g in [head] + groups:
        tmpl = g.get("template", {})
        if tmpl and not tmpl.get("spec", {}).get("serviceAccountName"):
            problems.append(f"group {g.get('groupName', 'head')}: no serviceAccountName (credentials via IRSA)")
        for c in _pod_containers(tmpl):
            tag = str(c.get("image", "")).rsplit(":", 1)[-1]
            if ray_version not in tag:
                problems.append(f"image {c.get('image')!r} does not carry Ray {ray_version} in its tag")
    return problems


def _spec_params():
    return [pytest.param(label, spec, id=label.split(" ")[0].rsplit("/", 1)[-1]) for label, spec in _cluster_specs()]


@pytest.mark.parametrize("label,spec", _spec_params())
def test_ray_cluster_specs(label, spec):
    assert cluster_spec_problems(spec, _data_resource(), _ray_pin()) == [], label


def _first_spec() -> dict[str, Any]:
    return copy.deepcopy(next(_cluster_specs())[1])


def _group(spec, name):
    return next(g for g in spec["workerGroupSpecs"] if g["groupName"] == name)


@pytest.mark.parametrize("break_it", [
    lambda s: _group(s, "gpu").__setitem__("minReplicas", 5),
    lambda s: _group(s, "gpu").__setitem__("replicas", 9),
    lambda s: _group(s, "gpu")["template"]["spec"]["containers"][0]["resources"]["limits"].pop("nvidia.com/gpu"),
    lambda s: _group(s, "data")["rayStartParams"].pop("resources"),
    lambda s: s.__setitem__("rayVersion", "2.9.0"),
    lambda s: s.__setitem__("enableInTreeAutoscaling", False),
    lambda s: s.pop("workerGroupSpecs"),
    lambda s: _group(s, "data")["template"]["spec"].pop("serviceAccountName"),
    lambda s: s["headGroupSpec"]["template"]["spec"]["containers"][0].__setitem__("image", "rayproject/ray:latest"),
], ids=["min-gt-replicas", "replicas-gt-max", "no-gpu", "no-data-resource", "ray-version", "no-autoscaling",
        "no-worker-groups", "no-service-account", "image-tag"])
def test_cluster_spec_checker_catches_mistakes(break_it):
    spec = _first_spec()
    break_it(spec)
    assert cluster_spec_problems(spec, _data_resource(), _ray_pin())


@pytest.mark.parametrize("label,spec", _spec_params())
def test_kuberay_autoscaler_derives_gpu_and_data_node_types(label, spec):
    """Run the conversion the in-tree autoscaler sidecar applies to the RayCluster (it parses
    rayStartParams.resources and the GPU limits), then check what it will schedule against."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    cr = {"metadata": {"name": "cacr", "namespace": "default"}, "spec": copy.deepcopy(spec)}
    node_types = _derive_autoscaling_config_from_ray_cr(cr)["available_node_types"]
    data_resource = _data_resource()
    gpu = [k for k, v in node_types.items() if v["resources"].get("GPU", 0) > 0]
    data = [k for k, v in node_types.items() if v["resources"].get(data_resource, 0) > 0]
    assert gpu, f"{label}: no node type with GPUs in {node_types}"
    assert data and all(not node_types[k]["resources"].get("GPU") for k in data), (
        f"{label}: no CPU-only node type with '{data_resource}' in {node_types}")
    heads = [v for v in node_types.values() if v["max_workers"] == 0 and v["min_workers"] == 0
             and v["resources"].get("CPU") == 0]
    assert heads, f"{label}: head should advertise CPU 0 (rayStartParams num-cpus: '0')"


def test_service_account_carries_irsa_annotation_and_is_used():
    accounts = {d["metadata"]["name"]: d for p in K8S_FILES for d in _k8s_docs(p) if d["kind"] == "ServiceAccount"}
    assert accounts, "infra/k8s needs a ServiceAccount (IRSA example)"
    for name, sa in accounts.items():
        assert IRSA_ANNOTATION in sa["metadata"].get("annotations", {}), f"ServiceAccount {name} lacks {IRSA_ANNOTATION}"
    for label, spec in _cluster_specs():
        for g in [spec["headGroupSpec"]] + spec["workerGroupSpecs"]:
            used = g["template"]["spec"].get("serviceAccountName")
            assert used in accounts, f"{label}: serviceAccountName {used!r} is not defined in infra/k8s"


# ---------------------------------------------------------------------------------------------
# One Ray version

def test_one_ray_version_everywhere():
    pin = _ray_pin()
    assert _dockerfile_ray_version() == pin, "infra/docker/Dockerfile RAY_VERSION != pyproject's ray pin"
    versions = {label: str(spec["rayVersion"]) for label, spec in _cluster_specs()}
    assert versions and set(versions.values()) == {pin}, versions
    import ray

    assert ray.__version__ == pin, f"installed ray {ray.__version__} != pyproject pin {pin} (schema source)"
    # Any literal rayproject/ray image anywhere in infra/ must be the pinned version too.
    for path in INFRA.rglob("*"):
        if path.is_file():
            for tag in re.findall(r"rayproject/ray:([\w.\-${}]+)", path.read_text()):
                assert tag.startswith(pin) or tag.startswith("${RAY_VERSION}"), f"{path}: rayproject/ray:{tag}"


# ---------------------------------------------------------------------------------------------
# The `cacr` commands the cluster runs

def cacr_invocations(command: str) -> list[tuple[str, list[str]]]:
    """(subcommand, args) for every `cacr <subcommand> ...` inside a shell command line."""
    out = []
    for part in re.split(r"&&|\|\||;|\|", command):
        try:
            tokens = shlex.split(part)
        except ValueError:
            continue
        for i, tok in enumerate(tokens):
            if tok == "cacr" and i + 1 < len(tokens):
                out.append((tokens[i + 1], tokens[i + 2:]))
    return out


def _config_arg(args: list[str]) -> tuple[str | None, list[str]]:
    config, overrides, it = None, [], iter(args)
    for a in it:
        if a in ("--config", "-c"):
            config = next(it, None)
        elif a.startswith("--config="):
            config = a.split("=", 1)[1]
        elif "=" in a and not a.startswith("-"):
            overrides.append(a)
    return config, overrides


def check_invocation(sub: str, args: list[str], where: str) -> None:
    assert sub in CACR_SUBCOMMANDS, f"{where}: `cacr {sub}` is not a cacr subcommand {sorted(CACR_SUBCOMMANDS)}"
    config, overrides = _config_arg(args)
    if sub in ("train", "tune"):
        assert config, f"{where}: `cacr {sub}` on a cluster should name its --config"
    if config is None:
        return
    path = ROOT / config
    assert path.is_file(), f"{where}: config file {config} does not exist in the repository"
    if sub in TRAINING_CONFIG_SUBCOMMANDS:
        from pipeline.config import load_config

        load_config(path, overrides)


def _rayjobs() -> list[tuple[str, dict[str, Any]]]:
    return [(p.name, d) for p in K8S_FILES for d in _k8s_docs(p) if d.get("kind") == "RayJob"]


@pytest.mark.parametrize("name,job", [pytest.param(n, j, id=n) for n, j in _rayjobs()])
def test_rayjob_entrypoints_run_real_cacr_commands(name, job):
    calls = cacr_invocations(job["spec"]["entrypoint"])
    assert calls, f"{name}: entrypoint does not run cacr"
    for sub, args in calls:
        check_invocation(sub, args, name)


def test_rayjobs_cover_train_and_tune():
    subs = {sub for _, job in _rayjobs() for sub, _ in cacr_invocations(job["spec"]["entrypoint"])}
    assert {"train", "tune"} <= subs, subs


def test_rayjob_working_dir_is_the_project_copy_in_the_image():
    """Relative --config paths resolve against the job's working_dir, which must be where the
    Dockerfile puts the project and its conf/."""
    text = DOCKERFILE.read_text()
    workdir = re.findall(r"^WORKDIR\s+(\S+)", text, re.M)[-1]
    assert re.search(r"^COPY\b.*\bconf/\s", text, re.M), "the image must contain conf/"
    for name, job in _rayjobs():
        env = yaml.safe_load(job["spec"].get("runtimeEnvYAML") or "{}") or {}
        assert env.get("working_dir") == workdir, f"{name}: runtimeEnvYAML working_dir != Dockerfile WORKDIR"


def test_invocation_checker_catches_mistakes():
    bad = [
        "cacr trian --config conf/imagenet-symmetric.yaml",
        "cacr train --config conf/no-such-file.yaml",
        "cacr tune --config conf/tune/no-such-file.yaml",
        "cacr train",
    ]
    for cmd in bad:
        (sub, args), = cacr_invocations(cmd)
        with pytest.raises(AssertionError):
            check_invocation(sub, args, cmd)
    (sub, args), = cacr_invocations("cd /x && ray job submit -- cacr train -c conf/imagenet-symmetric.yaml epochs=0")
    with pytest.raises(ValueError):  # ConfigError: the override makes the config invalid
        check_invocation(sub, args, "override")


def _readme_commands() -> list[str]:
    cmds, in_block = [], False
    lines = README.read_text().splitlines()
    buf = ""
    for line in lines:
        if line.strip().startswith("```"):
            in_block = not in_block
            buf = ""
            continue
        if not in_block:
            continue
        line = line.split(" #", 1)[0].rstrip() if not line.lstrip().startswith("#") else ""
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        cmds.append(buf + line)
        buf = ""
    return [c for c in cmds if c.strip()]


def test_readme_cacr_commands_are_real():
    assert README.is_file(), "infra/README.md is missing"
    calls = [(sub, args, cmd) for cmd in _readme_commands() for sub, args in cacr_invocations(cmd)]
    assert any(sub == "train" for sub, _, _ in calls), "infra/README.md shows no `cacr train` command"
    for sub, args, cmd in calls:
        check_invocation(sub, args, f"infra/README.md: {cmd}")


def test_readme_shows_the_cluster_commands():
    text = README.read_text()
    for needle in ("ray up infra/cluster/aws.yaml", "ray job submit", "--working-dir .",
                   "kubectl apply -f infra/k8s/", "tensorboard --logdir s3://"):
        assert needle in text, f"infra/README.md should show `{needle}`"


# ---------------------------------------------------------------------------------------------
# The cluster-scale training config

def test_imagenet_config_loads_and_fits_the_clusters():
    from pipeline.config import load_config

    cfg = load_config(TRAIN_CONFIG)
    assert cfg.use_gpu and cfg.model.arch == "resnet50"
    assert cfg.data.image_size == 224 and cfg.augment.crop_size == 224
    assert cfg.data.url.startswith("s3://") and cfg.storage_path.startswith("s3://")
    assert cfg.data.data_resource == _data_resource()
    # num_workers GPU workers must fit in the GPU capacity the clusters can scale to.
    aws = _load_yaml(INFRA / "cluster" / "aws.yaml")["available_node_types"]
    aws_gpus = sum(v["resources"].get("GPU", 0) * v.get("max_workers", 0) for v in aws.values())
    assert cfg.num_workers <= aws_gpus, f"num_workers {cfg.num_workers} > {aws_gpus} GPUs in aws.yaml"
    for label, spec in _cluster_specs():
        gpus = sum(int(_pod_containers(g["template"])[0].get("resources", {}).get("limits", {})
                       .get("nvidia.com/gpu", 0)) * g["maxReplicas"] for g in spec["workerGroupSpecs"])
        assert cfg.num_workers <= gpus, f"num_workers {cfg.num_workers} > {gpus} GPUs in {label}"


# ---------------------------------------------------------------------------------------------
# No credentials in infra/

_SECRET_PATTERNS = [
    (re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"), "AWS access key id"),
    (re.compile(r"(?i)aws_secret_access_key\s*[=:]\s*['\"]?[A-Za-z0-9/+]{20,}"), "AWS secret access key value"),
    (re.compile(r"(?i)aws_access_key_id\s*[=:]\s*['\"]?[A-Z0-9]{12,}"), "AWS access key id value"),
    (re.compile(r"(?i)aws_session_token\s*[=:]\s*['\"]?[A-Za-z0-9/+=]{20,}"), "AWS session token value"),
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"), "private key"),
]
_SECRET_ENV_NAMES = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}


def credential_findings(text: str) -> list[str]:
    return [what for rx, what in _SECRET_PATTERNS if rx.search(text)]


def _infra_text_files() -> list[Path]:
    return [p for p in INFRA.rglob("*") if p.is_file()] + [TRAIN_CONFIG]


def test_no_credentials_in_infra_files():
    found = {str(p.relative_to(ROOT)): f for p in _infra_text_files() if (f := credential_findings(p.read_text()))}
    assert found == {}


def test_no_credentials_through_k8s_env_secrets_or_launcher_mounts():
    for path in K8S_FILES:
        for doc in _k8s_docs(path):
            assert doc.get("kind") != "Secret", f"{path}: no Secrets in infra (credentials come from IRSA)"
    for label, spec in _cluster_specs():
        for g in [spec["headGroupSpec"]] + spec["workerGroupSpecs"]:
            for c in _pod_containers(g["template"]):
                names = {e.get("name") for e in c.get("env", [])}
                assert not names & _SECRET_ENV_NAMES, f"{label}: {names & _SECRET_ENV_NAMES} set in env"
                assert not c.get("envFrom"), f"{label}: envFrom may smuggle credentials; use IRSA"
    for path in LAUNCHER_FILES:
        cfg = _load_yaml(path)
        for remote, local in (cfg.get("file_mounts") or {}).items():
            assert ".aws" not in f"{remote} {local}", f"{path}: do not ship ~/.aws with file_mounts"
        assert not (cfg.get("auth") or {}).get("ssh_private_key", "").startswith("-----"), path


def test_credential_scanner_catches_literals():
    key_id = "AKIA" + "ABCDEFGHIJKLMNOP"
    secret = "wJalrXUtnFEMI" + "/K7MDENG/bPxRfiCYEXAMPLEKEY"
    assert credential_findings(f"env:\n  - name: X\n    value: {key_id}\n")
    assert credential_findings(f"aws_secret_access_key = {secret}\n")
    assert credential_findings(f"AWS_SECRET_ACCESS_KEY: '{secret}'\n")
    assert credential_findings("-----BEGIN OPENSSH " + "PRIVATE KEY-----\n")
    assert not credential_findings("Never set AWS_SECRET_ACCESS_KEY in these files.\n")

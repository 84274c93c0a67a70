"""The cluster files under clusters/ stay loadable and consistent with the code they launch."""

from __future__ import annotations

import configparser
import copy
import re
import shlex
import zipfile
from pathlib import Path

import pytest
import yaml

from vcritic import config as vconfig

ROOT = Path(__file__).resolve().parent.parent
CLUSTERS = ROOT / "clusters"
YAMLS = sorted(CLUSTERS.glob("*.yaml"))


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTERS / name).read_text())


def setup_cfg() -> configparser.ConfigParser:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    return parser


def pinned(section: str, key: str) -> set[str]:
    return {line.strip() for line in setup_cfg()[section][key].splitlines() if line.strip()}


def ray_version() -> str:
    (pin,) = [p for p in pinned("options", "install_requires") if p.startswith("ray[")]
    return pin.split("==")[1]


def check_train_command(command: str) -> vconfig.DictConfig:
    """``python jobs/train.py <preset> k=v...`` names a real preset and valid overrides."""
    words = shlex.split(command)
    assert words[:2] == ["python", "jobs/train.py"], command
    assert (ROOT / "jobs" / "train.py").exists()
    return vconfig.load(words[2], words[3:])


def pod_groups(cluster_spec: dict) -> list[tuple[str, dict]]:
    groups = [("head", cluster_spec["headGroupSpec"])]
    groups += [(g["groupName"], g) for g in cluster_spec["workerGroupSpecs"]]
    return groups


def test_there_are_cluster_files():
    names = {p.name for p in YAMLS}
    assert {
        "local-multinode.yaml",
        "runtime_env.yaml",
        "kuberay-rayjob.yaml",
        "kuberay-raycluster.yaml",
    } <= names


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.name)
def test_every_yaml_loads_and_starts_with_its_command(path):
    assert isinstance(yaml.safe_load(path.read_text()), dict)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and re.search(r"\b(ray|kubectl)\b", first), first


def test_launcher_config_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = load("local-multinode.yaml")
    prepared = prepare_config(copy.deepcopy(raw))  # what `ray up` does before validating
    validate_config(prepared)
    assert raw["provider"]["type"] == "local"
    (node_type,) = prepared["available_node_types"].values()
    assert node_type["min_workers"] == node_type["max_workers"] == len(raw["provider"]["worker_ips"])


def test_launcher_starts_ray_the_same_way_on_every_node():
    raw = load("local-multinode.yaml")
    head = " ".join(raw["head_start_ray_commands"])
    worker = " ".join(raw["worker_start_ray_commands"])
    assert "ray start --head" in head and "ray start --address=" in worker
    for commands in (head, worker):
        assert "--disable-usage-stats" in commands
        assert "RAY_AUTH_MODE=token" in commands  # one auth mode cluster-wide
    assert "~/.ray/auth_token" in raw["file_mounts"]  # ... and one token
    setup = " ".join(raw["setup_commands"])
    assert "pip install -e '.[gpu]'" in setup and "DS_BUILD_OPS=0" in setup


def test_runtime_env_is_accepted_by_ray_and_excludes_local_state(tmp_path):
    from ray._private.runtime_env.packaging import create_package
    from ray.runtime_env import RuntimeEnv

    env = load("runtime_env.yaml")
    RuntimeEnv(**env)
    assert env["working_dir"] == "."
    assert all(isinstance(v, str) for v in env["env_vars"].values())  # Ray refuses other types
    for key in ("MLFLOW_TRACKING_URI", "RAY_USAGE_STATS_ENABLED", "DS_BUILD_OPS"):
        assert key in env["env_vars"]
    # Package a fake checkout the way `ray job submit` does, ignoring .gitignore.
    src = tmp_path / "checkout"
    for rel in [
        "jobs/train.py",
        "vcritic/config.py",
        ".venv/bin/python",
        "mlflow.db",
        "vcritic_runs/x.parquet",
        "tests/assets/clip.wav",
        "vcritic/__pycache__/config.pyc",
        ".git/HEAD",
    ]:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text("x")
    create_package(str(src), tmp_path / "pkg.zip", include_gitignore=False, excludes=env["excludes"])
    shipped = {n for n in zipfile.ZipFile(tmp_path / "pkg.zip").namelist() if not n.endswith("/")}
    assert shipped == {"jobs/train.py", "vcritic/config.py"}


def test_rayjob_runs_the_joint_preset_on_gpu_workers():
    from ray.runtime_env import RuntimeEnv

    job = load("kuberay-rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert "jobs/train.py" in job["spec"]["entrypoint"]
    cfg = check_train_command(job["spec"]["entrypoint"])
    assert cfg.train.use_gpu and cfg.model.backbone.name == "qwen2_5_omni_thinker"
    assert str(cfg.run.output_dir).startswith("/")  # shared storage, not the job's temp dir
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    RuntimeEnv(**env)
    assert "://" in env["working_dir"]  # the submitter pod has no checkout to upload
    for key in ("MLFLOW_TRACKING_URI", "RAY_USAGE_STATS_ENABLED", "DS_BUILD_OPS"):
        assert key in env["env_vars"]
    expected = pinned("options", "install_requires") | pinned("options.extras_require", "gpu")
    assert set(env["pip"]["packages"]) == expected
    check_gpu_groups(job["spec"]["rayClusterSpec"], cfg, fixed=True)


def test_raycluster_is_long_lived_with_autoscaling_gpu_workers():
    cluster = load("kuberay-raycluster.yaml")
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert cluster["spec"]["enableInTreeAutoscaling"] is True
    check_gpu_groups(cluster["spec"], vconfig.load("joint_text_audio", ["train.num_workers=8"]), fixed=False)


def check_gpu_groups(spec: dict, cfg, fixed: bool) -> None:
    """Worker groups request GPUs, hold cfg's train workers, and leave CPUs for Ray Data."""
    assert spec["rayVersion"] == ray_version()
    assert spec["authOptions"]["mode"] == "token"
    gpus = 0
    for name, group in pod_groups(spec):
        (container,) = group["template"]["spec"]["containers"]
        assert container["image"] == f"rayproject/ray:{ray_version()}-py311-gpu"
        if name == "head":
            assert group["rayStartParams"]["num-cpus"] == "0"  # no training on the head
            continue
        limits = container["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= 1
        assert float(limits["cpu"]) > cfg.train.cpus_per_worker
        if fixed:
            assert group["replicas"] == group["minReplicas"] == group["maxReplicas"]
        gpus += int(limits["nvidia.com/gpu"]) * group["maxReplicas"]
    assert gpus >= cfg.train.num_workers * cfg.train.gpus_per_worker


def test_readme_train_commands_are_valid():
    text = (CLUSTERS / "README.md").read_text().replace("\\\n", " ")
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    commands = [m for block in blocks for m in re.findall(r"python jobs/train\.py[^\n]*", block)]
    presets = {shlex.split(c)[2] for c in commands}
    assert {"demo", "qwen2_5_omni_text", "joint_text_audio"} <= presets
    for command in commands:
        check_train_command(command)

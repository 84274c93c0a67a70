"""`ray job submit --working-dir . -- python jobs/train.py` against a real `ray start --head`."""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    """A head node on free ports, with the venv first on PATH so `python` in the job is ours."""
    ray = str(BIN / "ray")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    port, dashboard = free_port(), free_port()
    temp = Path("/tmp") / f"vcritic-ray-{port}"  # short: Ray's socket paths have a length limit
    start = subprocess.run(
        [ray, "start", "--head", f"--port={port}", "--num-cpus=2", "--disable-usage-stats",
         "--include-dashboard=true", f"--dashboard-port={dashboard}", f"--temp-dir={temp}"],
        env=env, capture_output=True, text=True, timeout=180,
    )
    assert start.returncode == 0, start.stdout + start.stderr
    try:
        yield {"env": env, "address": f"http://127.0.0.1:{dashboard}", "ray": ray}
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.ray_cluster
def test_job_submit_runs_the_training_job(ray_head, tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    submit = subprocess.run(
        [ray_head["ray"], "job", "submit", "--address", ray_head["address"], "--working-dir", ".", "--",
         "python", "jobs/train.py", "demo", "data.demo.songs=8", "data.demo.clips_per_song=2",
         "data.demo.near_duplicates=1", "train.epochs=1", "eval.scq=false", f"run.output_dir={tmp_path / 'runs'}",
         f"mlflow.tracking_uri={uri}", "mlflow.registered_model=vcritic-submitted", "run.name=submitted"],
        # A head started where ~/.ray/auth_token exists requires the token on every request.
        env={**ray_head["env"], "RAY_AUTH_MODE": "token"},
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    out = submit.stdout + submit.stderr
    assert submit.returncode == 0, out[-4000:]
    assert "succeeded" in out, out[-4000:]
    assert "=== vcritic run finished ===" in out
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["vcritic"])
    assert len(runs) == 1 and runs.iloc[0]["status"] == "FINISHED"
    version = mlflow.MlflowClient().get_model_version_by_alias("vcritic-submitted", "champion")
    assert int(version.version) == 1

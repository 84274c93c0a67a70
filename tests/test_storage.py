"""vcritic/storage.py: where outputs go (Ray jobs included), and run.output_dir as an S3 URI
against a real S3-compatible server (moto's, on loopback)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from vcritic import storage
from vcritic.tracking import tracking_uri

BUCKET = "vcritic-test"


@pytest.fixture
def ray_job(monkeypatch, tmp_path):
    """This process as a `ray job submit` entrypoint would see it, with $VCRITIC_HOME in tmp."""
    monkeypatch.setenv(storage.RAY_JOB_ENV, '{"runtime_env": {}, "metadata": {}}')
    monkeypatch.setenv(storage.HOME_ENV, str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path / "home"


def test_relative_output_dir_is_the_working_dir_outside_a_ray_job(monkeypatch, tmp_path):
    monkeypatch.delenv(storage.RAY_JOB_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    assert storage.resolve_output_dir("vcritic_runs") == str(tmp_path / "vcritic_runs")
    assert storage.resolve_output_dir("/abs/runs") == "/abs/runs"
    assert storage.resolve_output_dir("s3://bucket/prefix/") == "s3://bucket/prefix"
    assert storage.staging_dir("/abs/runs") == Path("/abs/runs")


def test_under_a_ray_job_relative_outputs_go_to_vcritic_home(ray_job):
    assert storage.in_ray_job()
    assert storage.resolve_output_dir("vcritic_runs") == str(ray_job / "vcritic_runs")
    assert storage.resolve_output_dir("/abs/runs") == "/abs/runs"
    assert storage.staging_dir("s3://b/p") == ray_job / "staging" / "s3" / "b" / "p"
    assert tracking_uri(None) == f"sqlite:///{ray_job / 'mlflow.db'}"
    assert tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    with pytest.raises(ValueError, match="relative sqlite path.*sqlite:////abs"):
        tracking_uri("sqlite:///mlflow.db")


def test_a_ray_working_dir_copy_is_recognised_by_its_path(monkeypatch, tmp_path):
    monkeypatch.delenv(storage.RAY_JOB_ENV, raising=False)
    copy = tmp_path / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    copy.mkdir(parents=True)
    assert storage.in_ray_working_dir(copy) and not storage.in_ray_working_dir(tmp_path)
    monkeypatch.chdir(copy)
    assert storage.in_ray_job()


def test_experiments_keep_artifacts_outside_the_working_dir(monkeypatch, tmp_path):
    """A new experiment on sqlite stores artifacts beside the database; under a Ray job, one whose
    artifacts would go into Ray's working-directory copy is refused (one database: migrations are slow)."""
    import mlflow

    monkeypatch.delenv(storage.RAY_JOB_ENV, raising=False)
    copy = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_x"
    copy.mkdir(parents=True)
    (tmp_path / "db").mkdir()
    monkeypatch.chdir(tmp_path)
    before = mlflow.get_tracking_uri()
    uri = f"sqlite:///{tmp_path / 'db' / 'mlflow.db'}"
    try:
        mlflow.set_tracking_uri(uri)
        experiment_id = storage.set_experiment("my/exp", uri)
        location = mlflow.get_experiment(experiment_id).artifact_location
        assert location == (tmp_path / "db" / "mlruns" / "my_exp").as_uri()
        assert storage.set_experiment("my/exp", uri) == experiment_id  # an existing one is kept

        monkeypatch.chdir(copy)
        # as MLflow's default (./mlruns of the working directory) makes it for a job in the copy
        mlflow.create_experiment("old", artifact_location=(copy / "mlruns" / "2").as_uri())
        monkeypatch.setenv(storage.RAY_JOB_ENV, "{}")
        with pytest.raises(ValueError, match="inside Ray's temporary copy.*tracking server"):
            storage.set_experiment("old", uri)
        assert storage.set_experiment("my/exp", uri) == experiment_id
        mlflow.create_experiment("served", artifact_location="mlflow-artifacts:/7")  # a server's: fine
        assert storage.set_experiment("served", uri)
    finally:
        mlflow.set_tracking_uri(before)


# -- S3 (moto) ---------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_env():
    """A moto S3 server on loopback with one bucket; the env that points pyarrow (and boto3) at it."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    # pyarrow 25's S3FileSystem reads the endpoint from AWS_ENDPOINT_URL, as the AWS SDKs do.
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    yield env
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def keys(prefix: str) -> list[str]:
    import boto3

    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    # pyarrow's create_dir leaves empty "dir/" marker objects: not files
    return [o["Key"] for page in pages for o in page.get("Contents", []) if not o["Key"].endswith("/")]


def test_directories_go_up_to_s3_and_come_back(s3_env, tmp_path, monkeypatch):
    monkeypatch.setenv(storage.HOME_ENV, str(tmp_path / "home"))
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("alpha")
    (src / "sub" / "b.bin").write_bytes(b"\0\1")
    dest = storage.location(f"s3://{BUCKET}/unit/dir")
    assert not dest.is_local and dest.path == f"{BUCKET}/unit/dir"
    storage.upload_dir(src, dest)
    assert sorted(keys("unit/dir/")) == ["unit/dir/a.txt", "unit/dir/sub/b.bin"]
    back = storage.download_dir(dest, tmp_path / "back")
    assert (back / "a.txt").read_text() == "alpha" and (back / "sub" / "b.bin").read_bytes() == b"\0\1"
    flat = storage.download_dir(dest.join("sub"), tmp_path / "flat")  # files only, no subdirectory
    assert (flat / "b.bin").read_bytes() == b"\0\1"
    storage.write_text(dest.join("marker.json"), "{}")
    assert storage.exists(dest.join("marker.json")) and storage.read_text(dest.join("marker.json")) == "{}"
    # local_copy downloads once per node, then reuses the copy
    first = storage.local_copy(dest.uri)
    assert Path(first, "sub", "b.bin").read_bytes() == b"\0\1" and first.startswith(str(tmp_path / "home"))
    storage.delete_dir(dest)
    assert keys("unit/dir/") == [] and storage.local_copy(dest.uri) == first
    assert storage.local_copy(str(src)) == str(src)


def test_parquet_rows_are_read_from_s3_and_local_dirs(s3_env, tmp_path):
    import pandas as pd

    shards = tmp_path / "val"
    shards.mkdir()
    pd.DataFrame({"x": [1, 2, 3]}).to_parquet(shards / "a.parquet")
    assert storage.read_parquet_rows(str(shards), 2) == [{"x": 1}, {"x": 2}]
    storage.upload_dir(shards, storage.location(f"s3://{BUCKET}/rows/val"))
    assert storage.read_parquet_rows(f"s3://{BUCKET}/rows/val", 5) == [{"x": 1}, {"x": 2}, {"x": 3}]
    assert storage.read_parquet_rows(f"s3://{BUCKET}/rows/missing", 5) == []
    assert storage.read_parquet_rows(str(tmp_path / "missing"), 5) == []


def test_train_storage_path_is_the_uri_for_s3_and_absolute_locally(tmp_path):
    from vcritic.config import load

    assert storage.train_storage_path(load("demo", [f"run.output_dir=s3://{BUCKET}/runs"])) == f"s3://{BUCKET}/runs/ray_results"
    assert storage.train_storage_path(load("demo", [f"run.output_dir={tmp_path}"])) == f"{tmp_path}/ray_results"


def test_a_uri_pyarrow_cannot_open_names_the_fix():
    with pytest.raises(ValueError, match="nosuch://x/y.*s3://bucket/prefix"):
        storage.location("nosuch://x/y")


@pytest.mark.slow
def test_the_demo_job_keeps_its_outputs_in_s3(s3_env, tmp_path, monkeypatch):
    """run.output_dir=s3://...: prepared shards and Ray Train checkpoints land in the bucket, and
    the registered critic loads and critiques from a fresh process."""
    import mlflow
    import ray

    from vcritic.config import load
    from vcritic.train import driver

    monkeypatch.setenv(storage.HOME_ENV, str(tmp_path / "home"))
    if ray.is_initialized():
        ray.shutdown()
    # Every Ray worker (Ray Data tasks, train workers) reaches the bucket with the same env.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {**driver.WORKER_ENV, **s3_env, storage.HOME_ENV: str(tmp_path / "home")}})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    try:
        cfg = load("demo", ["data.demo.songs=8", "data.demo.clips_per_song=2", "data.demo.near_duplicates=1",
                            "data.demo.reactions=0",
                            "train.epochs=1", "eval.scq=false", "train.num_workers=2", f"mlflow.tracking_uri={uri}",
                            f"run.output_dir=s3://{BUCKET}/job", "mlflow.registered_model=vcritic-s3", "run.name=s3"])
        summary = driver.run(cfg)
    finally:
        ray.shutdown()
    fp = Path(summary.prepared.local_root).name
    stored = keys("job/")
    assert f"job/prepared/{fp}/prepared.json" in stored
    for split in ("train", "val"):
        assert any(k.startswith(f"job/prepared/{fp}/{split}/") and k.endswith(".parquet") for k in stored), split
    assert any(k.startswith(f"job/prepared/{fp}/audio_tokenizer/") for k in stored)
    assert summary.best_checkpoint.startswith(f"s3://{BUCKET}/job/ray_results/")
    ckpt = summary.best_checkpoint.removeprefix(f"s3://{BUCKET}/")
    assert any(k.startswith(f"{ckpt}/export/") for k in stored) and any(k.startswith(f"{ckpt}/deepspeed/") for k in stored)
    assert summary.prepared.train_dir == f"s3://{BUCKET}/job/prepared/{fp}/train"
    # Nothing durable went to a relative path here.
    assert not Path("vcritic_runs", "prepared", fp).exists()

    mlflow.set_tracking_uri(uri)
    version = mlflow.MlflowClient().get_model_version_by_alias("vcritic-s3", "champion")
    assert int(version.version) == summary.registered_version == 1
    clip = next(Path(summary.prepared.manifest).parent.glob("audio/demo-000-0.wav"))
    out = predict_in_new_process("vcritic-s3", clip, {"MLFLOW_TRACKING_URI": uri}, tmp_path)
    assert out.strip()


def predict_in_new_process(model: str, clip: Path, env: dict[str, str], cwd: Path) -> str:
    """Load ``models:/<model>@champion`` in a new Python process; returns its critique of ``clip``."""
    code = f"""
import mlflow, pandas as pd
critic = mlflow.pyfunc.load_model("models:/{model}@champion")
out = critic.predict(pd.DataFrame([{{"audio_path": {str(clip)!r}, "persona": "A casual listener."}}]))
print("CRITIQUE:", out["critique"][0])
"""
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=300, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("CRITIQUE: ")]
    assert lines, proc.stdout[-2000:]
    return lines[0].removeprefix("CRITIQUE: ")

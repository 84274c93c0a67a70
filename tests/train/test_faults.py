"""Failures on real Ray clusters: a killed train worker, a removed worker node, a killed driver.

Each job runs the tiny demo for 3 epochs with a checkpoint every 2 optimizer steps and is hit
mid-epoch, after a mid-epoch checkpoint exists. The job must finish with one MLflow run, each
training step logged once, every example of every epoch trained on exactly once, and no more
optimizer steps redone than the checkpoint interval.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from vcritic.config import load

pytestmark = [pytest.mark.slow, pytest.mark.ray_cluster]

ROOT = Path(__file__).resolve().parents[2]
EVERY = 2


def job_overrides(tmp_path: Path, name: str) -> list[str]:
    return [
        f"run.output_dir={tmp_path / 'out'}", f"run.name={name}", f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "data.demo.songs=10", "data.demo.clips_per_song=2", "data.demo.near_duplicates=1", "data.tokenizer_fit_clips=12",
        "data.demo.reactions=0",
        "train.epochs=3", "train.batch_size=2", "train.grad_accum=1", "train.log_every_steps=1",
        f"train.checkpoint_every_steps={EVERY}", "train.max_failures=3", "eval.scq=false", "mlflow.register=false",
    ]


def registered_positions(root: Path) -> list[dict]:
    """Data positions of the checkpoints Ray Train has registered (in its snapshot file): a
    checkpoint folder appears while it is uploaded, but a restart resumes only registered ones."""
    out = []
    for snapshot in root.glob("ray_results/*/checkpoint_manager_snapshot.json"):
        try:
            state = json.loads(snapshot.read_text())
            latest = (state.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
            if latest:
                out.append(json.loads((snapshot.parent / latest / "data_position.json").read_text()))
        except (OSError, ValueError):  # being written
            continue
    return out


def wait_for_mid_epoch_checkpoint(root: Path, timeout: float = 900) -> dict:
    """Block until Ray Train's latest registered checkpoint was taken inside epoch 1 or later;
    returns its data position."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        mid = [p for p in registered_positions(root) if not p["epoch_complete"] and p["epoch"] >= 1]
        if mid:
            return mid[0]
        time.sleep(0.2)
    raise AssertionError(f"no registered mid-epoch checkpoint under {root} after {timeout} s")


def check_one_clean_run(tracking_uri: str, train_rows: int, workers: int) -> dict[str, float]:
    """One MLflow run; each step's train_loss logged once; each epoch trained every example once."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    (experiment,) = [e for e in client.search_experiments() if e.name == "vcritic"]
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, [(r.info.run_id, r.info.status) for r in runs]
    run = runs[0]
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
    assert len(steps) == len(set(steps)), f"repeated metric steps: {sorted(steps)}"
    assert steps and sorted(steps) == list(range(1, max(steps) + 1))
    examples = client.get_metric_history(run.info.run_id, "epoch_examples")
    repeats = client.get_metric_history(run.info.run_id, "epoch_repeated_examples")
    assert len(examples) == 3 and all(m.value == 0 for m in repeats), (examples, repeats)
    # Ray Train's equal split drops train_rows % workers rows an epoch; nothing else is lost.
    assert all(train_rows - workers < m.value <= train_rows for m in examples), (train_rows, examples)
    return run.data.metrics


@pytest.fixture
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    from vcritic.train.driver import WORKER_ENV

    if ray.is_initialized():
        ray.shutdown()
    # The head keeps 2 CPUs for Ray Data and the driver's actors; train workers ask for the
    # "trainer" resource, which only the two worker nodes have, so a whole worker node can go.
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    # Connect before the worker nodes exist, so the driver (and with it Ray Train's controller and
    # the progress board, which stay on the driver's node) is on the head, which is never removed.
    ray.init(address=c.address, log_to_driver=False, runtime_env={"env_vars": WORKER_ENV})
    for _ in range(2):
        c.add_node(num_cpus=1, resources={"trainer": 2})
    c.wait_for_nodes()
    yield c
    ray.shutdown()
    c.shutdown()


def train_workers() -> list:
    from ray.util.state import list_actors

    return list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])


def run_with(cfg, strike) -> object:
    """Run the job in this process while ``strike`` (in a thread) waits for its moment and hits."""
    from vcritic.train.driver import run

    failures: list[BaseException] = []

    def hit() -> None:
        try:
            strike()
        except BaseException as exc:  # surfaced after the run
            failures.append(exc)

    thread = threading.Thread(target=hit, daemon=True)
    thread.start()
    summary = run(cfg)
    thread.join(timeout=60)
    assert not failures, failures
    return summary


def cluster_cfg(tmp_path: Path, name: str):
    return load("demo", job_overrides(tmp_path, name) + ["train.num_workers=2", "train.cpus_per_worker=0.5",
                                                          "train.worker_resources={trainer: 1}"])


def check_restart(summary, tmp_path: Path) -> None:
    history = summary.train_history
    assert history["starts"] >= 2, history  # the worker group was restarted...
    assert 0 < history["resumed_from"][1]  # ...from a checkpoint, not from scratch
    assert 0 <= history["steps_redone"] <= EVERY, history  # losing at most the checkpoint interval
    metrics = check_one_clean_run(f"sqlite:///{tmp_path / 'mlflow.db'}", summary.prepared.counts["train"], 2)
    assert metrics["train_steps_redone"] == history["steps_redone"]


def test_a_killed_train_worker_restarts_from_the_last_checkpoint(cluster, tmp_path):
    cfg = cluster_cfg(tmp_path, "kill-worker")

    def strike() -> None:
        wait_for_mid_epoch_checkpoint(tmp_path / "out")
        victim = train_workers()[0]
        os.kill(victim.pid, signal.SIGKILL)

    check_restart(run_with(cfg, strike), tmp_path)


def test_a_lost_worker_node_restarts_training_on_another(cluster, tmp_path):
    cfg = cluster_cfg(tmp_path, "kill-node")
    removed: list[str] = []

    def strike() -> None:
        import ray

        wait_for_mid_epoch_checkpoint(tmp_path / "out")
        nodes = {w.node_id for w in train_workers()}
        assert ray.get_runtime_context().get_node_id() not in nodes  # the driver's node stays
        victim = next(n for n in cluster.worker_nodes if n.node_id in nodes)
        removed.append(victim.node_id)
        cluster.remove_node(victim, allow_graceful=False)

    summary = run_with(cfg, strike)
    assert removed
    check_restart(summary, tmp_path)


def test_a_killed_driver_resumes_when_the_same_command_runs_again(tmp_path):
    command = [sys.executable, "jobs/train.py", "demo", *job_overrides(tmp_path, "kill-driver"),
               "train.num_workers=2", "ray.num_cpus=3"]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        at = wait_for_mid_epoch_checkpoint(tmp_path / "out")
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the driver and the local Ray it started
        first.wait(timeout=60)
    assert first.returncode == -signal.SIGKILL
    time.sleep(2)

    again = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-4000:]
    assert "continuing unfinished MLflow run" in out
    train_rows = int(next(line for line in out.splitlines() if line.startswith("data ")).split(",")[1].split()[0])
    metrics = check_one_clean_run(f"sqlite:///{tmp_path / 'mlflow.db'}", train_rows, 2)
    assert metrics["train_resumed_from_step"] >= at["global_step"] > 0

"""`ray job submit --working-dir . -- python jobs/train.py` against a real `ray start --head`,
tracking to a real `mlflow server`: the registered critic is looked up afterwards from the
submitting directory, and nothing the job keeps is left in Ray's temporary working-dir copy."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

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
    port, dashboard, agent, client = free_port(), free_port(), free_port(), free_port()
    temp = Path("/tmp") / f"vcritic-ray-{port}"  # short: Ray's socket paths have a length limit
    # Every port this head listens on is a free one: with the defaults (agent 52365, client 10001)
    # a second Ray head on the machine leaves this one without a job agent ("No available agent").
    start = subprocess.run(
        [ray, "start", "--head", f"--port={port}", "--num-cpus=2", "--disable-usage-stats",
         "--include-dashboard=true", f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={agent}",
         f"--ray-client-server-port={client}", f"--temp-dir={temp}"],
        env=env, capture_output=True, text=True, timeout=180,
    )
    try:
        assert start.returncode == 0, start.stdout + start.stderr
        yield {"env": env, "address": f"http://127.0.0.1:{dashboard}", "ray": ray, "temp": temp}
    finally:
        stop_head(temp)
        shutil.rmtree(temp, ignore_errors=True)


def stop_head(temp: Path) -> None:
    """Stop this head's processes only (those naming its temp dir, and their children):
    `ray stop` would stop every Ray on the machine, other people's included."""
    import psutil

    me = os.getpid()
    roots = [p for p in psutil.process_iter(["cmdline"])
             if p.pid != me and any(str(temp) in arg for arg in (p.info["cmdline"] or []))]
    procs: dict[int, psutil.Process] = {}
    for root in roots:
        try:
            procs.update({p.pid: p for p in [root, *root.children(recursive=True)]})
        except psutil.NoSuchProcess:
            continue
    for proc in procs.values():
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(procs.values()), timeout=10)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.fixture
def mlflow_server(tmp_path):
    """`mlflow server` on loopback: sqlite backend, artifacts served by the server (clients upload
    and download through it, so no client needs the server's disk). Yields its URI."""
    port = free_port()
    store = tmp_path / "mlflow-server"
    store.mkdir()
    log = (store / "server.log").open("w")
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
         "--artifacts-destination", str(store / "artifacts"), "--serve-artifacts",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}, stdout=log, stderr=subprocess.STDOUT, cwd=store)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, (store / "server.log").read_text()[-3000:]
            try:
                if requests.get(f"{uri}/health", timeout=10).ok:
                    break
            except requests.RequestException:  # not listening yet, or too busy starting to answer
                pass
            assert time.monotonic() < deadline, (store / "server.log").read_text()[-3000:]
            time.sleep(0.5)
        yield {"uri": uri, "store": store}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def working_dir_copies(temp: Path) -> list[Path]:
    """The copies Ray made of submitted working directories under a head's temp dir."""
    return [p for p in temp.glob("session_*/runtime_resources/working_dir_files/*") if p.is_dir()]


def submit_job(ray_head, args: list[str]) -> subprocess.CompletedProcess:
    """`ray job submit --working-dir . <args>` from the repository root. A head that has just
    started may not have its job agent up yet ("No available agent"): that refusal is retried."""
    for _ in range(10):
        submit = subprocess.run(
            [ray_head["ray"], "job", "submit", "--address", ray_head["address"], "--working-dir", ".", *args],
            # A head started where ~/.ray/auth_token exists requires the token on every request.
            env={**ray_head["env"], "RAY_AUTH_MODE": "token"},
            cwd=ROOT, capture_output=True, text=True, timeout=900,
        )
        if "No available agent to submit job" not in submit.stdout + submit.stderr:
            break
        time.sleep(5)
    return submit


@pytest.mark.ray_cluster
@pytest.mark.slow
def test_submitted_job_is_looked_up_afterwards_from_the_submitting_directory(ray_head, mlflow_server, tmp_path):
    """No run.output_dir and no mlflow.tracking_uri on the command line: the tracking server comes
    through the runtime env, outputs go under $VCRITIC_HOME, and the champion loads afterwards."""
    home = tmp_path / "home"
    runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": mlflow_server["uri"], "VCRITIC_HOME": str(home)}}
    submit = submit_job(ray_head, [
        "--runtime-env-json", json.dumps(runtime_env), "--",
        "python", "jobs/train.py", "demo", "data.demo.songs=8", "data.demo.clips_per_song=2",
        "data.demo.near_duplicates=1", "data.demo.reactions=0", "train.epochs=1", "eval.scq=false",
        "mlflow.registered_model=vcritic-submitted", "run.name=submitted"])
    out = submit.stdout + submit.stderr
    assert submit.returncode == 0, out[-4000:]
    assert "succeeded" in out, out[-4000:]
    assert "=== vcritic run finished ===" in out
    runs = home / "vcritic_runs"
    # said at start (a warning, so it reaches the console) where the relative default went
    assert "relative run.output_dir='vcritic_runs' goes to" in out and str(runs) in out, out[-4000:]
    assert f"best checkpoint: {runs / 'ray_results'}" in out
    assert list((runs / "prepared").glob("*/train/*.parquet"))
    assert list((runs / "ray_results").glob("*/checkpoint_*/export/critic.json"))

    copies = working_dir_copies(ray_head["temp"])
    assert copies, "Ray's working-dir copy should still be there to inspect"
    for copy in copies:
        left = [p.name for p in copy.iterdir() if p.name in ("mlflow.db", "mlruns", "mlartifacts", "vcritic_runs")]
        assert left == [], f"{copy} holds {left}"
    assert list((mlflow_server["store"] / "artifacts").rglob("MLmodel"))  # the server holds the model

    # Afterwards, from the submitting directory, in a new process: the champion critiques a clip.
    clip = runs / "demo_data" / "audio" / "demo-000-0.wav"
    code = f"""
import mlflow, pandas as pd
critic = mlflow.pyfunc.load_model("models:/vcritic-submitted@champion")
out = critic.predict(pd.DataFrame([{{"audio_path": {str(clip)!r}, "persona": "A casual listener."}}]))
print("CRITIQUE:", out["critique"][0])
"""
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server["uri"]}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    critique = [line for line in proc.stdout.splitlines() if line.startswith("CRITIQUE: ")]
    assert critique and critique[0].removeprefix("CRITIQUE: ").strip(), proc.stdout[-2000:]

"""The whole job on a small demo set, with a third-party backbone plugin, on a real local Ray.

One run (module fixture, ~2-3 min on 2 CPU cores) feeds every assertion below.
"""

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vcritic.config import load
from vcritic.testing.thirdparty import write_plugin_package

REGISTERED = "vcritic-e2e"


def overrides(root: Path, uri: str) -> list[str]:
    """The small job both the main run and the resumed run use."""
    return ["model.backbone.name=acme_llama", f"run.output_dir={root / 'runs'}", f"mlflow.tracking_uri={uri}",
            "data.demo.songs=12", "data.demo.clips_per_song=2", "data.demo.near_duplicates=2", "train.epochs=2"]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    import mlflow
    import ray

    from vcritic.train import driver

    root = tmp_path_factory.mktemp("e2e")
    site = write_plugin_package(root / "site")
    sys.path.insert(0, str(site))
    if ray.is_initialized():
        ray.shutdown()
    # Ray workers are other processes: they find the third-party package through PYTHONPATH,
    # as they would find a pip-installed one in their environment.
    pythonpath = os.pathsep.join([str(site), str(Path(__file__).resolve().parents[2])])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {**driver.WORKER_ENV, "PYTHONPATH": pythonpath}})
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = load("demo", overrides(root, uri) + [
        f"mlflow.registered_model={REGISTERED}", "train.checkpoints_to_keep=3", "train.log_every_steps=1",
        "eval.scq_max_clips=6", "run.name=e2e",
    ])
    console = io.StringIO()  # what the job prints (its live display, warnings) while it runs
    with contextlib.redirect_stdout(console), contextlib.redirect_stderr(console):
        summary = driver.run(cfg)
    mlflow.set_tracking_uri(uri)
    yield {"summary": summary, "cfg": cfg, "root": root, "site": site, "uri": uri, "console": console.getvalue()}
    ray.shutdown()
    sys.path.remove(str(site))


def history(job, key):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(job["uri"])
    return [m.value for m in sorted(client.get_metric_history(job["summary"].run_id, key), key=lambda m: m.step)]


def test_the_console_is_short_and_the_log_file_has_the_details(job):
    """A few status lines on the console; Ray Data's and vcritic's INFO lines in the run's log file."""
    from vcritic import progress

    lines = job["console"].splitlines()
    assert len(lines) < 60, job["console"][-3000:]
    log_file = progress.log_file()
    assert log_file is not None and log_file.parent == (job["root"] / "runs" / "logs").resolve()
    assert f"log file: {log_file}" in job["console"] and "Ray worker logs: " in job["console"]
    assert any(line.startswith("done: preparing data") and "rows/s" in line for line in lines), lines
    assert any(line.startswith("done: training") for line in lines), lines
    text = log_file.read_text()
    assert "Execution plan of Dataset" in text and "vcritic.train.driver: data: " in text


def test_bad_rows_are_quarantined_with_reasons_and_the_job_goes_on(job):
    s = job["summary"]
    rows = [json.loads(line) for line in Path(s.prepared.quarantine_path).read_text().splitlines()]
    reasons = {r["example_id"]: r["error"] for r in rows}
    assert "cannot decode audio" in reasons["demo-bad-corrupt"]
    assert "missing required field(s) target_text" in reasons["demo-bad-missing-field"]
    assert s.prepared.counts["quarantined"] == 2
    assert s.prepared.counts["train"] > 0 and s.prepared.counts["val"] > 0
    dups = [json.loads(line) for line in Path(s.prepared.duplicates_path).read_text().splitlines()]
    manifest = [json.loads(line) for line in Path(s.prepared.manifest).read_text().splitlines()]
    planted = {r["example_id"] for r in manifest if r["example_id"].endswith("-dup")}
    assert len(planted) == 2 and planted <= {d["example_id"] for d in dups}
    assert all("near-duplicate of" in d["reason"] for d in dups)


def test_loss_curves_go_down_and_are_logged_per_stream(job):
    for key in ("train_text_loss", "train_audio_loss"):
        curve = history(job, key)
        assert len(curve) >= 2, key
        assert curve[-1] < curve[0], (key, curve)
    val = history(job, "val_loss")
    assert len(val) == 2 and val[-1] < val[0]
    assert history(job, "tokens_per_s")[-1] > 0


def test_the_third_party_backbone_was_used(job):
    export = Path(job["summary"].best_checkpoint) / "export"
    meta = json.loads((export / "critic.json").read_text())
    assert meta["backbone"]["name"] == "acme_llama"
    assert json.loads((export / "base" / "config.json").read_text())["model_type"] == "llama"


def test_params_artifacts_and_scq(job):
    import mlflow

    run = mlflow.get_run(job["summary"].run_id)
    assert run.data.params["model.backbone.name"] == "acme_llama"
    assert run.data.params["train.zero_stage"] == "2"
    m = run.data.metrics
    for key in ("scq_accuracy_before", "scq_accuracy_after", "best_val_loss", "data_quarantined"):
        assert key in m
    assert 0.0 <= m["scq_accuracy_after"] <= 1.0
    names = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "data")}
    assert "data/quarantine.jsonl" in names
    summary = mlflow.load_table("data/summary.json", run_ids=[run.info.run_id])
    assert summary["examples"].sum() == sum(job["summary"].prepared.counts[k] for k in ("train", "val", "test"))
    assert {"data/samples.json", "data/quarantine_by_stage.json"} <= names


def test_scq_asks_about_the_test_split_which_no_training_or_selection_saw(job):
    """SCQ runs on the held-out test songs (disjoint from train and val), logs its full report
    before and after, and leaves a public-format question file for jobs/evaluate.py.

    Not asserted: that the trained critic beats the untrained one there. On the demo it does not
    yet (it answers with the facts most frequent among the training songs, and the demo balances
    facts per block of songs, so held-out songs' values are the rarest in train); see README."""
    import mlflow
    import pandas as pd

    from vcritic.evaluate.scq import load_questions

    s = job["summary"]
    run = mlflow.get_run(s.run_id)
    assert run.data.tags["scq_split"] == "test"
    test, val, train = (set(pd.read_parquet(d)["song_id"]) for d in (s.prepared.test_dir, s.prepared.val_dir,
                                                                      s.prepared.train_dir))
    assert test and not test & val and not test & train and s.prepared.counts["test"] == run.data.metrics["data_test"]
    for name in ("before", "after"):
        report = mlflow.artifacts.load_dict(f"runs:/{s.run_id}/scq/{name}.json")
        assert report["mode"] == "cloze" and report["questions"] == run.data.metrics[f"scq_questions_{name}"]
        assert {r["id"] for r in report["results"]} <= {f"demo-{song[-3:]}-{c}" for song in test for c in range(9)}
    questions = load_questions(s.scq_file)
    assert len(questions) == run.data.metrics["scq_questions_after"]
    assert {q.group for q in questions} == {"musical knowledge", "instrumentation"}


def test_best_checkpoint_is_lowest_val_loss(job):
    s = job["summary"]
    assert s.best_val_loss == pytest.approx(min(history(job, "val_loss")))


def test_registered_alias_loads_and_predicts_in_a_separate_process(job, tmp_path):
    from mlflow.tracking import MlflowClient

    version = MlflowClient(job["uri"]).get_model_version_by_alias(REGISTERED, "champion")
    assert int(version.version) == job["summary"].registered_version
    clip = next(Path(job["summary"].prepared.manifest).parent.glob("audio/demo-000-0.wav"))
    code = f"""
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model("models:/{REGISTERED}@champion")
out = model.predict(pd.DataFrame([{{"audio_path": {str(clip)!r}, "persona": "A casual listener."}}]),
                    params={{"speech_dir": {str(tmp_path)!r}}})
print("CRITIQUE:", out["critique"][0])
print("SPEECH:", out["speech_path"][0])
"""
    env = {**os.environ, "MLFLOW_TRACKING_URI": job["uri"], "PYTHONPATH": str(job["site"])}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if line.startswith(("CRITIQUE", "SPEECH")))
    assert len(lines["CRITIQUE"].strip()) > 0
    import soundfile as sf

    assert sf.info(lines["SPEECH"].strip()).samplerate == 16000


def test_resume_continues_from_a_checkpoint(job):
    """A new fit started from the epoch-1 checkpoint trains only the remaining epoch."""
    from vcritic.train.driver import _trainer

    s, cfg = job["summary"], job["cfg"]
    checkpoints = sorted((Path(s.best_checkpoint).parent).glob("checkpoint_*"))
    first = checkpoints[0]
    resumed = load("demo", overrides(job["root"], job["uri"]) + ["run.name=e2e-resume", f"train.resume_from={first}"])
    result = _trainer(resumed, s.prepared, {"tracking_uri": job["uri"], "run_id": ""}).fit()
    epochs = list(result.metrics_dataframe["epoch"])
    assert epochs == [1], epochs
    assert cfg.train.epochs == 2

"""jobs/critique.py end to end: a tiny critic over a folder with one broken file, on Ray Data actors,
tracked to MLflow. Heavy (starts Ray, runs the job): run under the shared lock."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from vcritic.testing import reward_toy as rt
from vcritic.testing import write_wav

ROOT = Path(__file__).resolve().parent.parent


def _job():
    spec = importlib.util.spec_from_file_location("critique_job", ROOT / "jobs" / "critique.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """An untrained toy critic that speaks (λ < 1), exported."""
    root = tmp_path_factory.mktemp("critic")
    tunes = rt.melodies(2)
    clips = rt.toy_clips(range(2), tunes)
    toy = rt.build_toy_critic(root / "work", [c.samples for c in clips], loss_lambda=2 / 3)
    return rt.save_toy_export(toy, root / "export")


def test_read_inputs_folder_and_manifests(tmp_path):
    job = _job()
    write_wav(str(tmp_path / "a" / "one.wav"), rt.render(rt.melodies(1)[0]))
    (tmp_path / "notes.txt").write_text("not audio")
    rows = job.read_inputs(tmp_path, "P", "C", ["wav"])
    assert [r["audio_path"] for r in rows] == [str(tmp_path / "a" / "one.wav")]
    assert rows[0]["persona"] == "P" and rows[0]["id"] == "00000_a__one"
    (tmp_path / "m.jsonl").write_text(json.dumps({"audio_path": "a/one.wav", "persona": "Q", "id": "x"}) + "\n")
    assert job.read_inputs(tmp_path / "m.jsonl", "P", "C", [])[0] | {"index": 0} == {
        "index": 0, "id": "x", "audio_path": str(tmp_path / "a" / "one.wav"), "offset_s": 0.0, "duration_s": -1.0,
        "persona": "Q", "context": "C"}
    (tmp_path / "m.csv").write_text("audio_path,context\na/one.wav,in G\n")
    assert job.read_inputs(tmp_path / "m.csv", "P", "", [])[0]["context"] == "in G"
    (tmp_path / "bad.jsonl").write_text(json.dumps({"path": "a/one.wav"}) + "\n")
    with pytest.raises(job.InputError, match="needs an audio_path"):
        job.read_inputs(tmp_path / "bad.jsonl", "P", "", [])
    with pytest.raises(job.InputError, match="does not exist"):
        job.read_inputs(tmp_path / "nowhere", "P", "", [])
    with pytest.raises(job.InputError, match="holds no audio files"):
        job.read_inputs(tmp_path / "a", "P", "", ["flac"])


def test_the_job_critiques_a_folder_and_logs_to_mlflow(export, tmp_path, monkeypatch):
    import mlflow

    from vcritic.config import load
    from vcritic.tracking import log_critic

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    clips = tmp_path / "clips"
    tunes = rt.melodies(3, seed=4)
    for i in range(3):
        write_wav(str(clips / f"song{i}.wav"), rt.render(tunes[i], seed=i))
    (clips / "broken.wav").write_bytes(b"RIFF this is not a wav file")
    # The critic as a logged MLflow model: the job loads it by URI, as from the registry.
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(db)
    mlflow.set_experiment("critics")
    with mlflow.start_run():
        model_uri = log_critic(export).model_uri  # models:/m-<id>

    job = _job()
    cfg = load("demo", [f"mlflow.tracking_uri={db}", "mlflow.experiment=critiques", "ray.num_cpus=2",
                        f"critique.output_dir={tmp_path / 'out'}", "critique.batch_size=2", "critique.concurrency=2",
                        "critique.max_text_tokens=6", "critique.max_audio_tokens=5"])
    try:
        summary = job.run(model_uri, str(clips), cfg)
    finally:
        import ray

        ray.shutdown()
    out = Path(summary["output_dir"])
    lines = [json.loads(line) for line in Path(summary["jsonl"]).read_text().splitlines()]
    assert [Path(r["audio_path"]).name for r in lines] == ["broken.wav", "song0.wav", "song1.wav", "song2.wav"]
    broken, good = lines[0], lines[1:]
    assert broken["error"].startswith("load: ") and "cannot decode audio" in broken["error"] and not broken["critique"]
    assert summary["clips"] == 4 and summary["failed"] == 1
    for r in good:
        assert r["error"] == "" and isinstance(r["critique"], str) and r["persona"] == cfg.critique.persona
        assert (out / r["speech_path"]).stat().st_size > 44  # a wav with samples
    report = Path(summary["report"]).read_text()
    assert report.count("<audio") == 4 + 3 and "cannot decode audio" in report
    assert all(r["speech_path"] in report for r in good) and (out / "clips" / f"{good[0]['id']}.wav").exists()

    client = mlflow.MlflowClient(db)
    job_run = client.get_run(summary["run_id"])
    assert client.get_experiment(job_run.info.experiment_id).name == "critiques"
    assert job_run.data.metrics["clips_failed"] == 1 and job_run.data.metrics["clips_critiqued"] == 3
    assert job_run.data.params["model_uri"] == model_uri
    logged = {a.path for a in client.list_artifacts(summary["run_id"], "critiques")}
    assert {"critiques/critiques.jsonl", "critiques/report.html", "critiques/speech", "critiques/clips"} <= logged
    assert len(client.list_artifacts(summary["run_id"], "critiques/speech")) == 3


def test_bad_input_is_a_clear_error(export, tmp_path, capsys):
    job = _job()
    assert job.main([str(export), str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert job.main([str(export), str(tmp_path), "critique.nope=1"]) == 2
    assert "config error" in capsys.readouterr().err

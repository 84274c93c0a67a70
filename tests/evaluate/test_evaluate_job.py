"""jobs/evaluate.py end to end: a registered critic loaded by alias, SCQ in two modes (and OEQ
when vcritic.evaluate.oeq exists), metrics and files in a new MLflow run, a table on stdout.

The critic is a tiny untrained export registered in a throwaway sqlite MLflow (building it takes
seconds; what is measured here is the job's plumbing, not the critic's skill)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vcritic.testing.dummies import sine, write_wav

ROOT = Path(__file__).resolve().parents[2]
REGISTERED = "vcritic-eval-test"


@pytest.fixture(scope="module")
def champion(tmp_path_factory):
    """A tiny export, logged and registered as ``models:/vcritic-eval-test@champion``."""
    import mlflow
    import torch

    from vcritic import storage
    from vcritic.config import load, to_dict
    from vcritic.models import build
    from vcritic.registry import create
    from vcritic.tracking import log_critic, register

    root = tmp_path_factory.mktemp("evaljob")
    corpus = ["Persona: a fan.\nAbout the song: Question: Key?\nListen and critique:", " it sits in G major."] * 10
    spec = build.materialize_backbone(
        {"name": "causal_lm", "options": {"config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                                                     "num_attention_heads": 4, "num_key_value_heads": 2},
                                          "tokenizer_vocab_size": 300}}, corpus, root / "base")
    tok_spec = {"name": "mel_kmeans", "options": {"codebook_size": 8, "frame_rate": 12.5}}
    tok = create("audio_tokenizers", "mel_kmeans", **tok_spec["options"])
    tok.fit([sine(f, 1.5) for f in (220.0, 330.0, 440.0, 550.0)])
    tok.save(str(root / "audio_tokenizer"))
    model_cfg = to_dict(load(None).model)
    torch.manual_seed(0)
    model, tokenizer = build.build_critic(spec, model_cfg, tok.codebook_size, tok.feature_dim,
                                          num_codebooks=tok.num_codebooks)
    export = build.save_export(model, tokenizer, spec, tok_spec, root / "audio_tokenizer", model_cfg, root / "export")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    storage.set_experiment("vcritic", uri)
    with mlflow.start_run():
        info = log_critic(export)
    register(info.model_uri, REGISTERED, "champion")
    return {"root": root, "uri": uri, "export": export}


def _questions(folder: Path) -> Path:
    (folder / "clips").mkdir(parents=True, exist_ok=True)
    write_wav(str(folder / "clips" / "a.wav"), sine(330.0, 1.5))
    (folder / "clips" / "broken.wav").write_bytes(b"RIFF" + bytes(100))
    lines = [{"audio_path": "clips/a.wav", "question": "Which key?", "options": ["C major", "E major", "G major"],
              "answer": "B", "category": "musical knowledge"},
             {"audio_path": "clips/a.wav", "question": "Which lead?", "options": ["flute", "reed"], "answer": "A",
              "category": "instrumentation"},
             {"audio_path": "clips/broken.wav", "question": "Which lead?", "options": ["flute", "reed"], "answer": "B",
              "category": "instrumentation"}]
    path = folder / "scq.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def _run(args: list[str], champion: dict, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": champion["uri"], "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "jobs" / "evaluate.py"), *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def _latest_eval_run(champion):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(champion["uri"])
    experiment = client.get_experiment_by_name("vcritic")
    runs = client.search_runs([experiment.experiment_id], "tags.`vcritic.job` = 'evaluate'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return client, runs[0]


def test_scq_on_the_registered_champion_logs_metrics_reports_and_plots(champion, tmp_path):
    scq = _questions(tmp_path)
    proc = _run([f"models:/{REGISTERED}@champion", f"run.output_dir={tmp_path / 'out'}", f"eval.scq_file={scq}",
                 "eval.scq_mode=loglik,generative", "eval.max_new_text_tokens=3"], champion, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SCQ accuracy" in proc.stdout and "musical knowledge" in proc.stdout and "MLflow run: " in proc.stdout
    client, run = _latest_eval_run(champion)
    assert proc.stdout.strip().endswith(run.info.run_id)
    m = run.data.metrics
    for mode in ("loglik", "generative"):
        assert 0.0 <= m[f"scq_{mode}_accuracy"] <= 1.0
        assert m[f"scq_{mode}_questions"] == 2 and m[f"scq_{mode}_failed_clips"] == 1
        assert f"scq_{mode}_accuracy_musical_knowledge" in m and f"scq_{mode}_accuracy_instrumentation" in m
    assert m["scq_loglik_unparsed"] == 0
    assert run.data.tags["vcritic.evaluated_version"] == "1" and run.data.params["eval.scq_mode"] == "loglik,generative"
    names = {a.path for a in client.list_artifacts(run.info.run_id, "scq")}
    assert {"scq/loglik.json", "scq/generative.json", "scq/scq_categories.png"} <= names
    import mlflow

    report = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/scq/generative.json")
    assert report["failed"][0]["audio_path"].endswith("broken.wav") and len(report["results"]) == 2
    png = tmp_path / "out" / "evaluations" / run.info.run_id / "scq_categories.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_export_folder_loads_too_and_bad_inputs_fail_clearly(champion, tmp_path):
    scq = _questions(tmp_path)
    ok = _run([str(champion["export"]), f"run.output_dir={tmp_path / 'out'}", f"eval.scq_file={scq}"], champion, tmp_path)
    assert ok.returncode == 0, ok.stderr[-3000:]
    _, run = _latest_eval_run(champion)
    assert "scq_loglik_accuracy" in run.data.metrics and "scq_generative_accuracy" not in run.data.metrics
    nothing = _run([str(champion["export"])], champion, tmp_path)
    assert nothing.returncode != 0 and "nothing to evaluate" in nothing.stderr
    (tmp_path / "bad.jsonl").write_text('{"audio_path": "a.wav"}\n')
    bad = _run([str(champion["export"]), f"eval.scq_file={tmp_path / 'bad.jsonl'}"], champion, tmp_path)
    assert bad.returncode != 0 and f"{tmp_path / 'bad.jsonl'}:1: missing field(s) question, options, answer" in bad.stderr
    mode = _run([str(champion["export"]), f"eval.scq_file={scq}", "eval.scq_mode=quiz"], champion, tmp_path)
    assert mode.returncode == 2 and "eval.scq_mode" in mode.stderr


@pytest.mark.skipif(importlib.util.find_spec("vcritic.evaluate.oeq") is None,
                    reason="vcritic/evaluate/oeq.py is being written; enable once it exists")
def test_oeq_with_a_local_judge_logs_scores_agreement_and_a_radar_plot(champion, tmp_path):
    (tmp_path / "clips").mkdir()
    write_wav(str(tmp_path / "clips" / "a.wav"), sine(330.0, 1.5))
    rows = [{"id": f"o{k}", "audio_path": "clips/a.wav", "persona": "A fan.", "context": "Genre: folk.",
             "reference": "It sits in E major."} for k in range(3)]
    (tmp_path / "oeq.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "human.json").write_text(json.dumps(
        {f"o{k}": {"completeness": 0.2 * k, "accuracy": 0.3 * k, "novelty": 0.1 * k} for k in range(3)}))
    judges = "eval.judges=[{name: fake, plugin: 'vcritic.testing.dummies:FakeJudge', params: {score: 0.5}}]"
    proc = _run([str(champion["export"]), f"run.output_dir={tmp_path / 'out'}", f"eval.oeq_file={tmp_path / 'oeq.jsonl'}",
                 judges, f"eval.human_ratings={tmp_path / 'human.json'}", "eval.max_new_text_tokens=3"],
                champion, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client, run = _latest_eval_run(champion)
    assert run.data.metrics["oeq_items"] == 3 and any(k.startswith("oeq_agreement_") for k in run.data.metrics)
    names = {a.path for a in client.list_artifacts(run.info.run_id, "oeq")}
    assert {"oeq/report.json", "oeq/raw_replies.json", "oeq/oeq_radar.png"} <= names

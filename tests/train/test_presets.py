"""The paper presets end to end on CPU, against tiny checkpoints in each model's real file layout.

Each run is the real job (Ray Data, Ray Train + DeepSpeed, MLflow registry) with only the
device, precision, size and checkpoint paths overridden, as a user without a GPU would run it.
The Qwen2.5-Omni text run also checks that its registered critic is portable: the base
checkpoint is moved and the critic loads from the new place in a new process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vcritic.config import load

pytestmark = pytest.mark.slow

SMALL = ["train.use_gpu=false", "train.precision=fp32", "train.num_workers=1", "train.cpus_per_worker=0.5",
         "train.epochs=1", "train.batch_size=2", "train.grad_accum=1", "train.log_every_steps=1",
         "data.demo.songs=6", "data.demo.clips_per_song=2", "data.demo.near_duplicates=1",
         "data.tokenizer_fit_clips=16", "eval.scq_max_clips=2", "eval.max_new_text_tokens=4",
         "data.demo.reactions=0"]  # the joint preset, which speaks, turns two back on


def run_preset(root: Path, preset: str, overrides: list[str]):
    import ray

    from vcritic.train import driver

    if ray.is_initialized():
        ray.shutdown()
    repo = str(Path(__file__).resolve().parents[2])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {**driver.WORKER_ENV, "PYTHONPATH": repo}})
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = load(preset, [*SMALL, f"run.output_dir={root / 'runs'}", f"mlflow.tracking_uri={uri}",
                        f"mlflow.registered_model=critic-{Path(preset).stem}", *overrides])
    try:
        summary = driver.run(cfg)
    finally:
        ray.shutdown()
    return cfg, summary, uri


def trainable(uri: str, run_id: str) -> dict[str, float]:
    from mlflow.tracking import MlflowClient

    params = MlflowClient(uri).get_run(run_id).data.params
    return {k: int(params[k]) for k in ("params_total", "params_trainable")}


def predict_in_new_process(uri: str, name: str, clip: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    code = f"""
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model("models:/{name}@champion")
out = model.predict(pd.DataFrame([{{"audio_path": {clip!r}, "persona": "A vocal coach."}}]))
print("CRITIQUE:", out["critique"][0])
"""
    full_env = {**os.environ, "MLFLOW_TRACKING_URI": uri, **env}
    return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True, timeout=600,
                          cwd=cwd)


def test_qwen2_5_omni_text_hears_natively_and_its_export_is_portable(tmp_path):
    from vcritic.testing.tiny_qwen_omni import write_tiny_qwen_omni_checkpoint

    base = write_tiny_qwen_omni_checkpoint(tmp_path / "models" / "Qwen2.5-Omni-tiny")
    _, summary, uri = run_preset(tmp_path, "qwen2_5_omni_text", [f"model.backbone.options.path={base}",
                                                                   "model.backbone.options.dtype=float32"])
    export = Path(summary.best_checkpoint) / "export"
    meta = json.loads((export / "critic.json").read_text())
    assert meta["backbone"]["base_ref"]["name"] == "Qwen2.5-Omni-tiny"
    assert len(meta["backbone"]["base_ref"]["sha256"]) == 64
    assert not (export / "base").exists()  # a pretrained base is referenced, not copied
    train = next(Path(summary.prepared.train_dir).glob("*.parquet"))
    import pandas as pd

    row = pd.read_parquet(train).iloc[0]
    assert row["native_frames"] > 0 and len(row["native_features"]) == row["native_frames"] * 128
    assert len(row["music_tokens"]) == 0  # it hears through its own tower, not vcritic's ids
    assert summary.metrics["best_val_loss"] > 0
    print("qwen2_5_omni_text", trainable(uri, summary.run_id))

    clip = str(next(Path(summary.prepared.manifest).parent.glob("audio/demo-000-0.wav")))
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    shutil.move(str(base), moved / base.name)
    lost = predict_in_new_process(uri, "critic-qwen2_5_omni_text", clip, tmp_path,
                                  {"VCRITIC_BASE_MODELS": ""})
    assert lost.returncode != 0
    assert "Qwen2.5-Omni-tiny" in lost.stderr and meta["backbone"]["base_ref"]["sha256"] in lost.stderr
    found = predict_in_new_process(uri, "critic-qwen2_5_omni_text", clip, tmp_path,
                                   {"VCRITIC_BASE_MODELS": str(moved)})
    assert found.returncode == 0, found.stderr[-3000:]
    assert "CRITIQUE:" in found.stdout


def test_joint_text_audio_hears_natively_and_speaks_through_mimi(tmp_path):
    from vcritic.testing.tiny_codecs import write_tiny_mimi
    from vcritic.testing.tiny_qwen_omni import write_tiny_qwen_omni_checkpoint

    base = write_tiny_qwen_omni_checkpoint(tmp_path / "models" / "Qwen2.5-Omni-tiny")
    mimi = write_tiny_mimi(tmp_path / "models" / "mimi-tiny")
    _, summary, uri = run_preset(tmp_path, "joint_text_audio", [
        f"model.backbone.options.path={base}", "model.backbone.options.dtype=float32",
        f"model.audio_tokenizer.options.path={mimi}", "model.audio_tokenizer.options.num_codebooks=4",
        "model.codebook_weights=[100.0, 1.0, 1.0, 1.0]", "model.audio_head_layers=2", "data.demo.reactions=2"])
    meta = json.loads((Path(summary.best_checkpoint) / "export" / "critic.json").read_text())
    assert meta["audio_tokenizer"]["name"] == "mimi" and meta["num_codebooks"] > 1
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    audio = client.get_metric_history(summary.run_id, "train_audio_loss")
    assert audio and all(m.value > 0 for m in audio)
    print("joint_text_audio", trainable(uri, summary.run_id))


def test_kimi_audio_joint_runs(tmp_path):
    from vcritic.testing.tiny_kimi import write_tiny_kimi_checkpoint

    # The preset's branch: six audio layers leaving the trunk after layer from_layer (21 of 28 in the 7B).
    kimi = write_tiny_kimi_checkpoint(tmp_path / "models" / "Kimi-Audio-tiny", num_layers=8, mimo_layers=6, from_layer=1)
    # Kimi's GLM-4-Voice tokenizer needs the kimia_infer package (not on PyPI) and a GPU: the
    # same preset with the offline k-means tokenizer in its place, everything else as shipped.
    import yaml

    from vcritic.config import preset_path

    preset = yaml.safe_load(preset_path("kimi_audio_joint").read_text())
    preset["model"]["audio_tokenizer"] = {"name": "mel_kmeans", "options": {"codebook_size": 32}}
    path = tmp_path / "kimi_audio_joint_offline.yaml"
    path.write_text(yaml.safe_dump(preset))
    _, summary, uri = run_preset(tmp_path, str(path), [
        f"model.backbone.options.path={kimi}", "model.backbone.options.dtype=float32"])
    assert summary.metrics["best_val_loss"] > 0
    print("kimi_audio_joint", trainable(uri, summary.run_id))

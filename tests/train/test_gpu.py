"""The GPU path, for a machine with a CUDA GPU: one Ray Train worker on NCCL, bf16, ZeRO-2.

The real job (Ray Data, the driver's trainer, DeepSpeed, MLflow) on the tiny demo backbone,
run with ``pytest -m gpu``. Skipped without CUDA.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vcritic.config import load

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

GPU_BF16 = ["train.use_gpu=true", "train.num_workers=1", "train.gpus_per_worker=1", "train.cpus_per_worker=1",
            "train.precision=bf16", "train.zero_stage=2", "train.epochs=4", "train.log_every_steps=1",
            "train.warmup_steps=2", "data.demo.songs=12", "data.demo.clips_per_song=2",
            "data.demo.near_duplicates=1", "data.tokenizer_fit_clips=16", "eval.scq=false", "mlflow.register=false"]


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory):
    import ray

    from vcritic.train import driver

    root = tmp_path_factory.mktemp("gpu")
    if ray.is_initialized():
        ray.shutdown()
    repo = str(Path(__file__).resolve().parents[2])
    ray.init(num_cpus=4, num_gpus=1, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {**driver.WORKER_ENV, "PYTHONPATH": repo}})
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = load("demo", [*GPU_BF16, f"run.output_dir={root / 'runs'}", f"mlflow.tracking_uri={uri}", "run.name=gpu"])
    try:
        summary = driver.run(cfg)
    finally:
        ray.shutdown()
    return summary, uri


def history(uri: str, run_id: str, key: str) -> list[float]:
    from mlflow.tracking import MlflowClient

    return [m.value for m in sorted(MlflowClient(uri).get_metric_history(run_id, key), key=lambda m: m.step)]


def test_trains_on_the_gpu_over_nccl_in_bf16(gpu_run):
    from mlflow.tracking import MlflowClient

    summary, uri = gpu_run
    params = MlflowClient(uri).get_run(summary.run_id).data.params
    assert params["train_device"].startswith("cuda"), params["train_device"]
    assert params["train_dist_backend"] == "nccl"
    assert params["train_param_dtype"] == "bfloat16"


def test_loss_decreases(gpu_run):
    summary, uri = gpu_run
    train = history(uri, summary.run_id, "train_loss")
    assert len(train) >= 4 and all(x == x for x in train)  # no NaN
    assert sum(train[-3:]) / 3 < sum(train[:3]) / 3, train
    val = history(uri, summary.run_id, "val_loss")
    assert len(val) == 4 and min(val[1:]) < val[0], val
    padding = history(uri, summary.run_id, "padding_fraction")
    assert padding and all(0.0 <= p < 1.0 for p in padding)


def test_checkpoint_holds_bf16_weights(gpu_run):
    summary, _ = gpu_run
    states = list((Path(summary.best_checkpoint) / "deepspeed").rglob("*model_states.pt"))
    assert states, sorted(p.name for p in Path(summary.best_checkpoint).rglob("*"))
    module = torch.load(states[0], map_location="cpu", weights_only=False)["module"]
    floats = {t.dtype for t in module.values() if torch.is_tensor(t) and t.is_floating_point()}
    assert torch.bfloat16 in floats, floats

"""Training across two Ray nodes (ray.cluster_utils.Cluster) with DeepSpeed ZeRO-3."""

import json
from pathlib import Path

import pytest

from vcritic.config import load


@pytest.fixture
def two_nodes():
    import ray
    from ray.cluster_utils import Cluster

    from vcritic.train.driver import WORKER_ENV

    if ray.is_initialized():
        ray.shutdown()
    # Two nodes of 3 logical CPUs. A train worker asks for 2, so the two workers cannot share a
    # node, and 1 CPU per node stays free for Ray Data's tasks (which ask for a whole CPU).
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3})
    cluster.add_node(num_cpus=3)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, runtime_env={"env_vars": WORKER_ENV})
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.mark.ray_cluster
def test_zero3_training_spans_two_nodes(two_nodes, tmp_path):
    import ray

    from vcritic.data.pipeline import prepare
    from vcritic.train.driver import _trainer

    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    cfg = load("demo", [
        f"run.output_dir={tmp_path}", "run.name=two-nodes", "data.demo.songs=6", "data.demo.clips_per_song=2",
        "data.demo.near_duplicates=1", "data.tokenizer_fit_clips=12", "train.epochs=1", "train.zero_stage=3",
        "train.cpus_per_worker=2", "train.log_every_steps=1",
    ])
    prepared = prepare(cfg)
    result = _trainer(cfg, prepared, {"tracking_uri": "", "run_id": ""}).fit()
    assert result.error is None
    assert list(result.metrics_dataframe["epoch"]) == [0]
    checkpoint = Path(result.checkpoint.path)
    # Every rank wrote its ZeRO-3 shard into the one merged checkpoint.
    shards = list((checkpoint / "deepspeed").glob("*model_states.pt"))
    assert len(shards) == 2, sorted(p.name for p in (checkpoint / "deepspeed").iterdir())
    # Rank 0 gathered the partitioned weights: the export holds whole tensors and loads.
    from vcritic.critic import Critic

    critic = Critic.from_export(checkpoint / "export")
    meta = json.loads((checkpoint / "export" / "critic.json").read_text())
    assert critic.vocab.audio_codes == meta["audio_codes"]
    hidden = critic.model.audio_head.weight.shape[1]
    assert hidden == 128  # the demo backbone's hidden size, not a 0-size ZeRO-3 partition

"""The fault-tolerance parts of the loop and driver that need no cluster: data positions, the
skip-and-lockstep epoch after a restart, the resume checks, the run key and buffered metrics."""

import pytest

from vcritic.config import load
from vcritic.tracking import RankZeroLogger
from vcritic.train.driver import run_key
from vcritic.train.loop import DataPosition, check_resumable, epoch_groups, lockstep, row_key


def test_a_data_position_round_trips_and_says_where_to_continue(tmp_path):
    mid = DataPosition(epoch=2, global_step=17, epoch_step=5, epoch_complete=False, world_size=2, consumed=["a", "b"])
    mid.save(tmp_path)
    loaded = DataPosition.load(tmp_path)
    assert loaded == mid
    assert loaded.resume_point() == (2, frozenset({"a", "b"}))
    done = DataPosition(epoch=2, global_step=20, epoch_step=8, epoch_complete=True, world_size=2)
    assert done.resume_point() == (3, frozenset())
    assert DataPosition.load(tmp_path / "nowhere") is None


def test_zero_checkpoints_need_the_same_worker_count_and_say_so():
    pos = DataPosition(0, 4, 4, False, world_size=2)
    check_resumable(pos, 3, 0, "/ckpt")  # stage 0: every worker holds the whole optimizer state
    check_resumable(None, 3, 2, "/ckpt")  # nothing to resume
    for stage in (1, 2, 3):
        check_resumable(pos, 2, stage, "/ckpt")
        with pytest.raises(RuntimeError, match=rf"written by 2 workers with train.zero_stage={stage}.*train.num_workers=2"):
            check_resumable(pos, 4, stage, "/ckpt")


def test_rows_without_an_example_id_get_a_stable_key():
    row = {"example_id": "", "audio_path": "/a.wav", "offset_s": 1.5, "target_text": "nice"}
    assert row_key(row) == row_key(dict(row)) and row_key(row).startswith("sha1:")
    assert row_key({**row, "offset_s": 2.0}) != row_key(row)
    assert row_key({**row, "example_id": "song-1"}) == "song-1"


@pytest.fixture(scope="module")
def rows_dataset(ray_local):
    return ray_local.data.from_items([{"example_id": f"r{i}", "n": 1 + i % 7} for i in range(40)]).repartition(1)


def test_a_resumed_epoch_skips_exactly_the_consumed_rows_and_records_keys(rows_dataset):
    consumed = frozenset(f"r{i}" for i in range(0, 40, 3))
    keys, spare = [], []
    batches = list(epoch_groups(rows_dataset.iterator(), 4, 16, True, 5, dict, lambda r: r["n"],
                                skip=consumed, keys=keys, spare=spare))
    trained = [r["example_id"] for b in batches for r in b]
    assert sorted(trained) == sorted(set(f"r{i}" for i in range(40)) - consumed)  # nothing repeated or lost
    assert keys == trained  # the keys recorded are the rows yielded, in order
    assert len(spare) == 1 and spare[0]["example_id"] in {f"r{i}" for i in range(40)}


def test_lockstep_without_peers_yields_every_batch_then_stops():
    assert list(lockstep(iter([[1], [2], [3]]), "cpu")) == [[1], [2], [3]]
    assert list(lockstep(iter([]), "cpu")) == []


def test_the_run_key_ignores_where_a_run_executes_but_not_what_it_trains(tmp_path):
    base = [f"run.output_dir={tmp_path}"]
    key = run_key(load("demo", base))
    assert run_key(load("demo", base + ["train.num_workers=1", "train.max_failures=3", "ray.num_cpus=8"])) == key
    assert run_key(load("demo", base + ["train.lr=0.5"])) != key
    assert run_key(load("demo", base + ["run.name=other"])) != key
    assert run_key(load("demo", [f"run.output_dir={tmp_path / 'elsewhere'}"])) != key


def test_buffered_metrics_reach_mlflow_only_on_flush(tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run = client.create_run(client.create_experiment("buffered"))
    logger = RankZeroLogger({"tracking_uri": uri, "run_id": run.info.run_id}, enabled=True, buffered=True)
    for step in range(1, 1201):  # more than one MLflow batch
        logger.log_metrics({"train_loss": 1.0 / step}, step)
    assert client.get_metric_history(run.info.run_id, "train_loss") == []
    logger.flush()
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert sorted(m.step for m in history) == list(range(1, 1201))
    logger.flush()  # nothing pending: nothing repeated
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 1200
    # A restarted worker skips the steps the run already holds (they may be redone after a
    # checkpoint that was uploaded but never registered).
    again = RankZeroLogger({"tracking_uri": uri, "run_id": run.info.run_id}, enabled=True, buffered=True)
    assert again.resume() == 1200
    again.log_metrics({"train_loss": 9.0, "val_loss": 2.0}, 1200)  # val_loss at 1200 is new: kept
    again.log_metrics({"train_loss": 0.5}, 1201)
    again.flush()
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
    assert len(steps) == len(set(steps)) == 1201
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val_loss")] == [(1200, 2.0)]
    del mlflow

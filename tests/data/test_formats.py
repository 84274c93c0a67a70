"""Importers and exporters for ms-swift, LLaMA-Factory and Kimi-Audio fine-tuning files.

The fixtures are written by hand in each framework's documented shape (ms-swift's custom-dataset
docs, LLaMA-Factory's data/README.md and mllm_audio_demo.json, Kimi-Audio's finetune_codes README)
and point at real wav files, so the importer meets the same bytes a user would give it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from vcritic import cli
from vcritic.data import formats
from vcritic.data.schema import critic_prompt, parse_row

CRITIQUE_ZH = "副歌的高音有些紧，但咬字清楚，情感投入。"
CRITIQUE_EN = "The chorus is pitchy but the phrasing is lovely and the breath support holds up."


def _wav(path: Path, seconds: float = 2.0, sr: int = 16000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * sr)) / sr
    sf.write(path, 0.2 * np.sin(2 * np.pi * 220 * t), sr)
    return path


def _jsonl(path: Path, records: list) -> Path:
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return path


@pytest.fixture
def clips(tmp_path: Path) -> Path:
    for name in ("song_a", "song_b", "song_c"):
        _wav(tmp_path / "clips" / f"{name}.wav")
    _wav(tmp_path / "clips" / "spoken_a.wav")
    return tmp_path


def _assert_manifest(rows: list[dict]) -> None:
    for row in rows:
        assert parse_row(row).to_row() == row
        assert Path(row["audio_path"]).is_absolute() and Path(row["audio_path"]).is_file()


# ---------------------------------------------------------------- ms-swift


def _swift_file(root: Path) -> Path:
    return _jsonl(root / "swift.jsonl", [
        {"messages": [{"role": "system", "content": "一位严厉的声乐老师。"},
                      {"role": "user", "content": "<audio>这首歌是《月亮代表我的心》，请点评。"},
                      {"role": "assistant", "content": CRITIQUE_ZH}],
         "audios": ["clips/song_a.wav"]},
        # `audio` and a bare string are accepted as ms-swift accepts them; no system -> default persona
        {"messages": [{"role": "user", "content": "What do you think of the singing?<audio>"},
                      {"role": "assistant", "content": CRITIQUE_EN}],
         "audio": "clips/song_b.wav"},
        # two clips, each answered; a text-only follow-up is skipped
        {"messages": [{"role": "user", "content": "<audio>First take."},
                      {"role": "assistant", "content": "Take one drags behind the beat."},
                      {"role": "user", "content": "And the vocals?"},
                      {"role": "assistant", "content": "Breathy, but in tune."},
                      {"role": "user", "content": "<audio>Second take."},
                      {"role": "assistant", "content": "Take two is tight and confident."}],
         "audios": ["clips/song_a.wav", str(root / "clips" / "song_c.wav")]},
        {"messages": [{"role": "user", "content": "No clip here."}, {"role": "assistant", "content": "Fine."}]},
        {"messages": [{"role": "user", "content": "<audio>Rate it."}], "audios": ["clips/song_a.wav"]},
        {"messages": [{"role": "user", "content": "<audio><audio>Compare."}, {"role": "assistant", "content": "A."}],
         "audios": ["clips/song_a.wav"]},
        '{"messages": [',
        {"messages": [{"role": "user", "content": "<audio>Rate it."}, {"role": "assistant", "content": "Good."}],
         "audios": ["clips/missing.wav"]},
        {"messages": [{"role": "user", "content": "<audio>Rate it."}, {"role": "tool_call", "content": "{}"}],
         "audios": ["clips/song_a.wav"]},
        {"messages": [{"role": "user", "content": "<audio>Rate it."}, {"role": "assistant", "content": "Good."}],
         "audios": ["https://example.com/a.wav"]},
    ])


def test_ms_swift_import_maps_roles_audios_and_rejects(clips: Path) -> None:
    result = formats.import_file(_swift_file(clips), "ms-swift")
    rows = result.rows
    _assert_manifest(rows)
    assert len(rows) == 4 and result.records == 10
    first = rows[0]
    assert first["persona"] == "一位严厉的声乐老师。"
    assert first["context"] == "这首歌是《月亮代表我的心》，请点评。"
    assert first["target_text"] == CRITIQUE_ZH
    assert first["audio_path"] == str((clips / "clips" / "song_a.wav").resolve())
    assert first["song_id"] == "song_a" and first["source"] == "mllm"
    assert first["language"] == "zh" and rows[1]["language"] == "en"  # detected from the critique
    assert rows[1]["persona"] == formats.DEFAULT_PERSONA and rows[1]["song_id"] == "song_b"
    assert [r["target_text"] for r in rows[2:]] == ["Take one drags behind the beat.", "Take two is tight and confident."]
    assert rows[3]["song_id"] == "song_c" and len({r["example_id"] for r in rows}) == 4
    assert result.skipped_turns == 1

    reasons = {r.line: r.reason for r in result.rejects}
    assert set(reasons) == {4, 5, 6, 7, 8, 9, 10}
    assert "no user audio" in reasons[4]
    assert "no assistant turn" in reasons[5]
    assert "2 <audio> tag(s) but 1 audio path(s)" in reasons[6]
    assert "not valid JSON" in reasons[7]
    assert "missing.wav does not exist" in reasons[8]
    assert "tool_call" in reasons[9]
    assert "not a local file" in reasons[10]
    assert all(r.where == f"{clips / 'swift.jsonl'}:{r.line}" for r in result.rejects)


def test_imported_rows_pass_the_data_stage_validation(clips: Path) -> None:
    """What the job's validate step (parse, text and audio filters, decoding) says of imported rows."""
    import pandas as pd

    from vcritic.data import stages

    rows = formats.import_rows(_swift_file(clips), "ms-swift") + formats.import_rows(_kimi_file(clips), "kimi-audio")
    out = stages.validate(pd.DataFrame(rows), 16000, min_s=1.0, max_s=30.0, max_target_s=10.0)
    assert list(out["error"]) == [""] * len(rows)


def test_ids_are_stable_and_options_apply(clips: Path) -> None:
    path = _swift_file(clips)
    again = formats.import_rows(path, "ms-swift")
    assert [r["example_id"] for r in formats.import_rows(path, "ms-swift")] == [r["example_id"] for r in again]
    rows = formats.import_rows(path, "ms-swift", source="human", song_id_from="parent", language="zh",
                               default_persona="A jazz singer.")
    assert {r["source"] for r in rows} == {"human"} and {r["song_id"] for r in rows} == {"clips"}
    assert {r["language"] for r in rows} == {"zh"} and rows[1]["persona"] == "A jazz singer."


def test_audio_root_and_id_column(tmp_path: Path) -> None:
    _wav(tmp_path / "media" / "x.wav")
    (tmp_path / "sub").mkdir()
    path = _jsonl(tmp_path / "sub" / "data.jsonl", [
        {"id": "rec-1", "song": "s1", "messages": [{"role": "user", "content": "<audio>"},
                                                  {"role": "assistant", "content": CRITIQUE_EN}], "audios": ["x.wav"]}])
    rejects: list = []
    assert formats.import_rows(path, "ms-swift", rejects=rejects) == []
    assert "resolve against" in rejects[0].reason and str(tmp_path / "sub") in rejects[0].reason
    rows = formats.import_rows(path, "ms-swift", audio_root=str(tmp_path / "media"), id_column="id", song_id_from="song")
    assert rows[0]["example_id"] == "rec-1" and rows[0]["song_id"] == "s1" and rows[0]["context"] == ""


# ---------------------------------------------------------------- LLaMA-Factory


def _lf_file(root: Path) -> Path:
    records = [
        {"conversations": [{"from": "human", "value": "<audio>点评这段演唱。"}, {"from": "gpt", "value": CRITIQUE_ZH}],
         "system": "一位乐评人。", "audios": ["clips/song_a.wav"]},
        {"messages": [{"role": "system", "content": "A session musician."},
                      {"role": "user", "content": "<audio>Thoughts?"},
                      {"role": "assistant", "content": CRITIQUE_EN}], "audios": ["clips/song_b.wav"]},
        {"instruction": "<audio>Critique the vocal.", "input": "Song: Yesterday.", "output": CRITIQUE_EN,
         "audios": ["clips/song_c.wav"]},
        {"conversations": [{"from": "human", "value": "<audio>Hi"}, {"from": "observation", "value": "x"}],
         "audios": ["clips/song_a.wav"]},
    ]
    path = root / "lf.json"  # LLaMA-Factory's usual layout: a JSON array, pretty-printed
    path.write_text(json.dumps(records, ensure_ascii=False, indent=2), encoding="utf-8")
    return path


def test_llama_factory_sharegpt_openai_and_alpaca(clips: Path) -> None:
    result = formats.import_file(_lf_file(clips), "llama-factory")
    rows = result.rows
    _assert_manifest(rows)
    assert [r["persona"] for r in rows] == ["一位乐评人。", "A session musician.", formats.DEFAULT_PERSONA]
    assert rows[0]["context"] == "点评这段演唱。" and rows[0]["target_text"] == CRITIQUE_ZH
    assert rows[2]["context"] == "Critique the vocal.\nSong: Yesterday." and rows[2]["song_id"] == "song_c"
    [reject] = result.rejects
    text = (clips / "lf.json").read_text(encoding="utf-8").splitlines()
    assert '"conversations"' in text[reject.line] and "observation" in reject.reason
    assert all(json.dumps(r, ensure_ascii=False) for r in rows)


def test_llama_factory_dataset_info_tags(clips: Path) -> None:
    data = _jsonl(clips / "custom.jsonl", [
        {"dialog": [{"speaker": "listener", "text": "<audio>Go."}, {"speaker": "critic", "text": CRITIQUE_EN}],
         "clip": ["clips/song_b.wav"], "sys": "A choir director."}])
    info = clips / "dataset_info.json"
    info.write_text(json.dumps({"custom": {"file_name": "custom.jsonl", "formatting": "sharegpt",
                                           "columns": {"messages": "dialog", "audios": "clip", "system": "sys"},
                                           "tags": {"role_tag": "speaker", "content_tag": "text",
                                                    "user_tag": "listener", "assistant_tag": "critic"}}}))
    opts = formats.options_from_dataset_info(formats.load_dataset_info(info))
    [row] = formats.import_file(data, "llama-factory", opts).rows
    assert row["persona"] == "A choir director." and row["target_text"] == CRITIQUE_EN
    with pytest.raises(formats.FormatError, match="no entry 'other'"):
        formats.load_dataset_info(info, "other")


# ---------------------------------------------------------------- Kimi-Audio


def _kimi_file(root: Path) -> Path:
    return _jsonl(root / "kimi.jsonl", [
        {"task_type": "understanding", "conversation": [
            {"role": "user", "message_type": "text", "content": "请点评这段演唱。"},
            {"role": "user", "message_type": "audio", "content": "clips/song_a.wav"},
            {"role": "assistant", "message_type": "text", "content": CRITIQUE_ZH}]},
        {"task_type": "speech2speech", "conversation": [
            {"role": "user", "message_type": "audio", "content": "clips/song_b.wav"},
            {"role": "assistant", "message_type": "text", "content": CRITIQUE_EN},
            {"role": "assistant", "message_type": "audio", "content": "clips/spoken_a.wav"}]},
        {"task_type": "speech2speech", "conversation": [
            {"role": "user", "message_type": "audio", "content": "clips/song_b.wav"},
            {"role": "assistant", "message_type": "audio", "content": "clips/spoken_a.wav"}]},
        {"task_type": "understanding", "conversation": [
            {"role": "user", "message_type": "video", "content": "clips/song_b.wav"}]},
    ])


def test_kimi_audio_text_and_spoken_critiques(clips: Path) -> None:
    result = formats.import_file(_kimi_file(clips), "kimi-audio")
    a, b = result.rows
    _assert_manifest(result.rows)
    assert a["context"] == "请点评这段演唱。" and a["target_text"] == CRITIQUE_ZH and a["target_audio_path"] is None
    assert b["target_audio_path"] == str((clips / "clips" / "spoken_a.wav").resolve())
    assert [(r.line, r.reason.split(";")[0]) for r in result.rejects] == [
        (3, "the assistant answers with audio only"), (4, "conversation[0] has message_type 'video'")]


# ---------------------------------------------------------------- export and round trips


def _manifest_rows(clips: Path) -> list[dict]:
    rows = formats.import_rows(_swift_file(clips), "ms-swift") + formats.import_rows(_kimi_file(clips), "kimi-audio")
    rows[0]["facts"] = json.dumps({"tempo": "slow", "歌手": "邓丽君"}, ensure_ascii=False)
    rows[1].update(offset_s=1.5, duration_s=20.0, language="en-GB")
    return [parse_row(r).to_row() for r in rows]


@pytest.mark.parametrize("fmt", formats.FORMATS)
def test_export_shape_and_round_trip(clips: Path, fmt: str) -> None:
    rows = _manifest_rows(clips)
    records = formats.export_rows(rows, fmt)
    for record, row in zip(records, rows, strict=True):
        if fmt == "kimi-audio":
            conv = record["conversation"]
            assert {m["role"] for m in conv} <= {"user", "assistant"}  # Kimi's trainer allows only these
            assert conv[0] == {"role": "user", "message_type": "text", "content": critic_prompt(row["persona"], row["context"])}
            assert conv[1]["message_type"] == "audio" and conv[1]["content"] == row["audio_path"]
            assert record["task_type"] == ("speech2speech" if row["target_audio_path"] else "understanding")
        else:
            msgs = record["messages"]
            assert [m["role"] for m in msgs] == ["user", "assistant"]
            assert msgs[0]["content"] == critic_prompt(row["persona"], row["context"]) + "<audio>"
            assert record["audios"] == [row["audio_path"]]
        assert isinstance(record[formats.META_KEY], str)
    out = clips / "exported" / f"{fmt}.jsonl"
    manifest = clips / "manifest.jsonl"
    formats.write_jsonl(manifest, rows)
    assert formats.write_export(manifest, out, fmt) == len(rows)
    assert "邓丽君" in out.read_text(encoding="utf-8")  # ensure_ascii=False
    again = formats.import_file(out, fmt)
    assert again.rejects == [] and again.rows == rows


def test_round_trip_through_every_format(clips: Path) -> None:
    rows = _manifest_rows(clips)
    current = rows
    for fmt in ("kimi-audio", "llama-factory", "ms-swift", "kimi-audio"):
        path = clips / f"hop-{fmt}.jsonl"
        formats.write_jsonl(path, formats.export_rows(current, fmt))
        current = formats.import_rows(path, fmt)
    assert current == rows


def test_export_without_meta_still_imports(clips: Path) -> None:
    rows = _manifest_rows(clips)
    path = clips / "plain.jsonl"
    formats.write_jsonl(path, formats.export_rows(rows, "ms-swift", include_meta=False))
    again = formats.import_rows(path, "ms-swift")
    assert [(r["persona"], r["context"], r["target_text"], r["audio_path"]) for r in again] == \
        [(r["persona"], r["context"], r["target_text"], r["audio_path"]) for r in rows]


def test_export_refuses_bad_manifest_row(clips: Path) -> None:
    with pytest.raises(ValueError, match="manifest row 1 .*missing required field"):
        formats.export_rows([{"example_id": "x"}], "ms-swift")
    with pytest.raises(formats.FormatError, match="unknown format 'swift'"):
        formats.export_rows([], "swift")


# ---------------------------------------------------------------- CLI


def test_cli_import_and_export(clips: Path, capsys) -> None:
    out = clips / "out" / "manifest.jsonl"
    code = cli.main(["import", "--format", "ms-swift", str(_swift_file(clips)), str(out), "--source", "human",
                     "--song-id-from", "stem"])
    assert code == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 4 and {r["source"] for r in rows} == {"human"}
    _assert_manifest(rows)
    assert "一位严厉的声乐老师" in out.read_text(encoding="utf-8")
    rejects = [json.loads(line) for line in (clips / "out" / "manifest.rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == 7 and all(r["where"].endswith(f":{r['line']}") and r["reason"] for r in rejects)
    assert "4 rows" in capsys.readouterr().out

    kimi = clips / "out" / "kimi.jsonl"
    assert cli.main(["export", "--format", "kimi-audio", str(out), str(kimi)]) == 0
    assert len(kimi.read_text(encoding="utf-8").splitlines()) == 4

    lf = clips / "out" / "lf_critiques.jsonl"
    assert cli.main(["export", "--format", "llama-factory", str(out), str(lf)]) == 0
    info = json.loads((clips / "out" / "dataset_info.json").read_text())
    assert info["lf_critiques"]["file_name"] == "lf_critiques.jsonl"
    assert info["lf_critiques"]["columns"] == {"messages": "messages", "audios": "audios"}
    back = clips / "out" / "back.jsonl"
    assert cli.main(["import", "--format", "llama-factory", str(lf), str(back),
                     "--dataset-info", f"{clips / 'out' / 'dataset_info.json'}:lf_critiques"]) == 0
    assert [json.loads(line) for line in back.read_text(encoding="utf-8").splitlines()] == rows


def test_cli_errors_name_the_input(clips: Path, capsys) -> None:
    assert cli.main(["import", "--format", "kimi-audio", str(clips / "nope.jsonl"), str(clips / "o.jsonl")]) == 2
    assert "nope.jsonl does not exist" in capsys.readouterr().err
    assert cli.main(["import", "--format", "kimi-audio", str(_kimi_file(clips)), str(clips / "o.parquet")]) == 2
    assert "must end in .jsonl" in capsys.readouterr().err

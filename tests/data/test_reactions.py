import json
import os

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from vcritic.data.audio import AudioError
from vcritic.data.reactions import ReactionSegment, reaction_rows, segment_reaction
from vcritic.data.schema import parse_row
from vcritic.protocols import Transcript
from vcritic.testing import FakeASR, FakeSeparator, sine, write_wav


def T(text, start, end):
    return Transcript(text, start, end)


def test_music_is_the_gap_before_each_turn():
    segs = segment_reaction([T("nice hook", 10.0, 14.0), T("the bridge drags", 25.0, 30.0)], 40.0)
    assert segs == [
        ReactionSegment(0.0, 10.0, 10.0, 14.0, "nice hook"),
        ReactionSegment(14.0, 25.0, 25.0, 30.0, "the bridge drags"),
    ]


def test_music_window_is_trimmed_to_its_last_seconds():
    (seg,) = segment_reaction([T("finally", 100.0, 105.0)], 120.0, max_music_seconds=30.0)
    assert (seg.music_start, seg.music_end) == (70.0, 100.0)


def test_short_music_gap_is_skipped_but_still_ends_the_stretch():
    segs = segment_reaction(
        [T("first", 5.0, 8.0), T("second", 9.0, 12.0), T("third", 20.0, 22.0)], 30.0, min_music_seconds=3.0
    )
    # "second" has only 1 s of music before it; "third" starts counting after "second"
    assert [s.text for s in segs] == ["first", "third"]
    assert segs[1].music_start == 12.0


def test_close_transcripts_merge_into_one_turn():
    segs = segment_reaction(
        [T(" the tone ", 5.0, 6.0), T("is thin", 6.3, 7.5), T("  ", 7.6, 7.9), T("later", 12.0, 14.0)], 20.0
    )
    assert segs[0] == ReactionSegment(0.0, 5.0, 5.0, 7.5, "the tone is thin")
    assert segs[1] == ReactionSegment(7.5, 12.0, 12.0, 14.0, "later")


def test_unsorted_input_and_gap_of_exactly_half_a_second_is_not_merged():
    segs = segment_reaction([T("b", 10.0, 12.0), T("a", 4.0, 9.5)], 20.0)
    # "b" is its own turn, with only 0.5 s of music before it
    assert [(s.text, s.speech_start, s.speech_end) for s in segs] == [("a", 4.0, 9.5)]
    segs = segment_reaction([T("b", 10.0, 12.0), T("a", 4.0, 9.5)], 20.0, min_music_seconds=0.5)
    assert [s.text for s in segs] == ["a", "b"]


def test_short_turns_are_dropped_and_do_not_cut_the_music():
    segs = segment_reaction([T("mm", 6.0, 6.4), T("the chorus is great", 10.0, 13.0)], 20.0)
    assert segs == [ReactionSegment(0.0, 10.0, 10.0, 13.0, "the chorus is great")]


def test_turns_are_clipped_to_the_recording():
    segs = segment_reaction([T("ends late", 8.0, 12.0), T("after the end", 15.0, 16.0)], 10.0)
    assert segs == [ReactionSegment(0.0, 8.0, 8.0, 10.0, "ends late")]


def test_speech_at_time_zero_has_no_music_and_empty_input_gives_nothing():
    assert segment_reaction([T("hello", 0.0, 2.0)], 10.0) == []
    assert segment_reaction([], 10.0) == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"recording_duration": 0.0}, "positive"),
        ({"recording_duration": 5.0, "min_music_seconds": 40.0}, "min_music"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        segment_reaction([], **kwargs)


SR = 16000


@pytest.fixture
def recording(tmp_path):
    # 12 s: music 0-4, "talk" 4-6, music 6-10, "talk" 10-12 (the fake ASR supplies the words)
    audio = np.concatenate(
        [sine(220, 4, SR), sine(1000, 2, SR, 0.2), sine(330, 4, SR), sine(1000, 2, SR, 0.2)]
    )
    return write_wav(str(tmp_path / "reaction.wav"), audio, SR), audio


def test_reaction_rows_writes_separated_music_and_valid_rows(tmp_path, recording):
    path, audio = recording
    asr = FakeASR([T("warm opening", 4.0, 6.0), T("flat in the second verse", 10.0, 12.0)])
    out = tmp_path / "music"
    rows = reaction_rows(
        path, "song/7", "a jazz teacher", "ballad in D", asr, FakeSeparator(0.5), SR, out_dir=str(out)
    )
    assert asr.calls == [(len(audio), SR)]
    assert [r["example_id"] for r in rows] == ["song/7-r000", "song/7-r001"]
    ex = [parse_row(r) for r in rows]
    assert all(e.source == "human" and e.song_id == "song/7" and e.persona == "a jazz teacher" for e in ex)
    assert ex[0].context == "ballad in D" and ex[1].target_text == "flat in the second verse"
    assert ex[0].target_audio_path == os.path.abspath(path)
    assert (ex[1].target_offset_s, ex[1].target_duration_s) == (10.0, 2.0)
    assert os.path.basename(ex[0].audio_path) == "song_7-r000.wav"
    music, sr = sf.read(ex[1].audio_path, dtype="float32")
    assert sr == SR and music.shape == (4 * SR,)
    np.testing.assert_allclose(music, 0.5 * audio[6 * SR : 10 * SR], atol=1e-4)  # the separator ran on it

    before = {p.name: p.read_bytes() for p in out.iterdir()}
    again = reaction_rows(
        path, "song/7", "a jazz teacher", "ballad in D", asr, FakeSeparator(0.5), SR, out_dir=str(out)
    )
    assert again == rows
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # same files, no leftovers


def test_reaction_rows_resamples_to_the_requested_rate(tmp_path, recording):
    path, _ = recording
    asr = FakeASR([T("warm opening", 4.0, 6.0)])
    (row,) = reaction_rows(path, "s", "p", "", asr, FakeSeparator(1.0), 8000, out_dir=str(tmp_path / "o"))
    music, sr = sf.read(row["audio_path"])
    assert sr == 8000 and len(music) == 4 * 8000 and asr.calls[0][1] == 8000


def test_reaction_rows_rejects_bad_separator_output_and_bad_files(tmp_path, recording):
    path, _ = recording

    class Broken:
        def separate(self, samples, sample_rate):
            return np.full(10, np.nan, np.float32)

    with pytest.raises(ValueError, match="Broken returned unusable audio for s-r000"):
        reaction_rows(path, "s", "p", "", FakeASR([T("x y z", 4.0, 6.0)]), Broken(), out_dir=str(tmp_path))
    with pytest.raises(AudioError):
        reaction_rows(
            str(tmp_path / "missing.wav"), "s", "p", "", FakeASR(), FakeSeparator(), out_dir=str(tmp_path)
        )


# ----------------------------------------------------------------------------- subtitles, trimming, containers

from vcritic.data.reactions import reaction_batch, read_recording, trim_turn  # noqa: E402
from vcritic.data.subtitles import SubtitleError, read_subtitles  # noqa: E402
from vcritic.protocols import Word  # noqa: E402


def test_srt_vtt_and_json_sidecars_give_the_same_cues(tmp_path):
    srt = tmp_path / "a.srt"
    srt.write_text("\ufeff1\n00:00:04,250 --> 00:00:06,500\nwarm <i>opening</i>\n\n"
                   "2\n00:01:10,000 --> 00:01:12,125\nflat in the\nsecond verse\n\n")
    vtt = tmp_path / "a.vtt"
    vtt.write_text("WEBVTT\n\nNOTE made by hand\n\n00:00:04.250 --> 00:00:06.500 align:start\n<v Ann>warm opening\n\n"
                   "01:10.000 --> 01:12.125\nflat in the\nsecond verse\n")
    js = tmp_path / "a.json"
    js.write_text(json.dumps([{"start": 4.25, "end": 6.5, "text": "warm opening"},
                              {"start": 70.0, "end": 72.125, "text": "flat in the second verse"},
                              {"start": 80.0, "end": 81.0, "text": "  "}]))
    expected = [T("warm opening", 4.25, 6.5), T("flat in the second verse", 70.0, 72.125)]
    for path in (srt, vtt, js):
        assert read_subtitles(path) == expected, path.suffix


@pytest.mark.parametrize(("name", "body", "match"), [
    ("a.txt", "x", "must be .srt, .vtt, .json"),
    ("a.json", "{}", "JSON list"),
    ("a.json", '[{"start": 2, "end": 1, "text": "x"}]', "need 0 <= start <= end"),
    ("a.json", '[{"start": 1, "text": "x"}]', "lacks end"),
    ("a.vtt", "not a vtt file", "WebVTT"),
])
def test_bad_sidecars_name_the_file_and_the_problem(tmp_path, name, body, match):
    (tmp_path / name).write_text(body)
    with pytest.raises(SubtitleError, match=match):
        read_subtitles(tmp_path / name)


def test_long_turn_is_trimmed_after_the_last_word_that_fits():
    words = tuple(Word(w, 10.0 + i, 10.0 + i + 0.8) for i, w in enumerate("one two three four five six".split()))
    (seg,) = segment_reaction([Transcript("one two three four five six", 10.0, 15.8, words)], 40.0,
                              max_turn_seconds=3.0)
    assert (seg.speech_start, seg.speech_end, seg.text) == (10.0, 12.8, "one two three")
    # without word timings (a subtitle cue) the words are spread evenly over the cue
    (seg,) = segment_reaction([T("a b c d e f g h", 10.0, 18.0)], 40.0, max_turn_seconds=4.0)
    assert (seg.speech_end, seg.text) == (14.0, "a b c d")
    assert trim_turn(0.0, 9.0, "long", (Word("long", 0.0, 9.0),), 2.0)[:2] == (2.0, "long")


def test_a_next_turn_counts_its_music_from_the_untrimmed_end():
    segs = segment_reaction([T("a b c d e f g h", 4.0, 12.0), T("later", 16.0, 18.0)], 30.0,
                            min_music_seconds=3.0, max_turn_seconds=2.0)
    assert [(s.music_start, s.speech_end) for s in segs] == [(0.0, 6.0), (12.0, 18.0)]


def test_whisper_segments_split_where_the_words_pause():
    words = (Word("wow", 1.0, 1.4), Word("nice", 4.0, 4.5), Word("tune", 4.6, 5.2))
    segs = segment_reaction([Transcript("wow nice tune", 1.0, 5.2, words)], 10.0)
    assert [(s.music_start, s.speech_start, s.text) for s in segs] == [(0.0, 4.0, "nice tune")]


def write_container(path, samples, sr, codec="flac"):
    """A media container (mkv, mp4...) holding one mono audio stream, written with PyAV."""
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=sr, layout="mono")
        for i in range(0, len(samples), 1024):
            frame = av.AudioFrame.from_ndarray(np.asarray(samples[i:i + 1024], np.float32)[None, :],
                                               format="fltp", layout="mono")
            frame.sample_rate, frame.pts = sr, i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return str(path)


def test_a_video_containers_audio_track_is_read_and_kept_as_wav(tmp_path, recording):
    _, audio = recording
    video = write_container(tmp_path / "reaction.mkv", audio, SR)
    samples, was_container = read_recording(video, SR)
    assert was_container and samples.size == audio.size
    np.testing.assert_allclose(samples, audio, atol=1e-3)
    rows = reaction_rows(video, "s", "p", "", FakeASR([T("warm opening", 4.0, 6.0)]), FakeSeparator(1.0), SR,
                         out_dir=str(tmp_path / "out"), recording_id="vid")
    (ex,) = [parse_row(r) for r in rows]
    assert ex.target_audio_path == str(tmp_path / "out" / "vid-track.wav")
    assert sf.info(ex.target_audio_path).frames == audio.size  # later stages read it with soundfile


def test_unchanged_outputs_keep_their_files(tmp_path, recording):
    path, _ = recording
    asr = FakeASR([T("warm opening", 4.0, 6.0)])
    out = tmp_path / "o"
    reaction_rows(path, "s", "p", "", asr, FakeSeparator(0.5), SR, out_dir=str(out))
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    reaction_rows(path, "s", "p", "", asr, FakeSeparator(0.5), SR, out_dir=str(out))
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps


def test_reaction_batch_turns_failures_into_reasons(tmp_path, recording):
    path, _ = recording
    cues = tmp_path / "cues.json"
    cues.write_text(json.dumps([{"start": 4.0, "end": 6.0, "text": "warm opening"}]))
    garbage = tmp_path / "broken.mp4"
    garbage.write_bytes(b"\x00not a video" * 100)
    batch = pd.DataFrame([
        {"recording_path": path, "song_id": "s1", "persona": "p", "subtitles": str(cues), "manifest_row": 1},
        {"recording_path": str(garbage), "song_id": "s2", "persona": "p", "recording_id": "bad", "manifest_row": 2},
        {"recording_path": path, "song_id": "s3", "persona": None, "subtitles": str(cues), "manifest_row": 3},
    ])
    out = reaction_batch(batch, asr_spec={"name": "faster_whisper"}, separator_spec={"name": "identity"},
                         sample_rate=SR, out_dir=str(tmp_path / "o"), max_music_seconds=30.0, min_music_seconds=3.0,
                         min_turn_seconds=1.0, target_speech_seconds=10.0)
    good = out[out["reaction_error"] == ""]
    assert good["target_text"].tolist() == ["warm opening"] and good["reaction_recording"].tolist() == [1]
    errors = out.set_index("reaction_recording")["reaction_error"]
    assert "cannot decode the recording" in errors[2] and "'bad'" in errors[2]
    assert "missing required field(s) persona" in errors[3]

"""Reaction recordings → example rows.

A reaction recording is someone playing a song, pausing it, and talking about what they
just heard, several times over. Each speech turn becomes one example: the music heard
just before the turn is the input, the turn (its transcript and its audio) is the target.

The data stage runs this per recording (:func:`reaction_batch`, one Ray Data task per
recording) on the rows of a reactions manifest (``data.reactions.manifest``), one row per
recording:

================  ========  ===========================================================
column            required  meaning
================  ========  ===========================================================
recording_path    yes       audio file (anything soundfile reads) or a video container
                            (.mp4, .mkv, .webm, ...) whose first audio track is read
song_id           yes       the song reacted to (the split groups by it)
persona           yes       the uploader as a critic persona
context           no        song metadata given to the critic ("")
language          no        BCP-47 tag of the talk, stored on the rows ("en")
subtitles         no        sidecar .srt / .vtt / .json cues; replaces ASR when given
recording_id      no        names the rows (``<recording_id>-r000``...); default: the file
                            name's stem plus a short hash of its path
================  ========  ===========================================================
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import soundfile as sf

from vcritic.data import audio as audio_io
from vcritic.data.schema import AudioRef, Example
from vcritic.protocols import ASR, Separator, Transcript, Word

log = logging.getLogger(__name__)

# Pauses shorter than this inside one person's talk are breaths, not the end of a turn.
MERGE_GAP_S = 0.5

RECORDING_COLUMNS = ("recording_path", "song_id", "persona", "context", "language", "subtitles", "recording_id")
REQUIRED_COLUMNS = ("recording_path", "song_id", "persona")
STAGE = "reactions"
"""The quarantine ``stage`` of a recording that could not be turned into rows."""


@dataclass(frozen=True)
class ReactionSegment:
    """One speech turn and the music window before it, in seconds of the recording.

    ``speech_end`` and ``text`` are already trimmed to the turn length limit (when one is set);
    ``words`` are the kept words' timings (empty when the transcript had none).
    """

    music_start: float
    music_end: float
    speech_start: float
    speech_end: float
    text: str
    words: tuple[Word, ...] = field(default=(), compare=False)


def _words_of(t: Transcript, start: float, end: float, text: str) -> tuple[Word, ...]:
    """The transcript's word timings, or (subtitles, ASR without word times) its words spread
    evenly over the cue: a speaking-rate guess that lets a long turn be trimmed at a word."""
    if t.words:
        return tuple(w for w in t.words if w.text.strip())
    tokens = text.split()
    step = (end - start) / max(len(tokens), 1)
    return tuple(Word(tok, start + i * step, start + (i + 1) * step) for i, tok in enumerate(tokens))


def _split_at_pauses(t: Transcript) -> list[Transcript]:
    """A transcript with word timings, split where its words pause for ``MERGE_GAP_S`` or more.

    Whisper's segments are loose: one may run from an interjection over the music to the end of
    the turn after it. Word timings are tighter, so they decide where talk stops and starts."""
    words = [w for w in t.words if w.text.strip()]
    if not words:
        return [t]
    pieces, current = [], [words[0]]
    for w in words[1:]:
        if w.start - current[-1].end >= MERGE_GAP_S:
            pieces.append(current)
            current = []
        current.append(w)
    pieces.append(current)
    if len(pieces) == 1:
        return [t]
    return [Transcript(" ".join(w.text.strip() for w in p), p[0].start, p[-1].end, tuple(p)) for p in pieces]


def _merge_turns(transcripts: list[Transcript], duration: float) -> list[tuple[float, float, str, tuple[Word, ...]]]:
    turns: list[tuple[float, float, str, tuple[Word, ...]]] = []
    pieces = [p for t in transcripts for p in _split_at_pauses(t)]
    for t in sorted(pieces, key=lambda t: (t.start, t.end)):
        text = t.text.strip()
        start, end = max(0.0, float(t.start)), min(float(t.end), duration)
        if not text or start >= duration or end <= start:
            continue
        words = _words_of(t, start, end, text)
        if turns and start - turns[-1][1] < MERGE_GAP_S:
            prev_start, prev_end, prev_text, prev_words = turns[-1]
            turns[-1] = (prev_start, max(prev_end, end), f"{prev_text} {text}", prev_words + words)
        else:
            turns.append((start, end, text, words))
    return turns


def trim_turn(start: float, end: float, text: str, words: tuple[Word, ...],
              max_seconds: float | None) -> tuple[float, str, tuple[Word, ...]]:
    """Cut a turn longer than ``max_seconds`` down to it: ``(end, text, words)`` of what is kept.

    Why trim rather than drop: a long spoken critique is the most valuable kind of reaction, and
    its first ``max_seconds`` are still a complete target once text and audio agree. The cut
    falls after the last word that ends in time (the text keeps exactly those words); when not
    even the first word fits, the audio is cut at the limit and the text is that first word.
    """
    if max_seconds is None or end - start <= max_seconds:
        return end, text, words
    limit = start + max_seconds
    kept = tuple(w for w in words if w.end <= limit + 1e-6)
    if kept and kept[-1].end > start:
        return kept[-1].end, " ".join(w.text.strip() for w in kept), kept
    first = words[:1] or (Word(text.split()[0], start, limit),)
    return limit, first[0].text.strip(), first


def segment_reaction(
    transcripts: list[Transcript],
    recording_duration: float,
    max_music_seconds: float = 30.0,
    min_music_seconds: float = 3.0,
    min_turn_seconds: float = 1.0,
    max_turn_seconds: float | None = None,
) -> list[ReactionSegment]:
    """Pair each speech turn with the music before it.

    Transcripts closer than 0.5 s are merged into one turn. Turns shorter than
    ``min_turn_seconds`` are dropped before the music windows are cut: a short
    interjection over the music does not end a listening stretch (the separator takes it
    out of the music). The music window runs from the end of the previous turn (or 0) to
    the start of this one, keeps only its last ``max_music_seconds``, and the pair is
    skipped when the window is shorter than ``min_music_seconds``. A turn longer than
    ``max_turn_seconds`` is trimmed (:func:`trim_turn`); the next listening stretch still
    starts where the talk really ended.
    """
    if recording_duration <= 0:
        raise ValueError(f"recording_duration must be positive, got {recording_duration}")
    if not 0 < min_music_seconds <= max_music_seconds:
        raise ValueError(
            f"need 0 < min_music_seconds <= max_music_seconds, got {min_music_seconds} and {max_music_seconds}"
        )
    if max_turn_seconds is not None and max_turn_seconds <= 0:
        raise ValueError(f"max_turn_seconds must be positive (or None), got {max_turn_seconds}")
    turns = [t for t in _merge_turns(transcripts, recording_duration) if t[1] - t[0] >= min_turn_seconds]
    segments = []
    prev_end = 0.0
    for start, end, text, words in turns:
        music_start = max(prev_end, start - max_music_seconds)
        if start - music_start >= min_music_seconds:
            cut_end, cut_text, cut_words = trim_turn(start, end, text, words, max_turn_seconds)
            segments.append(ReactionSegment(music_start, start, start, cut_end, cut_text, cut_words))
        prev_end = end  # a turn ends the listening stretch even when its own music was too short
    return segments


def _safe_name(song_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", song_id).strip("._") or "song"


def _write_wav(path: str, samples: np.ndarray, sample_rate: int) -> None:
    """Write a 16-bit wav unless the file already holds exactly these bytes.

    Unchanged files keep their modification time, so a rerun leaves the outputs as they were.
    A new file is written next to the target and renamed: a crash never leaves a truncated
    wav behind that a rerun would mistake for a finished one.
    """
    buffer = io.BytesIO()
    sf.write(buffer, samples, sample_rate, format="WAV", subtype="PCM_16")
    data = buffer.getvalue()
    if os.path.isfile(path) and os.path.getsize(path) == len(data) and Path(path).read_bytes() == data:
        return
    tmp = f"{path}.tmp-{os.getpid()}"
    Path(tmp).write_bytes(data)
    os.replace(tmp, path)


def _decode_container(path: str, sample_rate: int) -> np.ndarray:
    """The first audio track of a media container (mp4, mkv, webm, m4a...) as mono float32 at
    ``sample_rate``, decoded and resampled by FFmpeg through PyAV."""
    import av

    with av.open(path) as container:
        stream = next((s for s in container.streams if s.type == "audio"), None)
        if stream is None:
            raise audio_io.AudioError(f"{path}: the container has no audio track")
        resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
        chunks = []
        for frame in container.decode(stream):
            chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
        chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]  # flush
    samples = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
    if samples.size == 0:
        raise audio_io.AudioError(f"{path}: the audio track is empty")
    if not np.all(np.isfinite(samples)):
        raise audio_io.AudioError(f"{path}: the audio track has NaN or infinite samples")
    return np.clip(samples, -1.0, 1.0)


def read_recording(path: str, sample_rate: int) -> tuple[np.ndarray, bool]:
    """Decode a reaction recording: ``(mono samples, was_container)``.

    Audio files go through soundfile (as every other stage reads audio); anything soundfile
    cannot open is tried as a media container with PyAV, so a downloaded reaction video can be
    given as it is. ``was_container`` says the later stages could not read the file themselves.

    Raises:
        vcritic.data.audio.AudioError: missing file, or neither reader can decode it.
    """
    if not os.path.isfile(path):
        raise audio_io.AudioError(f"{path}: recording does not exist")
    try:
        sf.info(path)
    except Exception:  # not a format libsndfile knows: try it as a container
        try:
            return _decode_container(path, sample_rate), True
        except audio_io.AudioError:
            raise
        except Exception as exc:  # av raises its own FFmpegError family, also on plain garbage
            raise audio_io.AudioError(f"{path}: cannot decode the recording as audio or as a media container "
                                      f"({type(exc).__name__}: {exc})") from exc
    return audio_io.load(AudioRef(path), sample_rate), False


def reaction_rows(
    recording_path: str,
    song_id: str,
    persona: str,
    context: str,
    asr: ASR | None,
    separator: Separator,
    sample_rate: int = 16000,
    *,
    out_dir: str,
    language: str = "en",
    max_music_seconds: float = 30.0,
    min_music_seconds: float = 3.0,
    min_turn_seconds: float = 1.0,
    target_speech_seconds: float | None = None,
    transcripts: list[Transcript] | None = None,
    recording_id: str | None = None,
) -> list[dict]:
    """Transcribe, segment and separate one reaction recording; return manifest rows.

    For each kept turn ``i``, the separated music window is written to
    ``out_dir/<recording_id>-r<i>.wav`` (16-bit PCM at ``sample_rate``) and becomes the row's
    ``audio_path``; the spoken turn stays in the original recording, referenced by
    ``target_audio_path`` with ``target_offset_s``/``target_duration_s``. A video container's
    audio track is first written to ``out_dir/<recording_id>-track.wav`` and the turns point
    there. Rerunning with the same inputs returns the same rows and leaves the files untouched.

    Args:
        asr: transcribes the recording; unused (may be None) when ``transcripts`` are given.
        transcripts: the turns from a subtitle sidecar, used instead of ASR.
        target_speech_seconds: longest spoken turn kept; longer turns are trimmed, not dropped.
        recording_id: names the rows and files (default ``song_id``).

    Raises:
        vcritic.data.audio.AudioError: the recording cannot be read.
        ValueError: the separator returned audio that is not finite mono samples, or neither
            ``asr`` nor ``transcripts`` was given.
    """
    recording = os.path.abspath(recording_path)
    name = recording_id or song_id
    samples, was_container = read_recording(recording, sample_rate)
    duration = samples.size / sample_rate
    if transcripts is None:
        if asr is None:
            raise ValueError(f"{recording}: no subtitles and no ASR plugin to transcribe it")
        transcripts = asr.transcribe(samples, sample_rate)
    segments = segment_reaction(
        transcripts,
        duration,
        max_music_seconds=max_music_seconds,
        min_music_seconds=min_music_seconds,
        min_turn_seconds=min_turn_seconds,
        max_turn_seconds=target_speech_seconds,
    )
    os.makedirs(out_dir, exist_ok=True)
    speech_path = recording
    if was_container and segments:
        speech_path = os.path.abspath(os.path.join(out_dir, f"{_safe_name(name)}-track.wav"))
        _write_wav(speech_path, samples, sample_rate)
    rows = []
    for i, seg in enumerate(segments):
        example_id = f"{name}-r{i:03d}"
        window = samples[int(round(seg.music_start * sample_rate)) : int(round(seg.music_end * sample_rate))]
        music = np.asarray(separator.separate(window, sample_rate), dtype=np.float32)
        if music.ndim != 1 or music.size == 0 or not np.all(np.isfinite(music)):
            raise ValueError(
                f"separator {type(separator).__name__} returned unusable audio for {example_id} "
                f"(shape {music.shape}); it must return finite mono samples"
            )
        path = os.path.abspath(os.path.join(out_dir, f"{_safe_name(name)}-r{i:03d}.wav"))
        _write_wav(path, np.clip(music, -1.0, 1.0), sample_rate)
        example = Example(
            example_id=example_id,
            song_id=song_id,
            source="human",
            audio_path=path,
            persona=persona,
            target_text=seg.text,
            context=context,
            target_audio_path=speech_path,
            target_offset_s=seg.speech_start,
            target_duration_s=seg.speech_end - seg.speech_start,
            language=language,
        )
        rows.append(example.to_row())
    return rows


def default_recording_id(recording_path: str) -> str:
    """The file name's stem plus 8 hex digits of its absolute path: readable, and distinct for
    two uploads that are both called ``video.mp4``."""
    path = os.path.abspath(recording_path)
    return f"{Path(path).stem}-{hashlib.sha1(path.encode()).hexdigest()[:8]}"


def _text(value: Any, default: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return default
    return str(value).strip() or default


def reaction_batch(batch: pd.DataFrame, *, asr_spec: dict[str, Any], separator_spec: dict[str, Any],
                   sample_rate: int, out_dir: str, max_music_seconds: float, min_music_seconds: float,
                   min_turn_seconds: float, target_speech_seconds: float | None) -> pd.DataFrame:
    """The reaction stage over a pandas batch of reactions-manifest rows (a Ray Data map).

    Returns one row per kept turn (Example columns, ``facts`` as "") plus bookkeeping columns:
    ``reaction_recording`` (the recording's 1-based manifest row), ``reaction_turn`` and
    ``reaction_error``. A recording that fails (unreadable, bad subtitles, an ASR crash, a
    missing field) gives a single row whose ``reaction_error`` is the reason and whose
    ``example_id`` is the recording id, so the job goes on and the quarantine says why.
    """
    from vcritic.data import stages
    from vcritic.data.subtitles import read_subtitles

    out: list[dict[str, Any]] = []
    for raw in batch.to_dict("records"):
        number = int(raw.pop(stages.ROW_COLUMN))
        path = _text(raw.get("recording_path"))
        rid = _text(raw.get("recording_id")) or (default_recording_id(path) if path else f"recording-{number}")
        try:
            missing = [k for k in REQUIRED_COLUMNS if not _text(raw.get(k))]
            if missing:
                raise ValueError(f"missing required field(s) {', '.join(missing)}")
            subtitles = _text(raw.get("subtitles"))
            made = reaction_rows(
                path, _text(raw["song_id"]), _text(raw["persona"]), _text(raw.get("context")),
                None if subtitles else stages.plugin("asr", asr_spec), stages.plugin("separators", separator_spec),
                sample_rate, out_dir=out_dir, language=_text(raw.get("language"), "en"),
                max_music_seconds=max_music_seconds, min_music_seconds=min_music_seconds,
                min_turn_seconds=min_turn_seconds, target_speech_seconds=target_speech_seconds,
                transcripts=read_subtitles(subtitles) if subtitles else None, recording_id=rid)
        except Exception as exc:  # any one recording's failure is quarantined, never the job's
            out.append(_failure(rid, number, raw, f"recording {rid!r} ({path}): {type(exc).__name__}: {exc}"))
            continue
        for turn, row in enumerate(made):
            out.append({**row, "facts": "", "duration_s": float("nan") if row["duration_s"] is None else float(row["duration_s"]),
                        "reaction_recording": number, "reaction_turn": turn, "reaction_error": "",
                        "reaction_raw": ""})
    return pd.DataFrame(out, columns=[*Example.__dataclass_fields__, "reaction_recording", "reaction_turn",
                                      "reaction_error", "reaction_raw"])


def _failure(rid: str, number: int, raw: dict[str, Any], reason: str) -> dict[str, Any]:
    row: dict[str, Any] = {k: "" for k in Example.__dataclass_fields__}
    row.update(example_id=rid, offset_s=0.0, duration_s=float("nan"), target_offset_s=0.0,
               target_duration_s=float("nan"), reaction_recording=number, reaction_turn=-1,
               reaction_error=reason, reaction_raw=json.dumps({**raw, "example_id": rid}, default=str))
    return row


# ----------------------------------------------------------------------------- the pipeline stage

QUARANTINE_COLUMNS = ["example_id", "stage", "error", "raw"]
BOOKKEEPING = ["reaction_recording", "reaction_turn", "reaction_error", "reaction_raw"]


@dataclass
class Reacted:
    """What the reaction stage adds to the pipeline."""

    rows: Any  # ray.data.Dataset | None (kept untyped so this module imports without Ray)
    """Example rows (source "human", ``manifest_row`` after the rows before them); None if none."""
    failed: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=QUARANTINE_COLUMNS))
    """Quarantine rows (stage "reactions") of recordings that could not be turned into rows."""
    counts: dict[str, int] = field(default_factory=dict)
    """reaction_recordings (in the manifest), reaction_rows (example rows made),
    reaction_failed (recordings quarantined)."""


def manifest(cfg) -> Path | None:
    """The reactions manifest the job uses: ``data.reactions.manifest``; else, for the demo set
    (``data.manifest`` unset), the demo's reactions (None when espeak-ng is missing or
    ``data.demo.reactions`` is 0); else None (no reaction stage).

    Raises:
        FileNotFoundError: ``data.reactions.manifest`` names nothing.
    """
    from vcritic import storage
    from vcritic.data import demo

    r = cfg.data.reactions
    if r.manifest:
        path = Path(r.manifest)
        if not path.exists():
            raise FileNotFoundError(f"data.reactions.manifest={r.manifest!r} does not exist; give a JSONL/Parquet "
                                    f"of reaction recordings (recording_path, song_id, persona, ...) or leave it unset")
        return path
    if cfg.data.manifest:
        return None
    staging = storage.staging_dir(storage.resolve_output_dir(str(cfg.run.output_dir)))
    d = cfg.data.demo
    asr = _asr_installed(cfg.data.reactions.asr.name)
    if not asr and int(d.reactions):
        log.warning("the ASR plugin data.reactions.asr=%s cannot be loaded (pip install -e '.[speech]'): every "
                    "demo reaction recording gets a subtitle sidecar instead", cfg.data.reactions.asr.name)
    return demo.generate_reactions(staging / "demo_data", recordings=int(d.reactions), songs=int(d.songs),
                                   sample_rate=int(cfg.data.sample_rate), seed=int(cfg.run.seed), asr=asr)


def _asr_installed(name: str) -> bool:
    """Whether the ASR plugin ``name`` can be built here (its packages import), without loading a model."""
    from vcritic import registry

    try:
        registry.load("asr", name)
    except Exception:  # a missing package or an unknown name: the demo falls back to subtitles
        return False
    return True


def _sidecar_paths(path: Path) -> list[str]:
    """Every recording and subtitle file a reactions manifest names, sorted."""
    from vcritic.data import pipeline

    names: set[str] = set()
    for file in pipeline.manifest_files(path):
        frame = pd.read_parquet(file) if file.suffix == ".parquet" else pd.read_json(file, lines=True, dtype=False)
        for column in ("recording_path", "subtitles"):
            if column in frame:
                names.update(str(v) for v in frame[column].dropna() if isinstance(v, str) and v)
    return sorted(names)


def hash_inputs(h, cfg) -> None:
    """Feed the reaction stage's inputs into the pipeline's fingerprint: the reactions manifest's
    bytes and the identity (path, size, modification time) of each recording and sidecar it names.
    Its settings are hashed with the rest of ``data``."""
    from vcritic.data import pipeline

    path = manifest(cfg)
    if path is None:
        return
    h.update(b"reactions\0")
    pipeline._hash_manifest(h, path)
    pipeline.hash_audio_files(h, _sidecar_paths(path))


def add_to(cfg, rows, out_dir: str | Path):
    """``rows`` (the manifest's, with ``manifest_row``) plus the rows made from reaction
    recordings, and the stage's quarantine and counts; ``rows`` unchanged without a reactions
    manifest. The separated music goes to ``out_dir`` (under the prepared data's folder)."""
    from vcritic.data import stages

    path = manifest(cfg)
    if path is None:
        return rows, Reacted(None)
    if cfg.data.separator.name != "identity" and "human" in cfg.data.separate_sources:
        log.warning("data.separator=%s also runs on the reaction rows (source human), whose music "
                    "data.reactions.separator already separated; drop 'human' from data.separate_sources "
                    "if that is not wanted", cfg.data.separator.name)
    first_row = int(rows.max(stages.ROW_COLUMN) or 0) + 1 if rows.count() else 1
    reacted = run(cfg, path, first_row, out_dir)
    if reacted.rows is not None:
        rows = rows.union(reacted.rows).materialize()
    return rows, reacted


def run(cfg, path: Path, first_row: int, out_dir: str | Path) -> Reacted:
    """Turn every recording of the reactions manifest at ``path`` into rows, one Ray Data task per
    recording (needs a running Ray). Row numbers start at ``first_row``, in (recording, turn) order."""
    import ray

    from vcritic.config import to_dict
    from vcritic.data import pipeline

    r = cfg.data.reactions
    recordings = ray.data.read_datasource(pipeline._ManifestDatasource(pipeline.manifest_files(path)))
    n = recordings.count()
    if not n:
        return Reacted(None, counts={"reaction_recordings": 0, "reaction_rows": 0, "reaction_failed": 0})
    sr = int(cfg.data.sample_rate)
    # Two samples below the validation limit: resampling the turn again there may add one.
    limit = float(r.target_speech_seconds or cfg.data.max_target_audio_seconds)
    limit = min(limit, float(cfg.data.max_target_audio_seconds)) - 2.0 / sr
    out = recordings.repartition(min(n, 1024)).map_batches(
        reaction_batch, batch_format="pandas", batch_size=1, fn_kwargs={
            "asr_spec": to_dict(r.asr), "separator_spec": to_dict(r.separator), "sample_rate": sr,
            "out_dir": str(out_dir), "max_music_seconds": float(r.max_music_seconds),
            "min_music_seconds": float(r.min_music_seconds), "min_turn_seconds": float(r.min_turn_seconds),
            "target_speech_seconds": limit}).materialize()
    book = out.select_columns(["reaction_recording", "reaction_turn", "reaction_error", "reaction_raw",
                               "example_id"]).to_pandas()
    bad = book[book["reaction_error"] != ""].sort_values("reaction_recording")
    failed = pd.DataFrame({"example_id": bad["example_id"], "stage": STAGE, "error": bad["reaction_error"],
                           "raw": bad["reaction_raw"]}, columns=QUARANTINE_COLUMNS).reset_index(drop=True)
    made = book[book["reaction_error"] == ""]
    counts = {"reaction_recordings": n, "reaction_rows": len(made), "reaction_failed": len(failed)}
    log.info("reactions: %d recordings -> %d rows (%d recordings quarantined)", n, len(made), len(failed))
    if failed.shape[0]:
        log.warning("reactions: %d recordings quarantined; first: %s", len(failed), failed["error"].iloc[0])
    if made.empty:
        return Reacted(None, failed, counts)
    # Contiguous numbers after the rows before them, in (recording, turn) order: deterministic
    # whatever order the tasks finished in.
    order = made.sort_values(["reaction_recording", "reaction_turn"])
    numbers = {(int(a), int(b)): first_row + i
               for i, (a, b) in enumerate(zip(order["reaction_recording"], order["reaction_turn"], strict=True))}
    rows = out.filter(expr=_ok_expr()).map_batches(_number, batch_format="pandas", fn_kwargs={"numbers": numbers})
    return Reacted(rows.materialize(), failed, counts)


def _ok_expr():
    from ray.data.expressions import col

    return col("reaction_error") == ""


def _number(batch: pd.DataFrame, numbers: dict[tuple[int, int], int]) -> pd.DataFrame:
    from vcritic.data import stages

    batch = batch.copy()
    batch[stages.ROW_COLUMN] = [numbers[(int(a), int(b))] for a, b in
                                zip(batch["reaction_recording"], batch["reaction_turn"], strict=True)]
    return batch.drop(columns=BOOKKEEPING)

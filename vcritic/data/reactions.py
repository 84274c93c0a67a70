"""Reaction recordings → example rows.

A reaction recording is someone playing a song, pausing it, and talking about what they
just heard, several times over. Each speech turn becomes one example: the music heard
just before the turn is the input, the turn (its transcript and its audio) is the target.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import numpy as np
import soundfile as sf

from vcritic.data.audio import load
from vcritic.data.schema import AudioRef, Example
from vcritic.protocols import ASR, Separator, Transcript

# Pauses shorter than this inside one person's talk are breaths, not the end of a turn.
MERGE_GAP_S = 0.5


@dataclass(frozen=True)
class ReactionSegment:
    """One speech turn and the music window before it, in seconds of the recording."""

    music_start: float
    music_end: float
    speech_start: float
    speech_end: float
    text: str


def _merge_turns(transcripts: list[Transcript], duration: float) -> list[tuple[float, float, str]]:
    turns: list[tuple[float, float, str]] = []
    for t in sorted(transcripts, key=lambda t: (t.start, t.end)):
        text = t.text.strip()
        start, end = max(0.0, float(t.start)), min(float(t.end), duration)
        if not text or start >= duration or end <= start:
            continue
        if turns and start - turns[-1][1] < MERGE_GAP_S:
            prev_start, prev_end, prev_text = turns[-1]
            turns[-1] = (prev_start, max(prev_end, end), f"{prev_text} {text}")
        else:
            turns.append((start, end, text))
    return turns


def segment_reaction(
    transcripts: list[Transcript],
    recording_duration: float,
    max_music_seconds: float = 30.0,
    min_music_seconds: float = 3.0,
    min_turn_seconds: float = 1.0,
) -> list[ReactionSegment]:
    """Pair each speech turn with the music before it.

    Transcripts closer than 0.5 s are merged into one turn. Turns shorter than
    ``min_turn_seconds`` are dropped before the music windows are cut: a short
    interjection over the music does not end a listening stretch (the separator takes it
    out of the music). The music window runs from the end of the previous turn (or 0) to
    the start of this one, keeps only its last ``max_music_seconds``, and the pair is
    skipped when the window is shorter than ``min_music_seconds``.
    """
    if recording_duration <= 0:
        raise ValueError(f"recording_duration must be positive, got {recording_duration}")
    if not 0 < min_music_seconds <= max_music_seconds:
        raise ValueError(
            f"need 0 < min_music_seconds <= max_music_seconds, got {min_music_seconds} and {max_music_seconds}"
        )
    turns = [t for t in _merge_turns(transcripts, recording_duration) if t[1] - t[0] >= min_turn_seconds]
    segments = []
    prev_end = 0.0
    for start, end, text in turns:
        music_start = max(prev_end, start - max_music_seconds)
        if start - music_start >= min_music_seconds:
            segments.append(ReactionSegment(music_start, start, start, end, text))
        prev_end = end  # a turn ends the listening stretch even when its own music was too short
    return segments


def _safe_name(song_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", song_id).strip("._") or "song"


def _write_wav(path: str, samples: np.ndarray, sample_rate: int) -> None:
    # Write next to the target, then rename: a crash never leaves a truncated wav behind
    # that a rerun would mistake for a finished one.
    tmp = f"{path}.tmp-{os.getpid()}"
    sf.write(tmp, samples, sample_rate, format="WAV", subtype="PCM_16")
    os.replace(tmp, path)


def reaction_rows(
    recording_path: str,
    song_id: str,
    persona: str,
    context: str,
    asr: ASR,
    separator: Separator,
    sample_rate: int = 16000,
    *,
    out_dir: str,
    language: str = "en",
    max_music_seconds: float = 30.0,
    min_music_seconds: float = 3.0,
    min_turn_seconds: float = 1.0,
) -> list[dict]:
    """Transcribe, segment and separate one reaction recording; return manifest rows.

    For each kept turn ``i``, the separated music window is written to
    ``out_dir/<song_id>-r<i>.wav`` (16-bit PCM at ``sample_rate``) and becomes the row's
    ``audio_path``; the spoken turn stays in the original recording, referenced by
    ``target_audio_path`` with ``target_offset_s``/``target_duration_s``. Rerunning with the
    same inputs rewrites the same files and returns the same rows.

    Raises:
        vcritic.data.audio.AudioError: the recording cannot be read.
        ValueError: the separator returned audio that is not finite mono samples.
    """
    recording = os.path.abspath(recording_path)
    audio = load(AudioRef(recording), sample_rate)
    duration = audio.size / sample_rate
    segments = segment_reaction(
        asr.transcribe(audio, sample_rate),
        duration,
        max_music_seconds=max_music_seconds,
        min_music_seconds=min_music_seconds,
        min_turn_seconds=min_turn_seconds,
    )
    os.makedirs(out_dir, exist_ok=True)
    rows = []
    for i, seg in enumerate(segments):
        example_id = f"{song_id}-r{i:03d}"
        window = audio[int(round(seg.music_start * sample_rate)) : int(round(seg.music_end * sample_rate))]
        music = np.asarray(separator.separate(window, sample_rate), dtype=np.float32)
        if music.ndim != 1 or music.size == 0 or not np.all(np.isfinite(music)):
            raise ValueError(
                f"separator {type(separator).__name__} returned unusable audio for {example_id} "
                f"(shape {music.shape}); it must return finite mono samples"
            )
        path = os.path.abspath(os.path.join(out_dir, f"{_safe_name(song_id)}-r{i:03d}.wav"))
        _write_wav(path, np.clip(music, -1.0, 1.0), sample_rate)
        example = Example(
            example_id=example_id,
            song_id=song_id,
            source="human",
            audio_path=path,
            persona=persona,
            target_text=seg.text,
            context=context,
            target_audio_path=recording,
            target_offset_s=seg.speech_start,
            target_duration_s=seg.speech_end - seg.speech_start,
            language=language,
        )
        rows.append(example.to_row())
    return rows

"""Offline generator of a small, learnable demo dataset in the manifest schema.

Every song has three facts that can be heard in its audio: a key (tonic drone plus a
major-scale melody that starts and ends on the tonic), a tempo (one note per beat) and a
lead timbre (additive synthesis). Songs take the 64 (key, tempo, timbre) triples in a seeded
random order (:func:`song_facts`), so the songs a split holds out are a random sample and only
hearing, not the training songs' prior, predicts their facts. Critiques state the facts
with fixed phrasings, so a tiny critic can learn them in minutes and evaluation can score
them as single-choice questions (:data:`SCQ_QUESTIONS`). The set also holds near-duplicates and two broken rows
so the dedup and quarantine stages have work to do.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from vcritic.data.schema import SOURCES

log = logging.getLogger(__name__)

KEYS = ("C major", "E major", "G major", "A major")
TONIC_MIDI = (60, 64, 67, 69)
TEMPOS = (70, 100, 130, 160)
TIMBRES = ("flute", "reed", "brass", "bell")
MAJOR_SCALE = (0, 2, 4, 5, 7, 9, 11, 12)  # semitones above the tonic
NOISE_DBFS = -50.0  # level of the white noise that turns a clip into a near-duplicate
NOTE_GAP_S = 0.16  # silence before each next note: over an 80 ms id frame, so every gap shows in the tokens

# fmt: off
SCQ_QUESTIONS: tuple[dict[str, Any], ...] = tuple(
    {"fact": fact, "question": question, "stem": stem, "options": options, "format": "{}.", "answer_format": answer}
    for fact, question, stem, options, answer in (
        ("key", "Which key is the song in?", "it sits in", KEYS, "{}"),
        ("timbre", "Which instrument does the lead sound like?", "the lead sounds like a", TIMBRES, "{}"),
        ("tempo_bpm", "What is the tempo of the song?", "the pulse is around", tuple(f"{b} bpm" for b in TEMPOS),
         "{} bpm"),
    )
)
"""One single-choice question per fact. ``stem + " " + option`` is the critique's own
wording (``format`` adds the full stop that follows it); ``answer_format.format(facts[fact])``
is the correct option."""

GENRES = ("folk", "pop", "ambient", "chamber", "indie", "lo-fi")
# fmt: on

FACT_CATEGORIES = {"key": "musical knowledge", "tempo_bpm": "musical knowledge", "timbre": "instrumentation"}
"""The public SCQ benchmark's category each demo fact belongs to."""

DEGREE_NAMES = ("tonic", "second", "third", "fourth", "fifth", "sixth", "seventh", "octave")

# Each persona: the prompt, openings ({title} is filled in), the three lead-ins before the fixed
# fact phrasings, a remark on the melody's highest degree ({peak}), and closings.
# fmt: off
PERSONAS: dict[str, tuple[dict[str, Any], ...]] = {
    "human": (
        {
            "persona": "A casual listener who reacts out loud on a first listen, chatty and informal, "
            "with no formal music training.",
            "openings": ("Oh, I like this one.", "Okay, {title}, first listen.", "Wait, this is kind of nice.",
                         "Hmm, {title}, let's see.", "Right, pressing play on {title}."),
            "leads": ("Honestly,", "I think", "And"),
            "contour": "The tune climbs up to the {peak} and then comes home.",
            "closings": ("Would replay it.", "Pretty chill overall.", "Not bad at all, honestly.",
                         "Kind of stuck in my head now.", "My cat seems into it too."),
        },
        {
            "persona": "A hobbyist bedroom producer who streams quick reactions and talks in short, excited bursts.",
            "openings": ("Yo, let's go.", "Alright, {title}, hitting play.", "Ooh, okay okay.",
                         "Chat asked for {title}, here goes.", "New one, {title}!"),
            "leads": ("So right away", "Pretty sure", "Plus"),
            "contour": "Melody tops out on the {peak}, love that.",
            "closings": ("Clean little loop.", "I'd sample that.", "Vibes are solid.", "Mix is super dry though.",
                         "Somebody flip this into a beat."),
        },
    ),
    "mllm": (
        {
            "persona": "A measured music analyst who describes instrumentation, tonality and tempo precisely "
            "and without hype.",
            "openings": ("The excerpt is compact and clear.", "{title} presents a short, sparse arrangement.",
                         "This is a monophonic line over a sustained drone.", "{title} opens without any introduction.",
                         "The texture is minimal throughout."),
            "leads": ("Timbrally,", "Tonally,", "Rhythmically,"),
            "contour": "The melodic ceiling is the {peak} scale degree.",
            "closings": ("The drone anchors the harmony.", "The phrasing resolves cleanly.",
                         "Dynamics remain steady across the excerpt.", "No percussion is present.",
                         "Articulation is detached and even."),
        },
        {
            "persona": "A conservatory-trained reviewer who writes brief technical notes on arrangement and harmony.",
            "openings": ("A concise study in a single texture.", "The writing in {title} is economical.",
                         "{title} relies on one voice and a pedal.", "Here the material is deliberately plain.",
                         "An etude-like miniature."),
            "leads": ("In terms of colour,", "Harmonically,", "Metrically,"),
            "contour": "Its range extends from the tonic up to the {peak}.",
            "closings": ("Stepwise motion dominates the line.", "The cadence lands on the tonic.",
                         "Voice leading is unadventurous but sound.", "A pedal point sustains underneath.",
                         "The form is a single unbroken phrase."),
        },
    ),
}
# fmt: on


COMBINATIONS = len(KEYS) * len(TEMPOS) * len(TIMBRES)
"""How many distinct (key, tempo, timbre) triples there are: 64."""


def song_facts(song: int, seed: int = 0) -> dict[str, Any]:
    """Key, tempo and timbre of song ``song``: entry ``song % 64`` of a seeded random order of all
    64 (key, tempo, timbre) triples, a fresh order for each next 64 songs.

    Why a random order of triples: a split holds some songs out, and a critic should have to
    hear their facts. Songs balanced in small blocks (each value once per four songs) would make
    the held-out songs' values exactly the rarest among the training songs, so a critic that
    answered from the training prior would score about zero on them. Here any set of songs is a
    random sample of the triples: the prior says next to nothing about a held-out song (over all
    64 songs each value still comes 16 times and each pair of values 4 times). And no two of 64
    songs share all three facts; such songs sound so alike that the dedup stage would drop one.
    """
    cycle, index = divmod(song, COMBINATIONS)
    triple = int(np.random.default_rng([seed, 0, cycle]).permutation(COMBINATIONS)[index])
    key, rest = divmod(triple, len(TEMPOS) * len(TIMBRES))
    tempo, timbre = divmod(rest, len(TIMBRES))
    return {"key": KEYS[key], "tempo_bpm": TEMPOS[tempo], "timbre": TIMBRES[timbre]}


def _midi_hz(midi: float) -> float:
    return 440.0 * 2.0 ** ((midi - 69.0) / 12.0)


def _adsr(n: int, sr: int, attack: float, decay: float, sustain: float, release: float) -> np.ndarray:
    total = n / sr
    a, d, r = (min(x, total / 3) for x in (attack, decay, release))
    points = [0.0, a, a + d, max(a + d, total - r), total]
    return np.interp(np.arange(n) / sr, points, [0.0, 1.0, sustain, sustain, 0.0])


def synth_note(timbre: str, freq: float, n: int, sr: int) -> np.ndarray:
    """One note of ``n`` samples at ``freq`` Hz in ``timbre``, enveloped, peak 1."""
    t = np.arange(n) / sr
    limit = min(0.45 * sr, 6000.0)  # band-limited additive synthesis: nothing aliases

    def partials(pairs: Any) -> np.ndarray:
        out = np.zeros_like(t)
        for ratio, amp in pairs:
            if freq * ratio < limit:
                out += amp * np.sin(2 * np.pi * freq * ratio * t)
        return out

    if timbre == "flute":
        rate, depth = 5.0, 2 ** (15 / 1200) - 1  # 15-cent vibrato at 5 Hz
        wave = np.sin(2 * np.pi * freq * t - (freq * depth / rate) * np.cos(2 * np.pi * rate * t))
        env = _adsr(n, sr, 0.06, 0.1, 0.8, 0.08)
    elif timbre == "reed":
        wave = partials((h, 1.0 / h) for h in range(1, 40, 2))  # odd harmonics: square-like
        env = _adsr(n, sr, 0.03, 0.08, 0.75, 0.06)
    elif timbre == "brass":
        fade = 1.0 - np.exp(-t / 0.08)  # upper harmonics fade after the onset: a bright attack
        wave = partials((h, np.exp(-0.18 * (h - 1) * fade) / h) for h in range(1, 30))
        env = _adsr(n, sr, 0.04, 0.1, 0.7, 0.06)
    elif timbre == "bell":
        ratios, amps = (1.0, 2.0, 2.76, 4.07, 5.4), (1.0, 0.5, 0.6, 0.3, 0.25)  # inharmonic partials
        wave = partials((r, a * np.exp(-t * r / 0.9)) for r, a in zip(ratios, amps, strict=True))
        env = _adsr(n, sr, 0.005, 0.0, 1.0, 0.02)
    else:
        raise ValueError(f"unknown timbre {timbre!r}; expected one of {TIMBRES}")
    wave = wave * env
    peak = np.max(np.abs(wave))
    return wave / peak if peak > 0 else wave


def melody(rng: np.random.Generator, n_notes: int) -> list[int]:
    """Scale-degree indices into :data:`MAJOR_SCALE`: a walk from the tonic back to it that
    bounces off the ends of the octave, so it never sits on one note."""
    top = len(MAJOR_SCALE) - 1
    degrees = [0]
    for _ in range(n_notes - 2):
        step = degrees[-1] + int(rng.choice((-2, -1, 1, 2)))
        degrees.append(abs(step) if step < 0 else (2 * top - step if step > top else step))
    return [*degrees, 0][:n_notes]


def render_clip(facts: dict[str, Any], degrees: list[int], seconds: float, sr: int) -> np.ndarray:
    """The melody at one note per beat over a quiet tonic drone, float32 with peak 0.5."""
    n = int(round(seconds * sr))
    tonic = TONIC_MIDI[KEYS.index(facts["key"])]
    beat = int(round(60.0 / facts["tempo_bpm"] * sr))
    out = np.zeros(n)
    for i, degree in enumerate(degrees):
        # A gap fixed in seconds: faster songs spend more time between notes, so tempo shows in level stats.
        start, length = i * beat, min(beat - int(NOTE_GAP_S * sr), n - i * beat)
        if length > 0:
            out[start : start + length] += synth_note(
                facts["timbre"], _midi_hz(tonic + MAJOR_SCALE[degree]), length, sr
            )
    t = np.arange(n) / sr
    drone = np.sin(2 * np.pi * _midi_hz(tonic - 12) * t) + 0.6 * np.sin(2 * np.pi * _midi_hz(tonic) * t)
    out += 0.3 * drone * _adsr(n, sr, 0.1, 0.0, 1.0, 0.1)
    return (0.5 * out / np.max(np.abs(out))).astype(np.float32)


def render_hum(facts: dict[str, Any], degrees: list[int], seconds: float, sr: int) -> np.ndarray:
    """The first notes of the melody hummed (sine) an octave lower, soft (peak 0.3)."""
    n = int(round(seconds * sr))
    tonic = TONIC_MIDI[KEYS.index(facts["key"])] - 12
    beat = int(round(60.0 / facts["tempo_bpm"] * sr))
    out = np.zeros(n)
    for i, degree in enumerate(degrees):
        start = i * beat
        length = min(beat, n - start)
        if length <= 0:
            break
        t = np.arange(length) / sr
        note = np.sin(2 * np.pi * _midi_hz(tonic + MAJOR_SCALE[degree]) * t)
        out[start : start + length] = note * _adsr(length, sr, 0.05, 0.05, 0.8, 0.05)
    return (0.3 * out / max(np.max(np.abs(out)), 1e-9)).astype(np.float32)


def critique(
    facts: dict[str, Any], degrees: list[int], style: dict[str, Any], opening: str, closing: str
) -> str:
    """A short critique stating the three facts with the fixed phrasings of :data:`SCQ_QUESTIONS`,
    plus a remark on the melody's highest scale degree, between ``opening`` and ``closing``."""
    lead_timbre, lead_key, lead_tempo = style["leads"]
    contour = style["contour"].format(peak=DEGREE_NAMES[max(degrees)])
    return (
        f"{opening} {lead_timbre} the lead sounds like a {facts['timbre']}. "
        f"{lead_key} it sits in {facts['key']}. {lead_tempo} the pulse is around {facts['tempo_bpm']} bpm. "
        f"{contour} {closing}"
    )


def scq_answer(question: dict[str, Any], facts: dict[str, Any]) -> str:
    """The correct option of one of :data:`SCQ_QUESTIONS` for a row's ``facts``."""
    return question["answer_format"].format(facts[question["fact"]])


def scq_file_questions(rows: Iterable[dict[str, Any]],
                       bank: Sequence[dict[str, Any]] = SCQ_QUESTIONS) -> list[dict[str, Any]]:
    """The questions of :data:`SCQ_QUESTIONS` about ``rows`` (manifest or shard rows with
    ``facts``) in the public SCQ file format, one per (clip, fact) the row states.

    Besides the public fields (``audio_path``, ``question``, ``options``, ``answer``, ``category``
    from :data:`FACT_CATEGORIES`) each question keeps vcritic's optional ones: ``id``, ``fact``,
    the clip's ``persona`` and ``context`` (what the critic was trained to read) and the fact's
    ``stem`` (the words an answer continues in loglik mode)."""
    from vcritic.evaluate.scq import LETTERS

    out = []
    for row in rows:
        facts = row.get("facts") or {}
        facts = json.loads(facts) if isinstance(facts, str) else dict(facts)
        for entry in bank:
            if entry["fact"] not in facts:
                continue
            options = [str(o) for o in entry["options"]]
            answer = scq_answer(entry, facts)
            if answer not in options:
                raise ValueError(f"example {row['example_id']!r}: {entry['fact']}={facts[entry['fact']]!r} gives "
                                 f"answer {answer!r}, which is not among the options {options}")
            question = {"id": f"{row['example_id']}:{entry['fact']}", "audio_path": str(row["audio_path"]),
                        "question": entry["question"], "options": options, "answer": LETTERS[options.index(answer)],
                        "category": FACT_CATEGORIES.get(entry["fact"], entry["fact"]), "fact": entry["fact"],
                        "stem": entry["stem"], "persona": str(row.get("persona") or ""),
                        "context": str(row.get("context") or "")}
            offset, duration = row.get("offset_s"), row.get("duration_s")
            if offset:
                question["offset_s"] = float(offset)
            if duration is not None and duration == duration:  # not NaN
                question["duration_s"] = float(duration)
            out.append(question)
    return out


def write_scq_file(rows: Iterable[dict[str, Any]], path: str | Path,
                   bank: Sequence[dict[str, Any]] = SCQ_QUESTIONS) -> Path:
    """Write :func:`scq_file_questions` of ``rows`` (e.g. the test split's) as a JSONL SCQ file,
    audio paths relative to its folder, for ``jobs/evaluate.py ... eval.scq_file=PATH``.

    Raises:
        ValueError: no row states a fact the bank asks about.
    """
    from vcritic.evaluate.scq import write_questions

    questions = scq_file_questions(rows, bank)
    if not questions:
        raise ValueError("no SCQ questions: none of the rows states a fact (key, tempo_bpm, timbre) in its facts")
    return write_questions(questions, path)


def _write_if_changed(path: Path, data: bytes) -> None:
    """Write ``data`` unless the file already holds exactly it: a regenerated demo keeps its files'
    modification times, so the data stage's fingerprint (which covers them) still matches."""
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return
    path.write_bytes(data)


def _write_wav(path: Path, samples: np.ndarray, sr: int) -> str:
    buffer = io.BytesIO()
    sf.write(buffer, samples, sr, subtype="PCM_16", format="WAV")
    _write_if_changed(path, buffer.getvalue())
    return str(path)


def generate(
    out_dir: str | Path,
    songs: int = 40,
    clips_per_song: int = 3,
    clip_seconds: float = 4.0,
    hum_seconds: float = 1.5,
    near_duplicates: int = 6,
    bad_rows: bool = True,
    sample_rate: int = 16000,
    seed: int = 0,
) -> Path:
    """Write ``audio/*.wav`` and ``manifest.jsonl`` under ``out_dir``; the same arguments
    always produce byte-identical files.

    Returns:
        The path of ``manifest.jsonl`` (audio paths in it are absolute).

    Raises:
        ValueError: an argument is out of range (clips too short for two notes at the
            slowest tempo, more near-duplicates than clips, ...).
    """
    min_seconds = 2 * 60.0 / min(TEMPOS)
    if songs < 1 or clips_per_song < 1:
        raise ValueError(f"songs and clips_per_song must be at least 1, got {songs} and {clips_per_song}")
    if clip_seconds < min_seconds:
        raise ValueError(
            f"clip_seconds={clip_seconds} is too short; two notes at {min(TEMPOS)} bpm need {min_seconds:.2f}s"
        )
    if hum_seconds <= 0:
        raise ValueError(f"hum_seconds must be positive, got {hum_seconds}")
    if not 0 <= near_duplicates <= songs * clips_per_song:
        raise ValueError(f"near_duplicates={near_duplicates} must lie in [0, songs * clips_per_song]")

    root = Path(out_dir).resolve()
    audio_dir = root / "audio"
    audio_dir.mkdir(parents=True, exist_ok=True)
    dup_rng = np.random.default_rng([seed, 1])
    dup_picks = set(dup_rng.choice(songs * clips_per_song, size=near_duplicates, replace=False).tolist())

    rows: list[dict[str, Any]] = []
    dups: list[dict[str, Any]] = []
    for song in range(songs):
        facts = song_facts(song, seed)
        song_rng = np.random.default_rng([seed, 2, song])
        source = SOURCES[song % 2]
        style = PERSONAS[source][(song // 2) % len(PERSONAS[source])]
        # No title or artist in the text: a song identity would let a critic recall a training
        # song's facts from its name instead of hearing them, and held-out songs test hearing.
        title = "this one"
        context = f"Genre: {song_rng.choice(GENRES)}."
        # Clips of one song take openings and closings in a shuffled order, so their texts differ.
        openings = [
            style["openings"][i].format(title=title) for i in song_rng.permutation(len(style["openings"]))
        ]
        closings = [style["closings"][i] for i in song_rng.permutation(len(style["closings"]))]
        used: set[tuple[int, ...]] = set()
        for clip in range(clips_per_song):
            clip_rng = np.random.default_rng([seed, 3, song, clip])
            example_id = f"demo-{song:03d}-{clip}"
            n_notes = max(2, int(clip_seconds * facts["tempo_bpm"] / 60.0))
            degrees = melody(clip_rng, n_notes)
            for _ in range(100):  # clips of one song get different tunes (when the length allows that many)
                if tuple(degrees) not in used:
                    break
                degrees = melody(clip_rng, n_notes)
            used.add(tuple(degrees))
            text = critique(
                facts, degrees, style, openings[clip % len(openings)], closings[clip % len(closings)]
            )
            music = render_clip(facts, degrees, clip_seconds, sample_rate)
            row = {
                "example_id": example_id,
                "song_id": f"demo-song-{song:03d}",
                "source": source,
                "audio_path": _write_wav(audio_dir / f"{example_id}.wav", music, sample_rate),
                "offset_s": 0.0,
                "duration_s": float(clip_seconds),
                "persona": style["persona"],
                "context": context,
                "target_text": text,
                "target_audio_path": _write_wav(
                    audio_dir / f"{example_id}-hum.wav",
                    render_hum(facts, degrees, hum_seconds, sample_rate),
                    sample_rate,
                ),
                "target_offset_s": 0.0,
                "target_duration_s": float(hum_seconds),
                "facts": json.dumps(facts),
                "language": "en",
            }
            rows.append(row)
            if song * clips_per_song + clip in dup_picks:
                noise = dup_rng.normal(0.0, 10 ** (NOISE_DBFS / 20), music.size)
                noisy = np.clip(music + noise, -1.0, 1.0).astype(np.float32)
                dup_id = f"{example_id}-dup"
                dup_path = _write_wav(audio_dir / f"{dup_id}.wav", noisy, sample_rate)
                dups.append({**row, "example_id": dup_id, "audio_path": dup_path})
    rows.extend(dups)

    if bad_rows:
        corrupt = audio_dir / "demo-bad-corrupt.wav"
        _write_if_changed(corrupt, np.random.default_rng([seed, 4]).bytes(4096))
        base = rows[0]
        rows.append(
            {**base, "example_id": "demo-bad-corrupt", "song_id": "demo-song-bad", "audio_path": str(corrupt)}
        )
        missing = {k: v for k, v in base.items() if k != "target_text"}
        rows.append({**missing, "example_id": "demo-bad-missing-field", "song_id": "demo-song-bad"})

    manifest = root / "manifest.jsonl"
    _write_if_changed(manifest, "".join(json.dumps(row) + "\n" for row in rows).encode())
    return manifest


# What the demo's reaction recordings say: per recording, a short interjection over the music,
# then two spoken turns in the pauses. {timbre}, {key} and {tempo} are the song's facts.
REACTION_TURNS: tuple[tuple[str, str, str], ...] = (
    ("Wow.", "Okay, I like this one. The lead sounds like a {timbre}.", "It sits in {key}, nice and calm."),
    ("Oh!", "Right away, the lead sounds like a {timbre}.", "The pulse is around {tempo} beats per minute."),
    ("Ooh.", "Pretty sure it sits in {key}.", "And the lead sounds like a {timbre}, very clean."),
    ("Hey.", "The pulse is around {tempo} beats per minute.", "It sits in {key}. Would replay it."),
)
REACTION_MUSIC_S = 4.0  # each listening stretch
REACTION_PAUSE_S = 0.4  # silence around each spoken turn (the music is paused)
SUBTITLE_FORMATS = (None, "srt", None, "vtt")
"""Recording k has a sidecar of this format (None: the reaction stage runs ASR on it)."""


def espeak_available() -> bool:
    """Whether espeak-ng, which speaks the demo's reaction comments, is installed."""
    import shutil

    return shutil.which("espeak-ng") is not None


def speak(text: str, sr: int, voice: str = "en-us", speed: int = 165) -> np.ndarray:
    """``text`` spoken by espeak-ng as float32 at ``sr`` (peak 0.6), leading and trailing silence cut.

    Raises:
        RuntimeError: espeak-ng is missing or fails.
    """
    import subprocess
    import tempfile

    import soxr

    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "speech.wav"
        try:
            subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(wav), text],
                           check=True, capture_output=True, timeout=60)
        except (OSError, subprocess.SubprocessError) as exc:
            raise RuntimeError(f"espeak-ng could not speak {text!r}: {exc}") from exc
        samples, rate = sf.read(wav, dtype="float32", always_2d=True)
    samples = samples.mean(axis=1)
    if rate != sr:
        samples = soxr.resample(samples, rate, sr).astype(np.float32)
    loud = np.flatnonzero(np.abs(samples) > 0.01 * max(float(np.abs(samples).max()), 1e-9))
    samples = samples[loud[0] : loud[-1] + 1] if loud.size else samples
    return (0.6 * samples / max(float(np.abs(samples).max()), 1e-9)).astype(np.float32)


def _cue_time(seconds: float, sep: str) -> str:
    ms = int(round(seconds * 1000))
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}{sep}{ms % 1000:03d}"


def write_subtitles(cues: Sequence[tuple[float, float, str]], path: Path, fmt: str) -> str:
    """``(start, end, text)`` cues as an SRT or WebVTT file (what an uploader's sidecar looks like)."""
    if fmt == "srt":
        body = "".join(f"{i}\n{_cue_time(a, ',')} --> {_cue_time(b, ',')}\n{t}\n\n"
                       for i, (a, b, t) in enumerate(cues, start=1))
    elif fmt == "vtt":
        body = "WEBVTT\n\n" + "".join(f"{_cue_time(a, '.')} --> {_cue_time(b, '.')}\n{t}\n\n" for a, b, t in cues)
    else:
        raise ValueError(f"subtitle format must be 'srt' or 'vtt', got {fmt!r}")
    _write_if_changed(path, body.encode())
    return str(path)


def _reaction_recording(facts: dict[str, Any], turns: tuple[str, str, str], rng: np.random.Generator,
                        sr: int) -> tuple[np.ndarray, list[tuple[float, float, str]]]:
    """One reaction: music, an interjection over its middle, a spoken turn in a pause, more
    music, a second turn. Returns the samples and the ``(start, end, text)`` of what is said."""
    fill = {"timbre": facts["timbre"], "key": facts["key"], "tempo": facts["tempo_bpm"]}
    n_notes = max(2, int(REACTION_MUSIC_S * facts["tempo_bpm"] / 60.0))
    pause = np.zeros(int(REACTION_PAUSE_S * sr), np.float32)
    parts: list[np.ndarray] = []
    cues: list[tuple[float, float, str]] = []
    now = 0.0
    for i, text in enumerate(turns[1:]):
        music = render_clip(facts, melody(rng, n_notes), REACTION_MUSIC_S, sr)
        if i == 0:  # talk over the music: short enough that it is no turn of its own
            words = speak(turns[0], sr)[: int(0.8 * sr)]
            at = int(0.5 * (music.size - words.size))
            music[at : at + words.size] += 0.8 * words
            cues.append((now + at / sr, now + (at + words.size) / sr, turns[0]))
        speech = speak(text.format(**fill), sr)
        parts += [music, pause, speech, pause]
        start = now + (music.size + pause.size) / sr
        cues.append((start, start + speech.size / sr, text.format(**fill)))
        now = start + (speech.size + pause.size) / sr
    return np.clip(np.concatenate(parts), -1.0, 1.0).astype(np.float32), cues


def generate_reactions(out_dir: str | Path, recordings: int = 4, songs: int = 40, sample_rate: int = 16000,
                       seed: int = 0, asr: bool = True) -> Path | None:
    """Write the demo's reaction recordings (``reactions/*.wav``, sidecars for some) and
    ``reactions.jsonl`` (a reactions manifest) under ``out_dir``; byte-identical on a rerun.

    Each recording reacts to one of the demo's ``human`` songs (the same facts, persona and
    context as its clips, so the split keeps it with them): music, an interjection spoken over
    it, then two spoken turns in pauses. Recordings 1 and 3 come with an SRT and a WebVTT
    sidecar, so the stage's subtitle path runs beside its ASR path; with ``asr=False`` (no ASR
    installed) every recording gets a sidecar (SRT or WebVTT, alternating).

    Returns:
        The manifest's path, or None when ``recordings`` is 0 or espeak-ng is not installed (the
        comments cannot be spoken; the caller says so and goes on without reactions).
    """
    if recordings <= 0:
        return None
    if not espeak_available():
        log.warning("espeak-ng is not installed: the demo's reaction recordings (and so the reaction stage) "
                    "are skipped; install it (apt-get install espeak-ng) to run them")
        return None
    root = Path(out_dir).resolve()
    folder = root / "reactions"
    folder.mkdir(parents=True, exist_ok=True)
    human_songs = list(range(0, songs, 2)) or [0]
    rows = []
    for k in range(recordings):
        song = human_songs[k % len(human_songs)]
        facts = song_facts(song, seed)
        context = f"Genre: {np.random.default_rng([seed, 2, song]).choice(GENRES)}."  # as generate() draws it
        samples, cues = _reaction_recording(facts, REACTION_TURNS[k % len(REACTION_TURNS)],
                                            np.random.default_rng([seed, 5, k]), sample_rate)
        rid = f"demo-reaction-{k}"
        row = {"recording_id": rid, "recording_path": _write_wav(folder / f"{rid}.wav", samples, sample_rate),
               "song_id": f"demo-song-{song:03d}", "persona": PERSONAS["human"][(song // 2) % 2]["persona"],
               "context": context, "language": "en"}
        fmt = SUBTITLE_FORMATS[k % len(SUBTITLE_FORMATS)] if asr else ("srt", "vtt")[k % 2]
        if fmt:
            row["subtitles"] = write_subtitles(cues, folder / f"{rid}.{fmt}", fmt)
        rows.append(row)
    manifest = root / "reactions.jsonl"
    _write_if_changed(manifest, "".join(json.dumps(row) + "\n" for row in rows).encode())
    return manifest

"""Small fakes that satisfy each plugin protocol, for tests and plugin authors.

They need only numpy and soundfile, never touch the network, and are deterministic.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

import numpy as np
import soundfile as sf

from vcritic.protocols import JudgeScore, Transcript


def sine(freq: float, seconds: float, sample_rate: int = 16000, amplitude: float = 0.5) -> np.ndarray:
    """A mono float32 sine tone."""
    t = np.arange(int(round(seconds * sample_rate)), dtype=np.float64) / sample_rate
    return (amplitude * np.sin(2.0 * np.pi * freq * t)).astype(np.float32)


def write_wav(path: str, samples: np.ndarray, sample_rate: int = 16000) -> str:
    """Write mono float audio as a 16-bit PCM WAV (creating parent folders); return ``path``."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    sf.write(path, np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0), sample_rate, subtype="PCM_16")
    return path


class FakeASR:
    """Returns the same transcripts for any audio; records what it was called with."""

    def __init__(self, transcripts: Sequence[Transcript] = ()) -> None:
        self.transcripts = list(transcripts)
        self.calls: list[tuple[int, int]] = []  # (num_samples, sample_rate)

    def transcribe(self, samples: np.ndarray, sample_rate: int) -> list[Transcript]:
        self.calls.append((len(samples), sample_rate))
        return list(self.transcripts)


class FakeSeparator:
    """Scales the audio by ``factor`` (so a test can tell separated audio from raw)."""

    def __init__(self, factor: float = 0.5) -> None:
        self.factor = factor

    def separate(self, samples: np.ndarray, sample_rate: int) -> np.ndarray:
        return (np.asarray(samples, dtype=np.float32) * np.float32(self.factor)).astype(np.float32)


class FakeJudge:
    """A judge that gives every critique the same scores, through the real OEQ rubric path.

    ``complete`` recognises which OEQ rubric it is asked (:func:`vcritic.evaluate.oeq.rubric_of`)
    and answers in that rubric's format ("Score: 8/16", "Accuracy: 50%", "Score: 5/10"), so
    :func:`vcritic.evaluate.oeq.judge_oeq` parses it like a real judge's reply. ``replies`` maps a
    rubric to a fixed reply text instead (e.g. an unparsable one). A float ``score`` means the
    same value on all three axes. ``score`` returns the fixed :class:`JudgeScore` directly.
    """

    def __init__(self, score: JudgeScore | float = 0.5, model: str = "fake-judge",
                 replies: dict[str, str] | None = None) -> None:
        if not isinstance(score, JudgeScore):
            score = JudgeScore(float(score), float(score), float(score), "fake")
        self.fixed = score
        self.model = model
        self.replies = dict(replies or {})
        self.calls: list[tuple[str, str, str]] = []
        self.completions: list[list[dict[str, str]]] = []

    def complete(self, messages: list[dict[str, str]]) -> str:
        from vcritic.evaluate.oeq import RUBRICS, rubric_of

        self.completions.append([dict(m) for m in messages])
        rubric = rubric_of(messages)
        if rubric is None:
            return "ok"
        if rubric in self.replies:
            return self.replies[rubric]
        value = getattr(self.fixed, rubric)
        if value is None:
            return "I cannot grade this."
        points = RUBRICS[rubric].max_points
        if points is None:
            return f"Fake fact check.\nAccuracy: {100.0 * value:g}%"
        return f"Fake grading.\nScore: {value * points:g}/{points:g}"

    def score(self, critique: str, reference: str, context: str) -> JudgeScore:
        self.calls.append((critique, reference, context))
        return self.fixed


class FakeAnnotator:
    """Fills ``template`` with ``persona``, ``context``, ``seconds`` and ``sample_rate``."""

    def __init__(self, template: str = "As {persona}: {seconds:.1f}s of music. {context}") -> None:
        self.template = template

    def annotate(self, samples: np.ndarray, sample_rate: int, context: str, persona: str) -> str:
        seconds = len(samples) / sample_rate
        return self.template.format(
            persona=persona, context=context, seconds=seconds, sample_rate=sample_rate
        )


class FakeEmbedder:
    """Unit vectors seeded by a hash of each example's text and audio bytes.

    Identical examples get identical vectors; different ones get unrelated random vectors.
    """

    def __init__(self, dim: int = 16) -> None:
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.dim = dim

    def embed(self, audio: Sequence[np.ndarray], texts: Sequence[str], sample_rate: int) -> np.ndarray:
        if len(audio) != len(texts):
            raise ValueError(f"got {len(audio)} clips but {len(texts)} texts")
        out = np.empty((len(audio), self.dim), dtype=np.float32)
        for i, (clip, text) in enumerate(zip(audio, texts, strict=True)):
            digest = hashlib.sha256(text.encode("utf-8"))
            digest.update(np.ascontiguousarray(clip, dtype=np.float32).tobytes())
            rng = np.random.default_rng(int.from_bytes(digest.digest()[:8], "little"))
            vec = rng.standard_normal(self.dim)
            out[i] = vec / np.linalg.norm(vec)
        return out


class FlakyEmbedder(FakeEmbedder):
    """A :class:`FakeEmbedder` for crash tests: it appends each text it embedded to ``log`` (one line
    each), and raises instead while the file ``fail_while`` exists and the batch holds a text
    containing ``fail_on``. Its options stay the same between the crashed run and the rerun, so the
    data fingerprint does too."""

    def __init__(self, log: str, fail_while: str, fail_on: str, dim: int = 16) -> None:
        super().__init__(dim)
        self.log, self.fail_while, self.fail_on = log, fail_while, fail_on

    def embed(self, audio: Sequence[np.ndarray], texts: Sequence[str], sample_rate: int) -> np.ndarray:
        if os.path.exists(self.fail_while) and any(self.fail_on in t for t in texts):
            raise RuntimeError(f"FlakyEmbedder: a text contains {self.fail_on!r} while {self.fail_while} exists")
        out = super().embed(audio, texts, sample_rate)
        with open(self.log, "a", encoding="utf-8") as f:
            f.writelines(t.replace("\n", " ") + "\n" for t in texts)
        return out

"""Speech-over-music separation, measured: how much music does each separator recover?

Each test item is a demo song (``vcritic.data.demo.render_clip``: melody over a drone, 16 kHz)
with a person talking over it: English sentences spoken by espeak-ng, resampled to 16 kHz and
placed in two spans, the way a reactor talks in bursts. The two are mixed at several
music-to-speech ratios (``--snr``): the energy of the music over the energy of the speech
signal, in dB, over the whole clip, so ``-5`` means the talk is 5 dB louder than the music and
``10`` means the music dominates. The speech keeps its level and the music is scaled; each
mixture and its clean music are then scaled together so the mixture peaks at 0.9.

For each separator and ratio the table shows the mean SI-SDR improvement of its music estimate,
``SI-SDR(estimate, clean music) - SI-SDR(mixture, clean music)`` in dB
(``vcritic.evaluate.separation``), and the real-time factor (processing seconds per second of
audio; below 1 is faster than real time). The first row gives the mixture's own SI-SDR, the
baseline every improvement starts from.

Separators: ``identity`` (improvement 0 by definition), ``hpss_harmonic``, ``vad_gate`` (needs
the ``speech`` extra), ``demucs`` with ``--demucs-checkpoint`` (a real checkpoint; the
``separation`` extra), ``audiosep`` with ``--audiosep-code-dir`` and ``--audiosep-checkpoint``.
``--tiny-demucs`` adds a randomly initialised tiny Demucs (``vcritic.testing.tiny_demucs``) as a
smoke test of the plumbing: its numbers say nothing about Demucs.

    python benchmarks/separation.py                                  # DSP separators only
    python benchmarks/separation.py --demucs-checkpoint ~/models/htdemucs.th
    python benchmarks/separation.py --tiny-demucs --clips 2 --seconds 6
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import soxr

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vcritic import registry  # noqa: E402
from vcritic.data import demo  # noqa: E402
from vcritic.evaluate.separation import mix_at_snr, si_sdr  # noqa: E402

SR = 16000
SENTENCES = (
    "Okay wait, this part is actually really nice, listen to that.",
    "I did not expect the melody to go up there, that is so cool.",
    "Honestly the tune is stuck in my head already, play it again.",
    "Hold on, hold on, the drone underneath is doing a lot of work.",
)


def speak(text: str, workdir: Path, voice: str = "en-us") -> np.ndarray:
    """``text`` spoken by espeak-ng, mono float32 at 16 kHz."""
    out = workdir / "speech.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-w", str(out), text], check=True, capture_output=True)
    data, rate = sf.read(out, dtype="float32", always_2d=True)
    mono = data.mean(axis=1)
    return soxr.resample(mono, rate, SR).astype(np.float32) if rate != SR else mono


def talk_track(seconds: float, index: int, workdir: Path) -> np.ndarray:
    """Two utterances at 10% and 55% of the clip, silence elsewhere."""
    n = int(seconds * SR)
    track = np.zeros(n, dtype=np.float32)
    for k, start_frac in enumerate((0.10, 0.55)):
        words = speak(SENTENCES[(2 * index + k) % len(SENTENCES)], workdir)
        start = int(start_frac * n)
        length = min(words.size, n - start, int(0.4 * n))
        track[start : start + length] += words[:length]
    return track


def items(clips: int, seconds: float, workdir: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(music, speech)`` pairs of equal length."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(clips):
        facts = demo.song_facts(i)
        notes = int(seconds * facts["tempo_bpm"] / 60) + 1
        music = demo.render_clip(facts, demo.melody(rng, notes), seconds, SR)
        out.append((music, talk_track(seconds, i, workdir)))
    return out


def separators(args: argparse.Namespace, workdir: Path) -> tuple[dict[str, Any], list[str]]:
    """The separators to run by row label, and a line for each one that cannot run."""
    plan: list[tuple[str, str, Callable[[], dict[str, Any]] | None, str]] = [
        ("identity", "identity", lambda: {}, ""),
        ("hpss_harmonic", "hpss_harmonic", lambda: {}, ""),
        ("vad_gate", "vad_gate", lambda: {}, ""),
    ]
    if args.demucs_checkpoint:
        plan.append(("demucs", "demucs", lambda: _demucs_options(args, args.demucs_checkpoint), ""))
    else:
        plan.append(
            ("demucs", "demucs", None, "needs --demucs-checkpoint (a local .th/.safetensors or folder)")
        )
    if args.tiny_demucs:

        def tiny() -> dict[str, Any]:
            from vcritic.testing.tiny_demucs import write_tiny_demucs

            return _demucs_options(args, str(write_tiny_demucs(workdir / "tiny.th")))

        plan.append(("demucs [tiny RANDOM weights]", "demucs", tiny, ""))
    if args.audiosep_code_dir and args.audiosep_checkpoint:
        plan.append(
            (
                "audiosep",
                "audiosep",
                lambda: {
                    "code_dir": args.audiosep_code_dir,
                    "checkpoint": args.audiosep_checkpoint,
                    "query": args.audiosep_query,
                    "device": args.device,
                },
                "",
            )
        )
    else:
        plan.append(("audiosep", "audiosep", None, "needs --audiosep-code-dir and --audiosep-checkpoint"))

    built, skipped = {}, []
    for label, name, options, why in plan:
        if options is None:
            skipped.append(f"{label}: not run: {why}")
            continue
        try:
            built[label] = registry.create("separators", name, **options())
        except Exception as exc:  # a missing extra: report it and go on with the others
            skipped.append(f"{label}: not run: {exc}")
    return built, skipped


def _demucs_options(args: argparse.Namespace, checkpoint: str) -> dict[str, Any]:
    options: dict[str, Any] = {"checkpoint": checkpoint, "device": args.device}
    if args.demucs_name:
        options["name"] = args.demucs_name
    if args.demucs_keep is not None:
        options["keep"] = args.demucs_keep
    if args.demucs_gate is not None:
        options["gate"] = args.demucs_gate
    return options


def run(args: argparse.Namespace) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="vcritic-sep-"))
    try:
        pairs = items(args.clips, args.seconds, workdir)
        seps, skipped = separators(args, workdir)
        mixtures = {}
        for snr in args.snr:
            mixtures[snr] = []
            for music, speech in pairs:
                mixture, clean = mix_at_snr(music, speech, snr)
                scale = 0.9 / max(float(np.max(np.abs(mixture))), 1e-9)
                mixtures[snr].append((mixture * scale, clean * scale))
        baseline = {snr: np.mean([si_sdr(m, c) for m, c in mixtures[snr]]) for snr in args.snr}
        rows = []
        for label, sep in seps.items():
            sep.separate(mixtures[args.snr[0]][0][0][: SR // 2], SR)  # load the model outside the timing
            gains, busy, audio_s = {}, 0.0, 0.0
            for snr in args.snr:
                scores = []
                for mixture, clean in mixtures[snr]:
                    start = time.perf_counter()
                    estimate = sep.separate(mixture, SR)
                    busy += time.perf_counter() - start
                    audio_s += mixture.size / SR
                    scores.append(si_sdr(estimate, clean) - si_sdr(mixture, clean))
                gains[snr] = float(np.mean(scores))
            rows.append((label, gains, busy / audio_s))
        print_table(args, baseline, rows, skipped)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def print_table(
    args: argparse.Namespace, baseline: dict[float, float], rows: list, skipped: list[str]
) -> None:
    width = max([len(r[0]) for r in rows] + [len("mixture SI-SDR (dB)")]) + 2
    print(
        f"{args.clips} clips x {args.seconds:g} s at {SR} Hz; music-to-speech ratio in dB per column; "
        "cells: mean SI-SDR improvement of the music estimate (dB)"
    )
    header = "separator".ljust(width) + "".join(f"{snr:>+9g} dB" for snr in args.snr) + "       RTF"
    print(header)
    print("-" * len(header))
    print(
        "mixture SI-SDR (dB)".ljust(width) + "".join(f"{baseline[s]:>12.2f}" for s in args.snr) + f"{'-':>10}"
    )
    for label, gains, rtf in rows:
        print(label.ljust(width) + "".join(f"{gains[s]:>+12.2f}" for s in args.snr) + f"{rtf:>10.3f}")
    for line in skipped:
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument(
        "--snr",
        type=float,
        nargs="+",
        default=[-5.0, 0.0, 5.0, 10.0],
        help="music-to-speech energy ratios in dB",
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--demucs-checkpoint")
    parser.add_argument("--demucs-name", help="model name inside a --demucs-checkpoint folder")
    parser.add_argument(
        "--demucs-keep", nargs="*", help="stems kept as they are (plugin default: drums bass other)"
    )
    parser.add_argument(
        "--demucs-gate", nargs="*", help="stems passed through the speech gate (default: vocals)"
    )
    parser.add_argument(
        "--tiny-demucs",
        action="store_true",
        help="also run a tiny RANDOMLY initialised Demucs (plumbing smoke test; scores mean nothing)",
    )
    parser.add_argument("--audiosep-code-dir")
    parser.add_argument("--audiosep-checkpoint")
    parser.add_argument("--audiosep-query", default="music")
    args = parser.parse_args()
    if shutil.which("espeak-ng") is None:
        parser.error("espeak-ng is not installed (apt-get install espeak-ng): it speaks the talk-over")
    run(args)


if __name__ == "__main__":
    main()

"""Score a clip and degraded versions of it with a critic as a reward model, and print the ranking.

    python jobs/reward_example.py MODEL_URI CLIP.wav [--detune-cents 100] [--noise-snr-db 3]
    python jobs/reward_example.py --toy vcritic_runs/reward_toy     # train the toy critic first

MODEL_URI is an export directory or an MLflow model URI (models:/name@alias). The degraded
versions are made from CLIP: *detuned* mixes in a copy of the clip shifted by ``--detune-cents``
(a second singer out of tune with the first), *noisy* adds white noise at ``--noise-snr-db``.

``--toy DIR`` trains the tiny toy critic of ``vcritic.testing.reward_toy`` (about a minute on two
CPU cores), exports it to ``DIR/export`` and scores a melody it never heard.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402


def detune(x: np.ndarray, cents: float) -> np.ndarray:
    """``x`` mixed with a copy of itself pitched ``cents`` up (by resampling, so slightly shorter)."""
    import soxr

    ratio = 2 ** (cents / 1200)
    shifted = soxr.resample(x, 16000 * ratio, 16000).astype(np.float32)
    n = min(len(x), len(shifted))
    mixed = x[:n] + shifted[:n]
    return (mixed * (np.abs(x).max() / max(np.abs(mixed).max(), 1e-9))).astype(np.float32)


def add_noise(x: np.ndarray, snr_db: float, seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).standard_normal(x.size) * np.sqrt(np.mean(x**2) / 10 ** (snr_db / 10))
    return np.clip(x + noise, -1, 1).astype(np.float32)


def rank(model_uri: str, clean: np.ndarray, sample_rate: int, cents: float, snr_db: float) -> list[tuple[str, object]]:
    """``[(version, RewardResult)]`` best first, for the clean clip and its degraded versions."""
    from vcritic.reward import RewardModel

    versions = {"clean": clean, f"detuned {cents:g} cents": detune(clean, cents),
                f"noisy {snr_db:g} dB SNR": add_noise(clean, snr_db),
                "detuned + noisy": add_noise(detune(clean, cents), snr_db)}
    model = RewardModel.from_uri(model_uri)
    results = model.score_batch(list(versions.values()), sample_rate)
    return sorted(zip(versions, results, strict=True), key=lambda pair: -pair[1].reward)


def train_toy(directory: Path) -> tuple[str, np.ndarray]:
    """Train and export the toy critic; returns the export dir and a held-out clean clip."""
    from vcritic.testing import reward_toy

    toy, tunes = reward_toy.make_toy(directory / "work", train_melodies=24, steps=300)
    export = reward_toy.save_toy_export(toy, directory / "export")
    return str(export), reward_toy.render(tunes[30], seed=7)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_uri", nargs="?")
    parser.add_argument("clip", nargs="?")
    parser.add_argument("--toy", type=Path, help="train the toy critic into this folder and score one of its melodies")
    parser.add_argument("--detune-cents", type=float, default=150.0)
    parser.add_argument("--noise-snr-db", type=float, default=3.0)
    args = parser.parse_args(argv)
    if args.toy:
        model_uri, clean = train_toy(args.toy)
        rate = 16000
    elif args.model_uri and args.clip:
        from vcritic.data.audio import load
        from vcritic.data.schema import AudioRef

        model_uri, rate = args.model_uri, 16000
        clean = load(AudioRef(args.clip), rate)
    else:
        parser.error("give MODEL_URI CLIP, or --toy DIR")
    ranking = rank(model_uri, clean, rate, args.detune_cents, args.noise_snr_db)
    print(f"\nreward ranking by {model_uri}:")
    for place, (name, result) in enumerate(ranking, 1):
        dims = "  ".join(f"{k} {v:.3f}" for k, v in result.scores.items())
        print(f"  {place}. {name:<26} reward {result.reward:.3f}   ({dims})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

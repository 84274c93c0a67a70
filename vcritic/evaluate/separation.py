"""How well a separator recovers the music: scale-invariant signal-to-distortion ratio (SI-SDR).

SI-SDR projects the estimate onto the reference; the projection is the part of the estimate
that "is" the reference (at whatever gain), the rest is distortion, and the score is their
energy ratio in dB. Ignoring the gain matters here because separators legitimately change the
level (the speech gate turns spans down, Demucs rescales stems), and a plain SDR would punish
that as if it were an error. Both signals are made zero-mean first, so a DC offset counts as
neither signal nor distortion.

The figure reported by ``benchmarks/separation.py`` is the improvement, SI-SDR of the estimate
minus SI-SDR of the unprocessed mixture, both against the clean music: 0 dB means the
separator did nothing useful, negative means it made things worse.
"""

from __future__ import annotations

import numpy as np

EPS = 1e-12


def si_sdr(estimate: np.ndarray, reference: np.ndarray) -> float:
    """SI-SDR of ``estimate`` against ``reference`` in dB (1-D arrays of the same length).

    Returns ``-inf`` for an all-zero estimate, ``inf`` for an exact (scaled) copy.

    Raises:
        ValueError: shapes differ or are not 1-D, or ``reference`` is silent (no score exists).
    """
    est = np.asarray(estimate, dtype=np.float64)
    ref = np.asarray(reference, dtype=np.float64)
    if est.ndim != 1 or est.shape != ref.shape:
        raise ValueError(f"si_sdr needs two 1-D arrays of one length, got {est.shape} and {ref.shape}")
    est = est - est.mean()
    ref = ref - ref.mean()
    ref_energy = float(np.dot(ref, ref))
    if ref_energy <= EPS:
        raise ValueError("si_sdr: the reference is silent, so no signal-to-distortion ratio exists")
    target = (np.dot(est, ref) / ref_energy) * ref
    noise = est - target
    target_energy, noise_energy = float(np.dot(target, target)), float(np.dot(noise, noise))
    if target_energy <= EPS * ref_energy:
        return float("-inf")
    if noise_energy <= EPS * target_energy:
        return float("inf")
    return float(10.0 * np.log10(target_energy / noise_energy))


def si_sdr_improvement(estimate: np.ndarray, mixture: np.ndarray, reference: np.ndarray) -> float:
    """``si_sdr(estimate, reference) - si_sdr(mixture, reference)`` in dB."""
    return si_sdr(estimate, reference) - si_sdr(mixture, reference)


def mix_at_snr(
    music: np.ndarray, speech: np.ndarray, music_to_speech_db: float
) -> tuple[np.ndarray, np.ndarray]:
    """Scale ``music`` so its energy is ``music_to_speech_db`` dB above the speech, and add them.

    The speech keeps its level; only the music gain changes, so every mixture of one pair holds
    the same talk. ``-5`` means the talk is 5 dB louder than the music.

    Returns:
        ``(mixture, scaled_music)``; the scaled music is the clean reference for SI-SDR.

    Raises:
        ValueError: lengths differ or either signal is silent.
    """
    m = np.asarray(music, dtype=np.float64)
    s = np.asarray(speech, dtype=np.float64)
    if m.shape != s.shape or m.ndim != 1:
        raise ValueError(f"mix_at_snr needs 1-D music and speech of one length, got {m.shape} and {s.shape}")
    pm, ps = float(np.mean(m**2)), float(np.mean(s**2))
    if pm <= EPS or ps <= EPS:
        raise ValueError("mix_at_snr: music and speech must both have non-zero energy")
    gain = np.sqrt(ps / pm * 10.0 ** (music_to_speech_db / 10.0))
    scaled = m * gain
    return (scaled + s).astype(np.float32), scaled.astype(np.float32)

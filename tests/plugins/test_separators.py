"""IdentitySeparator and HarmonicSeparator."""

from __future__ import annotations

import numpy as np
import pytest

from plugins.dsp.separators import HarmonicSeparator, IdentitySeparator
from vcritic.protocols import Separator

SR = 16000


def sine_with_clicks(seconds: float = 2.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    t = np.arange(int(seconds * SR)) / SR
    sine = 0.3 * np.sin(2 * np.pi * 440.0 * t)
    clicks = np.zeros_like(t)
    burst = np.random.default_rng(0).uniform(-0.6, 0.6, 80) * np.exp(-np.arange(80) / 15)
    for start in range(2000, t.size - 100, 4000):
        clicks[start : start + 80] += burst
    return (sine + clicks).astype(np.float32), sine, clicks


def test_both_satisfy_the_protocol() -> None:
    assert isinstance(IdentitySeparator(), Separator)
    assert isinstance(HarmonicSeparator(), Separator)


def test_identity_returns_an_equal_float32_copy() -> None:
    samples = np.linspace(-0.5, 0.5, 1000, dtype=np.float64)
    out = IdentitySeparator().separate(samples, SR)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, samples, atol=1e-7)
    out[0] = 0.9
    assert samples[0] == -0.5  # the caller's array is never modified through the result


def test_harmonic_keeps_the_tone_and_drops_clicks() -> None:
    mixed, sine, clicks = sine_with_clicks()
    out = HarmonicSeparator().separate(mixed, SR)
    assert out.dtype == np.float32 and out.shape == mixed.shape
    around_clicks = np.abs(clicks) > 0
    residual_before = np.sqrt(np.mean((mixed - sine)[around_clicks] ** 2))
    residual_after = np.sqrt(np.mean((out - sine)[around_clicks] ** 2))
    assert residual_after < 0.5 * residual_before
    # Away from the clicks the tone survives nearly intact.
    steady = slice(SR // 2 + 200, SR // 2 + 1800)
    assert np.sqrt(np.mean(out[steady] ** 2)) == pytest.approx(0.3 / np.sqrt(2), rel=0.15)


def test_harmonic_margin_validation_and_edge_cases() -> None:
    with pytest.raises(ValueError, match="margin"):
        HarmonicSeparator(margin=0.5)
    with pytest.raises(ValueError, match="mono"):
        HarmonicSeparator().separate(np.zeros((2, 100), np.float32), SR)
    assert HarmonicSeparator().separate(np.zeros(0, np.float32), SR).size == 0
    # A larger margin is stricter about what counts as harmonic, so it keeps less energy.
    mixed, _, _ = sine_with_clicks()
    loose, strict = HarmonicSeparator(margin=1.0), HarmonicSeparator(margin=4.0)
    assert np.sum(strict.separate(mixed, SR) ** 2) < np.sum(loose.separate(mixed, SR) ** 2)

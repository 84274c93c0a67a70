"""SI-SDR against values known by construction."""

from __future__ import annotations

import numpy as np
import pytest

from vcritic.evaluate.separation import mix_at_snr, si_sdr, si_sdr_improvement

N = 16000
T = np.arange(N) / N
# Whole periods of a sine and a cosine: zero-mean and exactly orthogonal to each other.
REF = np.sin(2 * np.pi * 50 * T)
ORTHO = np.cos(2 * np.pi * 50 * T)


def orthogonal_noise(ratio_db: float) -> np.ndarray:
    """Noise orthogonal to REF whose energy is ``ratio_db`` below REF's."""
    return ORTHO * np.sqrt(np.sum(REF**2) / np.sum(ORTHO**2) * 10 ** (-ratio_db / 10))


@pytest.mark.parametrize("ratio_db", [-5.0, 0.0, 7.5, 20.0])
def test_reference_plus_orthogonal_noise_scores_its_energy_ratio(ratio_db: float) -> None:
    assert si_sdr(REF + orthogonal_noise(ratio_db), REF) == pytest.approx(ratio_db, abs=1e-6)


def test_the_score_ignores_the_gain_of_either_signal_and_dc() -> None:
    est = REF + orthogonal_noise(3.0)
    base = si_sdr(est, REF)
    assert si_sdr(0.01 * est, REF) == pytest.approx(base, abs=1e-9)
    assert si_sdr(-4.0 * est, REF) == pytest.approx(base, abs=1e-9)  # sign is a gain too
    assert si_sdr(est, 123.0 * REF) == pytest.approx(base, abs=1e-9)
    assert si_sdr(est + 0.3, REF) == pytest.approx(base, abs=1e-9)
    # A different error, by contrast, changes it: a scaled copy of REF inside the estimate is signal.
    assert si_sdr(est + 0.5 * REF, REF) > base


def test_extremes_and_bad_input() -> None:
    assert si_sdr(2.0 * REF, REF) == float("inf")
    assert si_sdr(np.zeros(N), REF) == float("-inf")
    assert si_sdr(ORTHO, REF) == float("-inf")  # nothing of the reference in it
    with pytest.raises(ValueError, match="silent"):
        si_sdr(REF, np.zeros(N))
    with pytest.raises(ValueError, match="1-D"):
        si_sdr(REF[:100], REF)


def test_mix_at_snr_sets_the_music_to_speech_ratio_and_the_mixture_baseline() -> None:
    music, speech = REF * 0.2, ORTHO * 0.7
    for db in (-5.0, 0.0, 5.0, 10.0):
        mixture, clean = mix_at_snr(music, speech, db)
        assert 10 * np.log10(np.mean(clean.astype(np.float64) ** 2) / np.mean(speech**2)) == pytest.approx(
            db, abs=1e-4
        )
        np.testing.assert_allclose(mixture, clean + speech, atol=1e-6)
        # The speech is orthogonal to the music here, so the mixture's SI-SDR is the ratio itself...
        assert si_sdr(mixture, clean) == pytest.approx(db, abs=1e-3)
        # ...and an estimate with half the speech amplitude left (6.02 dB less speech energy)
        # improves on the mixture by exactly 6.02 dB, whatever the starting ratio.
        assert si_sdr_improvement(clean + 0.5 * speech, mixture, clean) == pytest.approx(
            20 * np.log10(2), abs=1e-3
        )
    with pytest.raises(ValueError, match="non-zero"):
        mix_at_snr(np.zeros(N), speech, 0.0)

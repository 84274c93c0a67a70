"""The delay pattern for several codebooks per frame."""

import numpy as np
import pytest

from vcritic.models.codebooks import as_frames, delay, undelay

PAD, EOS = 16, 18


def test_delay_lags_codebook_q_by_q_rows():
    frames = np.array([[1, 2, 3], [4, 5, 6]])
    grid = delay(frames, PAD, EOS)
    assert grid.tolist() == [[1, PAD, PAD], [4, 2, PAD], [EOS, 5, 3], [PAD, EOS, 6], [PAD, PAD, EOS]]


def test_one_codebook_is_the_plain_sequence_then_eos():
    assert delay(np.array([[7], [8]]), PAD, EOS)[:, 0].tolist() == [7, 8, EOS]


@pytest.mark.parametrize("q", [1, 2, 4])
def test_undelay_inverts_delay(q):
    frames = np.random.default_rng(q).integers(0, 16, size=(9, q))
    assert np.array_equal(undelay(delay(frames, PAD, EOS), 16), frames)


def test_undelay_drops_a_malformed_tail():
    grid = delay(np.array([[1, 2], [3, 4], [5, 6]]), PAD, EOS)
    grid[2, 1] = EOS  # codebook 1 of frame 1 is not a real code
    assert undelay(grid, 16).tolist() == [[1, 2]]
    assert undelay(grid[:1], 16).shape == (0, 2)


def test_as_frames_shapes_and_errors():
    assert as_frames([1, 2, 3], 1).shape == (3, 1)
    assert as_frames([1, 2, 3, 4], 2).tolist() == [[1, 2], [3, 4]]
    with pytest.raises(ValueError, match="whole number"):
        as_frames([1, 2, 3], 2)
    with pytest.raises(ValueError, match="codebooks per frame"):
        as_frames(np.zeros((2, 3)), 2)

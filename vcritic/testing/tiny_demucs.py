"""Tiny randomly initialised Demucs checkpoints, written the way demucs itself saves models.

Real separation checkpoints (htdemucs, ~80 MB) cannot be downloaded here, so tests build the
real ``demucs.htdemucs.HTDemucs`` class with a few channels, two encoder levels and one
transformer layer, and write it with ``demucs.states.serialize_model`` + ``torch.save``: a
package dict holding ``klass``, ``args``, ``kwargs`` and ``state`` (half precision, as demucs
stores its releases). The separator plugin then reads it through demucs' own loaders
(``demucs.states.load_model`` for a file, ``demucs.pretrained.get_model(name, repo=...)`` for a
folder), the same path a real checkpoint takes.

Its weights are random: what it outputs is not separated audio, and any SI-SDR measured with
it says nothing about Demucs. It exists to test shapes, sample rates, stem bookkeeping and
that the plugin calls demucs the way demucs' own tools do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

SOURCES = ("drums", "bass", "other", "vocals")

TINY_HTDEMUCS: dict[str, Any] = {
    "sources": list(SOURCES),
    "audio_channels": 2,
    "channels": 4,
    "depth": 3,
    "nfft": 256,
    "t_layers": 1,
    "t_heads": 2,
    "t_hidden_scale": 1.0,
    "bottom_channels": 0,
    "dconv_depth": 1,
    "dconv_comp": 2,
    "samplerate": 8000,  # not 16 kHz, so the plugin's resampling always runs in tests
    "segment": 1,
}
"""Keyword arguments of the tiny ``HTDemucs``: ~20 k parameters, 1 s segments at 22.05 kHz."""


def build_tiny_htdemucs(seed: int = 0, **overrides: Any) -> Any:
    """A seeded random ``HTDemucs`` with :data:`TINY_HTDEMUCS` (updated by ``overrides``)."""
    import torch
    from demucs.htdemucs import HTDemucs

    torch.manual_seed(seed)
    model = HTDemucs(**{**TINY_HTDEMUCS, **overrides})
    return model.eval()


def write_tiny_demucs(path: str | Path, seed: int = 0, **overrides: Any) -> Path:
    """Save a tiny model as demucs' single-model ``.th`` package at ``path``.

    ``path`` may be a file ending in ``.th`` or a folder; a folder gets ``tiny.th`` so that it
    works as a ``--repo`` folder with model name ``tiny``.

    Returns:
        The ``.th`` file written.
    """
    import torch
    from demucs.states import serialize_model
    from omegaconf import OmegaConf

    target = Path(path)
    if target.suffix != ".th":
        target.mkdir(parents=True, exist_ok=True)
        target = target / "tiny.th"
    target.parent.mkdir(parents=True, exist_ok=True)
    model = build_tiny_htdemucs(seed, **overrides)
    package = serialize_model(model, OmegaConf.create({"note": "tiny random weights for tests"}))
    torch.save(package, target)
    return target

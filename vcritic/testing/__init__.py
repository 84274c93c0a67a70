"""Test helpers shipped with vcritic: protocol fakes and tiny audio utilities."""

from vcritic.testing.dummies import (
    FakeAnnotator,
    FakeASR,
    FakeEmbedder,
    FakeJudge,
    FakeSeparator,
    sine,
    write_wav,
)

__all__ = ["FakeASR", "FakeAnnotator", "FakeEmbedder", "FakeJudge", "FakeSeparator", "sine", "write_wav"]

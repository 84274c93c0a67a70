"""A tiny causal-LM backbone shared by the model tests."""

import pytest

from vcritic.models import build

CORPUS = ["Persona: a fan.\nListen and critique:", " the lead sounds like a flute. it sits in G major.",
          " a bright tone, slightly sharp in the chorus."] * 10
BACKBONE = {"name": "causal_lm", "options": {"config": {"hidden_size": 32, "intermediate_size": 64,
                                                        "num_hidden_layers": 2, "num_attention_heads": 4,
                                                        "num_key_value_heads": 2}, "tokenizer_vocab_size": 300}}


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    """The tiny backbone, materialised once per module (as the job does before training)."""
    return build.materialize_backbone(BACKBONE, CORPUS, tmp_path_factory.mktemp("m") / "base")

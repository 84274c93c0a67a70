"""The config schema, presets and overrides."""

from pathlib import Path

import pytest

from vcritic.config import PRESETS_DIR, ConfigError, flatten, from_dict, load, to_dict

PRESETS = sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def test_presets_exist():
    assert {"demo", "qwen2_5_omni_text", "joint_text_audio"} <= set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_shipped_preset_loads_and_documents_its_command(preset):
    cfg = load(preset)
    assert cfg.model.backbone.name
    first_line = (PRESETS_DIR / f"{preset}.yaml").read_text().splitlines()[0]
    assert first_line.startswith("# python jobs/train.py"), "every preset starts with the command that runs it"


def test_paper_settings():
    text = load("qwen2_5_omni_text", ["model.backbone.options.path=/m"])
    assert (text.model.lora_r, text.train.lr, text.train.grad_accum, text.model.loss_lambda, text.train.epochs) == (
        8, 1e-4, 4, 1.0, 3)
    joint = load("joint_text_audio", ["model.backbone.options.path=/m"])
    assert (joint.model.lora_r, joint.train.lr, joint.train.grad_accum, joint.train.epochs) == (16, 1e-5, 4, 3)
    assert joint.model.loss_lambda == pytest.approx(2 / 3)


def test_overrides_apply_with_types():
    cfg = load("demo", ["train.epochs=2", "model.loss_lambda=1.0", "ray.address=auto"])
    assert cfg.train.epochs == 2 and isinstance(cfg.train.epochs, int)
    assert cfg.model.loss_lambda == 1.0
    assert cfg.ray.address == "auto"


@pytest.mark.parametrize(
    "override, key",
    [("train.epochz=2", "train.epochz"), ("train.epochs=abc", "train.epochs"), ("nope.x=1", "nope")],
)
def test_bad_overrides_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load("demo", [override])


def test_range_checks_and_malformed_override():
    with pytest.raises(ConfigError, match="loss_lambda"):
        load("demo", ["model.loss_lambda=1.5"])
    with pytest.raises(ConfigError, match="key=value"):
        load("demo", ["train.epochs"])
    with pytest.raises(ConfigError, match="no preset named 'demoo'"):
        load("demoo")


def test_unknown_key_in_a_yaml_file(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epochs: 1\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="train.learning_rate"):
        load(str(path))


def test_roundtrip_and_flatten():
    cfg = load("demo")
    assert from_dict(to_dict(cfg)) == cfg
    flat = flatten(cfg)
    assert flat["train.epochs"] == str(cfg.train.epochs)
    assert flat["model.backbone.name"] == "causal_lm"

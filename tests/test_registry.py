"""Plugin registry: first-party table, entry points, module:attr, and the errors."""

import configparser
import sys
from pathlib import Path

import pytest

from vcritic import registry
from vcritic.protocols import PROTOCOLS
from vcritic.testing.thirdparty import write_plugin_package

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def on_path(tmp_path, monkeypatch):
    """Make a folder importable and visible to importlib.metadata."""
    def add(folder):
        monkeypatch.syspath_prepend(str(folder))
        return folder
    return add


def test_first_party_table_matches_setup_cfg_entry_points():
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    for kind in registry.KINDS:
        raw = parser["options.entry_points"][f"vcritic.{kind}"]
        declared = dict(line.replace(" ", "").split("=", 1) for line in raw.strip().splitlines())
        assert declared == registry.FIRST_PARTY[kind], kind


@pytest.mark.parametrize("kind", registry.KINDS)
def test_every_first_party_plugin_imports(kind):
    for name in registry.FIRST_PARTY[kind]:
        assert callable(registry.load(kind, name))


def test_first_party_plugins_satisfy_their_protocol():
    plugin = registry.create("separators", "identity")
    assert isinstance(plugin, PROTOCOLS["separators"])
    assert isinstance(registry.create("backbones", "causal_lm"), PROTOCOLS["backbones"])
    assert isinstance(registry.create("audio_tokenizers", "mel_kmeans"), PROTOCOLS["audio_tokenizers"])


def test_unknown_name_suggests_close_matches():
    with pytest.raises(registry.PluginError, match=r"did you mean 'causal_lm'"):
        registry.resolve("backbones", "causal_llm")


def test_unknown_kind():
    with pytest.raises(registry.PluginError, match="unknown plugin kind 'backbone'"):
        registry.available("backbone")


def test_module_attr_escape_hatch():
    cls = registry.load("separators", "plugins.dsp.separators:IdentitySeparator")
    assert cls.__name__ == "IdentitySeparator"
    with pytest.raises(registry.PluginError, match="not of the form"):
        registry.import_target("plugins.dsp.separators")
    with pytest.raises(registry.PluginError, match="has no attribute 'Nope'"):
        registry.import_target("plugins.dsp.separators:Nope")


def test_import_failure_names_the_extra(monkeypatch):
    monkeypatch.setitem(registry.FIRST_PARTY["asr"], "broken", "plugins.speech.does_not_exist:X")
    with pytest.raises(registry.PluginError, match=r"pip install -e '\.\[speech\]'"):
        registry.load("asr", "broken")


def test_options_that_do_not_fit_are_reported():
    with pytest.raises(registry.PluginError, match="rejected its options"):
        registry.create("separators", "identity", nonsense=1)


def test_third_party_entry_point_is_found(tmp_path, on_path):
    on_path(write_plugin_package(tmp_path))
    info = registry.resolve("backbones", "acme_llama")
    assert info.origin == "entry-point:acme_critics"
    backbone = registry.create("backbones", "acme_llama")
    assert backbone.model_type == "llama"
    listed = {(i.kind, i.name): status for i, status in registry.describe_all()}
    assert listed[("backbones", "acme_llama")] == "ok"


def test_two_plugins_with_one_name_is_an_error(tmp_path, on_path):
    on_path(write_plugin_package(tmp_path, entries={"separators": {"identity": "acme_critics.backbone:Other"}}))
    with pytest.raises(registry.PluginError, match="two separators plugins are named 'identity'"):
        registry.resolve("separators", "identity")


def test_broken_third_party_plugin_shows_in_listing(tmp_path, on_path):
    on_path(write_plugin_package(tmp_path, entries={"judges": {"acme_judge": "acme_critics.missing:Judge"}}))
    listed = {(i.kind, i.name): status for i, status in registry.describe_all()}
    assert listed[("judges", "acme_judge")].startswith("error: cannot import 'acme_critics.missing'")


def test_cli_lists_plugins(capsys):
    from vcritic.cli import main

    assert main(["plugins", "list"]) == 0
    out = capsys.readouterr().out
    assert "backbones" in out and "causal_lm" in out and "first-party" in out
    assert sys.modules.get("vcritic.cli") is not None


def test_a_missing_dependency_fails_at_import_with_the_extra(tmp_path, on_path):
    pkg = tmp_path / "plugins_probe"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "needs.py").write_text("from vcritic.registry import require\nrequire('no_such_module_xyz')\nclass P: ...\n")
    on_path(tmp_path)
    with pytest.raises(registry.PluginError, match="missing module\\(s\\) no_such_module_xyz"):
        registry.import_target("plugins_probe.needs:P")


class _OldStyleBackbone:
    """A backbone written before native hearing existed: it lacks the two new methods."""

    def build(self, corpus=None, special_tokens=()): ...
    def decoder_layers(self, model): ...
    def final_norm(self, model): ...
    def run_layers(self, model, layers, hidden, attention_mask, position_ids=None): ...
    def lora_target_modules(self): ...
    def spec(self): ...


class _HalfCodec:
    sample_rate, frame_rate, codebook_size = 24000, 12.5, 2048

    def encode(self, samples): ...


def test_create_checks_the_plugin_against_its_protocol_and_names_what_is_missing(monkeypatch):
    monkeypatch.setattr(registry, "load", lambda kind, name: {"backbones": _OldStyleBackbone,
                                                             "audio_tokenizers": _HalfCodec}[kind])
    with pytest.raises(registry.PluginError, match=r"does not satisfy vcritic\.protocols\.Backbone: it lacks "
                                                   r"native_hearing, init_audio_side"):
        registry.create("backbones", "old")
    with pytest.raises(registry.PluginError, match="lacks num_codebooks, feature_dim, features, fit, decode, save, load"):
        registry.create("audio_tokenizers", "half")


def test_every_first_party_backbone_declares_how_it_hears():
    from plugins.hf.qwen_omni_hearing import QwenOmniHearing
    from vcritic.protocols import NativeHearing

    assert registry.create("backbones", "causal_lm").native_hearing() is None
    hearing = registry.create("backbones", "qwen2_5_omni_thinker").native_hearing()
    assert isinstance(hearing, QwenOmniHearing) and isinstance(hearing, NativeHearing)
    assert hearing.sample_rate == 16000 and hearing.feature_dim == 128 and not hearing.uses_audio_tokens

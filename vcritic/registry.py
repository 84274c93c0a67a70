"""One registry for every plugin kind.

A plugin is found, in order, in:

1. the first-party table below (lazy ``"module:attr"`` strings, so it works from a
   ``ray job submit --working-dir`` checkout that was never pip-installed);
2. installed entry points in the group ``vcritic.<kind>`` (how third parties register);
3. a ``"module:attr"`` string given directly as the name (the escape hatch).

Nothing is imported until a plugin is asked for, so listing is cheap and one broken
plugin never stops another from loading.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

KINDS: tuple[str, ...] = (
    "backbones",
    "audio_tokenizers",
    "separators",
    "asr",
    "embedders",
    "annotators",
    "judges",
)

# First-party plugins. setup.cfg registers the same targets as entry points (a test keeps the
# two in step); this table is what makes a checkout work without being installed.
FIRST_PARTY: dict[str, dict[str, str]] = {
    "backbones": {
        "causal_lm": "plugins.hf.causal_lm:CausalLMBackbone",
        "qwen2_5_omni_thinker": "plugins.hf.qwen_omni:QwenOmniThinkerBackbone",
        "kimi_audio": "plugins.hf.kimi_audio:KimiAudioBackbone",
    },
    "audio_tokenizers": {
        "mel_kmeans": "plugins.dsp.mel_kmeans:MelKMeansTokenizer",
        "kimi_semantic": "plugins.kimi.semantic_tokenizer:KimiSemanticTokenizer",
        "mimi": "plugins.hf.codecs:MimiTokenizer",
        "encodec": "plugins.hf.codecs:EncodecTokenizer",
        "dac": "plugins.hf.codecs:DacTokenizer",
        "xcodec": "plugins.hf.codecs:XcodecTokenizer",
    },
    "separators": {
        "identity": "plugins.dsp.separators:IdentitySeparator",
        "hpss_harmonic": "plugins.dsp.separators:HarmonicSeparator",
        "vad_gate": "plugins.speech.vad_gate:VadGateSeparator",
        "demucs": "plugins.separation.demucs:DemucsSeparator",
        "audiosep": "plugins.separation.audiosep:AudioSepSeparator",
    },
    "asr": {
        "faster_whisper": "plugins.speech.whisper_asr:FasterWhisperASR",
        "hf_whisper": "plugins.speech.hf_whisper:HFWhisperASR",
    },
    "embedders": {
        "logmel_hash": "plugins.dsp.embedders:LogMelHashEmbedder",
        "minilm": "plugins.text.minilm:MiniLMEmbedder",
    },
    "annotators": {
        "openai_chat": "plugins.http.openai_chat:OpenAIChatAnnotator",
        "gemini": "plugins.http.gemini:GeminiAnnotator",
    },
    "judges": {
        "openai_chat": "plugins.http.openai_chat:OpenAIChatJudge",
        "gemini": "plugins.http.gemini:GeminiJudge",
    },
}

# Which `pip install` extra brings the dependencies of a first-party plugin module.
INSTALL_HINTS: dict[str, str] = {
    "plugins.speech.hf_whisper": "pip install -e .  (transformers is a core dependency)",
    "plugins.speech": "pip install -e '.[speech]'",
    "plugins.text": "pip install -e '.[text]'",
    "plugins.separation.demucs": "pip install -e '.[separation]'",
    "plugins.hf": "pip install -e .  (transformers and peft are core dependencies)",
    "plugins.kimi": "pip install the Kimi-Audio package (see plugins/kimi/semantic_tokenizer.py)",
    "plugins.http": "pip install -e .  (openai and google-genai are core dependencies)",
}


class PluginError(LookupError):
    """A plugin could not be found, imported or registered."""


@dataclass(frozen=True)
class PluginInfo:
    kind: str
    name: str
    target: str  # "module:attr"
    origin: str  # "first-party", "entry-point:<dist>", or "module:attr"


def require(*modules: str) -> None:
    """Fail at import time if ``modules`` are not installed, without importing them.

    A plugin module whose heavy dependencies are imported lazily calls this at its top, so a
    missing extra shows in ``vcritic plugins list`` (with the install hint) instead of at first use.

    Raises:
        ImportError: naming the missing modules.
    """
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"missing module(s) {', '.join(missing)}")


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise PluginError(f"unknown plugin kind {kind!r}; kinds are: {', '.join(KINDS)}")


def _entry_point_infos(kind: str) -> list[PluginInfo]:
    infos = []
    for ep in entry_points(group=f"vcritic.{kind}"):
        dist = ep.dist.name if ep.dist is not None else "unknown"
        infos.append(PluginInfo(kind, ep.name, ep.value, f"entry-point:{dist}"))
    return infos


def available(kind: str) -> dict[str, PluginInfo]:
    """Every plugin of ``kind`` by name.

    Raises:
        PluginError: two different targets claim the same name (first-party entries and
            entry points that name the same target are one plugin, not a clash).
    """
    _check_kind(kind)
    found: dict[str, PluginInfo] = {
        name: PluginInfo(kind, name, target, "first-party") for name, target in FIRST_PARTY[kind].items()
    }
    for info in _entry_point_infos(kind):
        prior = found.get(info.name)
        if prior is None:
            found[info.name] = info
        elif prior.target != info.target:
            raise PluginError(
                f"two {kind} plugins are named {info.name!r}: {prior.target} ({prior.origin}) and "
                f"{info.target} ({info.origin}); uninstall one or rename its entry point"
            )
    return found


def import_target(target: str) -> Any:
    """Import ``"module:attr"`` (``attr`` may be dotted) and return the attribute."""
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise PluginError(f"plugin target {target!r} is not of the form 'package.module:attr'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        hint = next((h for prefix, h in INSTALL_HINTS.items() if module_name.startswith(prefix)), None)
        fix = f"; install it with: {hint}" if hint else "; is the package that provides it installed?"
        raise PluginError(f"cannot import {module_name!r} for plugin {target!r}: {exc}{fix}") from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise PluginError(f"module {module_name!r} has no attribute {attr!r} (plugin {target!r})") from exc
    return obj


def resolve(kind: str, name: str) -> PluginInfo:
    """Find the plugin ``name`` of ``kind`` without importing it."""
    _check_kind(kind)
    if ":" in name:
        return PluginInfo(kind, name, name, "module:attr")
    plugins = available(kind)
    if name not in plugins:
        close = difflib.get_close_matches(name, list(plugins), n=3)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise PluginError(
            f"no {kind} plugin named {name!r}{hint} (known: {', '.join(sorted(plugins)) or 'none'}; "
            f"or pass 'package.module:Class')"
        )
    return plugins[name]


def load(kind: str, name: str) -> Any:
    """Import and return the plugin class (or factory) registered as ``name``."""
    return import_target(resolve(kind, name).target)


def create(kind: str, name: str, **options: Any) -> Any:
    """Load the plugin ``name`` of ``kind``, call it with ``options`` and check the result
    against the kind's Protocol (``vcritic.protocols.PROTOCOLS``).

    Raises:
        PluginError: unknown name, import failure, the options do not fit the plugin, or the
            plugin lacks members its kind's Protocol requires (they are named).
    """
    from vcritic.protocols import PROTOCOLS, missing_members

    factory = load(kind, name)
    try:
        plugin = factory(**options)
    except TypeError as exc:
        raise PluginError(f"{kind} plugin {name!r} rejected its options {sorted(options)}: {exc}") from exc
    protocol = PROTOCOLS[kind]
    missing = missing_members(plugin, protocol)
    if missing:
        raise PluginError(
            f"{kind} plugin {name!r} ({type(plugin).__module__}.{type(plugin).__qualname__}) does not satisfy "
            f"vcritic.protocols.{protocol.__name__}: it lacks {', '.join(missing)}"
        )
    return plugin


def describe_all() -> list[tuple[PluginInfo, str]]:
    """Every plugin of every kind with ``"ok"`` or the reason it does not load."""
    rows = []
    for kind in KINDS:
        for info in available(kind).values():
            try:
                import_target(info.target)
                status = "ok"
            except PluginError as exc:
                status = f"error: {exc}"
            rows.append((info, status))
    return rows

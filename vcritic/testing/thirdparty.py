"""Write a throwaway third-party plugin package (with entry-point metadata) into a folder.

Putting that folder on ``sys.path`` (or ``PYTHONPATH`` for Ray workers) makes
``importlib.metadata`` see it as installed, exactly as ``pip install`` would.
"""

from __future__ import annotations

from pathlib import Path

BACKBONE_MODULE = '''
"""A third-party backbone: a tiny Llama instead of the default Qwen2."""
from plugins.hf.causal_lm import CausalLMBackbone

USED = []


class TinyLlamaBackbone(CausalLMBackbone):
    def __init__(self, **options):
        options["model_type"] = "llama"  # this plugin's whole point: always a Llama
        super().__init__(**options)

    def build(self, corpus=None, special_tokens=()):
        model, tokenizer = super().build(corpus, special_tokens)
        USED.append(type(model).__name__)
        return model, tokenizer
'''


def write_plugin_package(root: str | Path, dist: str = "acme_critics", version: str = "0.0.1",
                         entries: dict[str, dict[str, str]] | None = None) -> Path:
    """Create ``<root>/<dist>/`` and ``<root>/<dist>-<version>.dist-info/``.

    Args:
        entries: ``{kind: {name: "module:attr"}}``; default registers ``acme_llama`` as a backbone.
    """
    root = Path(root)
    pkg = root / dist
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "backbone.py").write_text(BACKBONE_MODULE)
    entries = entries or {"backbones": {"acme_llama": f"{dist}.backbone:TinyLlamaBackbone"}}
    info = root / f"{dist}-{version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = []
    for kind, named in entries.items():
        lines.append(f"[vcritic.{kind}]")
        lines += [f"{name} = {target}" for name, target in named.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    (info / "top_level.txt").write_text(f"{dist}\n")
    return root

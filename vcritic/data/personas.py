"""The persona library: the critics an MLLM annotator speaks as, kept in one YAML file.

Both data sources need persona text. A reaction row keeps its uploader's own description; an
annotated (MLLM) row takes a persona from this library, and the same rendered text that steered
the annotator becomes the row's ``persona``, so the critic learns to read the persona it was
written for. The packaged library (``vcritic/data/personas.yaml``) is the default;
``data.personas=/path/to.yaml`` replaces it with a file in the same format.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

DEFAULT_PATH = Path(__file__).with_name("personas.yaml")
REQUIRED_FIELDS = ("id", "style", "expertise", "language")
OPTIONAL_FIELDS = ("description",)
LANGUAGE_NAMES = {"en": "English", "zh": "Chinese (Simplified, 简体中文)", "zh-TW": "Chinese (Traditional, 繁體中文)",
                  "ja": "Japanese", "ko": "Korean", "fr": "French", "de": "German", "es": "Spanish"}
"""Language names the prompt uses for common tags; any other tag is written as it is."""


class PersonaError(ValueError):
    """The persona library is unreadable or a persona is malformed; the message names the file,
    the persona and the field."""


@dataclass(frozen=True)
class Persona:
    id: str
    style: str
    expertise: str
    language: str
    description: str = ""

    @property
    def language_name(self) -> str:
        return LANGUAGE_NAMES.get(self.language, self.language)

    def text(self) -> str:
        """The persona as one paragraph: what the annotator is told to be and what the critic reads."""
        who = f"{self.description.strip()} " if self.description.strip() else ""
        return (f"{who}Style: {self.style.strip()} Expertise: {self.expertise.strip()} "
                f"Writes in {self.language_name}.")


@dataclass(frozen=True)
class PersonaLibrary:
    path: str
    personas: tuple[Persona, ...]

    @property
    def ids(self) -> list[str]:
        return [p.id for p in self.personas]

    def get(self, persona_id: str) -> Persona:
        for persona in self.personas:
            if persona.id == persona_id:
                return persona
        raise KeyError(f"no persona {persona_id!r} in {self.path} (known: {', '.join(self.ids)})")

    def choose(self, count: int, key: str, seed: int) -> list[Persona]:
        """``count`` distinct personas for one clip, the same ones for the same ``key`` and ``seed``
        on every machine (``random.Random`` seeded from a hash, not Python's salted ``hash``)."""
        if not 1 <= count <= len(self.personas):
            raise ValueError(f"cannot choose {count} personas from the {len(self.personas)} in {self.path}")
        digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
        return random.Random(int.from_bytes(digest[:8], "big")).sample(list(self.personas), count)


def _persona(entry: Any, index: int, path: str) -> Persona:
    where = f"{path}: persona #{index + 1}"
    if not isinstance(entry, dict):
        raise PersonaError(f"{where} must be a mapping with {', '.join(REQUIRED_FIELDS)}, got {type(entry).__name__}")
    if isinstance(entry.get("id"), str) and entry["id"].strip():
        where += f" ({entry['id']!r})"
    for name in REQUIRED_FIELDS:
        value = entry.get(name)
        if not isinstance(value, str) or not value.strip():
            problem = "is missing" if value is None else f"must be non-empty text, got {value!r}"
            raise PersonaError(f"{where}: field {name!r} {problem}")
    unknown = sorted(set(entry) - set(REQUIRED_FIELDS) - set(OPTIONAL_FIELDS))
    if unknown:
        raise PersonaError(f"{where}: unknown field(s) {', '.join(map(repr, unknown))} "
                           f"(allowed: {', '.join(REQUIRED_FIELDS + OPTIONAL_FIELDS)})")
    description = entry.get("description") or ""
    if not isinstance(description, str):
        raise PersonaError(f"{where}: field 'description' must be text, got {description!r}")
    return Persona(id=entry["id"].strip(), style=entry["style"], expertise=entry["expertise"],
                   language=entry["language"].strip(), description=description)


def load(path: str | Path | None = None) -> PersonaLibrary:
    """Read and check a persona library (None: the packaged one).

    Raises:
        PersonaError: the file is missing or not YAML, has no ``personas`` list, or a persona
            lacks a field, has an unknown one, or repeats an id; the message names the file, the
            persona and the field.
    """
    file = Path(path) if path else DEFAULT_PATH
    where = str(file)
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise PersonaError(f"persona library {where} cannot be read ({exc.strerror or exc}); "
                           f"set data.personas to a YAML file, or leave it unset for the packaged one") from exc
    except yaml.YAMLError as exc:
        raise PersonaError(f"persona library {where} is not valid YAML: {exc}") from exc
    entries = data.get("personas") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise PersonaError(f"persona library {where} must be a mapping with a non-empty 'personas' list")
    personas = [_persona(entry, i, where) for i, entry in enumerate(entries)]
    seen: dict[str, int] = {}
    for i, persona in enumerate(personas):
        if persona.id in seen:
            raise PersonaError(f"{where}: persona #{i + 1} repeats the id {persona.id!r} of persona #{seen[persona.id] + 1}")
        seen[persona.id] = i
    return PersonaLibrary(where, tuple(personas))

"""Portable references to pretrained checkpoints (base LLMs, codecs).

An export records a pretrained model it builds on as ``{"path", "name", "sha256"}`` instead of
copying GBs of weights. Elsewhere the recorded path may not exist, so :func:`resolve_checkpoint`
also looks for a same-named directory under ``model.base_models_dir`` / ``$VCRITIC_BASE_MODELS``,
accepted only if its hash matches: a same-named directory with other weights must not load silently.

The hash covers every file ending in one of :data:`WEIGHT_SUFFIXES` plus every ``config.json``
(the same tensors under another architecture are another model), at any depth, by relative name,
size and bytes. Tokenizer JSON, generation config, READMEs, shard indexes (derived from the
weights) and hidden entries (``.git``, ``.cache``) are not covered: re-saving them breaks nothing.

Hashing streams files in chunks and is cached (:func:`cache_dir`) by absolute path and each file's
size and ``mtime_ns``, so re-hashing an unchanged 16 GB checkpoint only stats its files. Like
``make``, the cache trusts (size, mtime): an edit that keeps both is not seen.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".npy", ".npz", ".model", ".tiktoken",
                   ".gguf", ".h5", ".msgpack", ".onnx")
HASHED_NAMES = ("config.json",)  # non-weight files that still define the model
ENV_BASE_MODELS = "VCRITIC_BASE_MODELS"
_VERSION = 1  # bump when what the hash covers changes (old cache entries are then ignored)
_CHUNK = 8 << 20


class CheckpointNotFound(FileNotFoundError):
    """No local directory holds the referenced checkpoint; the message says where to put it."""

    def __init__(self, message: str, name: str, sha256: str | None, looked: list[tuple[str, str]]):
        super().__init__(message)
        self.name, self.sha256, self.looked = name, sha256, looked


def weight_files(path: str | os.PathLike) -> list[Path]:
    """The files :func:`weights_hash` covers, relative to the checkpoint directory, sorted.

    A single file is its own checkpoint (whatever its suffix): ``[Path(file name)]``.
    Symlinked files and directories (a Hugging Face snapshot) are followed.
    """
    root = Path(path).expanduser()
    if root.is_file():
        return [Path(root.name)]
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint {root} does not exist")
    found: list[Path] = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink loop
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for f in filenames:
            if not f.startswith(".") and (f.endswith(WEIGHT_SUFFIXES) or f in HASHED_NAMES):
                found.append(Path(dirpath, f).relative_to(root))
    return sorted(found, key=lambda p: p.as_posix())


def cache_dir() -> Path:
    """``$VCRITIC_CACHE_DIR``, else ``$XDG_CACHE_HOME/vcritic``, else ``~/.cache/vcritic``."""
    if os.environ.get("VCRITIC_CACHE_DIR"):
        return Path(os.environ["VCRITIC_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "vcritic"


def _cache_file() -> Path:
    return cache_dir() / f"weights_sha256.v{_VERSION}.json"


def _read_cache() -> dict[str, Any]:
    try:
        with open(_cache_file()) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):  # none yet, or unreadable: recompute
        return {}


def _write_cache(key: str, entry: dict[str, Any]) -> None:
    """Merge one entry in atomically (temp file + ``os.replace``): concurrent Ray workers never
    leave a torn file; at worst one's entry is lost and recomputed later. Best effort: a
    read-only cache dir only costs speed."""
    try:
        target = _cache_file()
        target.parent.mkdir(parents=True, exist_ok=True)
        data = _read_cache()
        data[key] = entry
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".weights_sha256.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f)
            os.replace(tmp, target)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError:
        pass


def _signature(root: Path, files: list[Path]) -> list[list[Any]]:
    base = root.parent if root.is_file() else root
    stats = [os.stat(base / f) for f in files]
    return [[f.as_posix(), s.st_size, s.st_mtime_ns] for f, s in zip(files, stats, strict=True)]


def _digest(root: Path, files: list[Path]) -> str:
    base = root.parent if root.is_file() else root
    h = hashlib.sha256(f"vcritic-weights-v{_VERSION}\0".encode())
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    for rel in files:
        with open(base / rel, "rb") as f:
            h.update(f"{rel.as_posix()}\0{os.fstat(f.fileno()).st_size}\0".encode())
            while n := f.readinto(buf):
                h.update(view[:n])
    return h.hexdigest()


def weights_hash(path: str | os.PathLike) -> str:
    """sha256 over (relative name, size, bytes) of the checkpoint's :func:`weight_files`.

    Equal for a copy in another place; cached by absolute path + each file's size and mtime_ns.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is a directory with no weight files.
    """
    root = Path(path).expanduser().resolve()
    files = weight_files(root)
    if not files:
        raise ValueError(f"{root} holds no weight files (*{', *'.join(WEIGHT_SUFFIXES)} or config.json): "
                         "is it a model checkpoint?")
    key, signature = str(root), _signature(root, files)
    entry = _read_cache().get(key)
    if isinstance(entry, dict) and entry.get("files") == signature and entry.get("sha256"):
        return str(entry["sha256"])
    digest = _digest(root, files)
    if _signature(root, files) == signature:  # not rewritten while we read it
        _write_cache(key, {"files": signature, "sha256": digest})
    return digest


def _components(path: str) -> list[str]:
    """Path components of a local path, URI (``hf://org/name``) or hub id (``org/name``)."""
    return [c for c in path.split("://", 1)[-1].replace("\\", "/").split("/") if c]


def checkpoint_ref(path_or_uri: str | os.PathLike) -> dict[str, Any]:
    """What an export records about a pretrained checkpoint, to find it again elsewhere.

    A local path becomes absolute and is hashed; a URI or hub id that is not a local path is kept
    as given with ``sha256`` None. A Hugging Face cache snapshot
    (``models--Org--Name/snapshots/<rev>``) is named after its repository, not the revision.
    """
    local = Path(path_or_uri).expanduser()
    if local.exists():
        root = local.resolve()
        name = root.name
        if root.parent.name == "snapshots" and root.parent.parent.name.startswith("models--"):
            name = root.parent.parent.name.split("--")[-1]
        return {"path": str(root), "name": name, "sha256": weights_hash(root)}
    parts = _components(str(path_or_uri))
    return {"path": str(path_or_uri), "name": parts[-1] if parts else str(path_or_uri), "sha256": None}


def _check(candidate: Path, sha256: str | None) -> str | None:
    """None if ``candidate`` holds the checkpoint, else why not."""
    if not candidate.exists():
        return "missing"
    if sha256 is None:
        return None
    try:
        found = weights_hash(candidate)
    except ValueError:
        return "exists but holds no weight files"
    return None if found == sha256 else f"exists with different weights (sha256 {found})"


def resolve_checkpoint(ref: dict[str, Any], base_models_dir: str | os.PathLike | None = None) -> str:
    """A local directory holding the weights ``ref`` (from :func:`checkpoint_ref`) names.

    Tries the recorded path, then ``<d>/<name>`` and ``<d>/<last two path components>`` (hub-style
    ``Org/Name``) for each ``d`` in ``base_models_dir`` and ``$VCRITIC_BASE_MODELS`` (several dirs
    separated by ``os.pathsep``). A candidate is accepted if its hash matches ``ref["sha256"]``,
    or, when that is None, if it exists.

    Raises:
        CheckpointNotFound: nowhere matched; the message names the checkpoint, its hash, every
            place looked and how to fix it.
    """
    path, sha256 = str(ref["path"]), ref.get("sha256")
    parts = _components(path)
    name = str(ref.get("name") or (parts[-1] if parts else path))
    dirs = [Path(base_models_dir)] if base_models_dir else []
    dirs += [Path(d) for d in os.environ.get(ENV_BASE_MODELS, "").split(os.pathsep) if d]
    candidates = [Path(path).expanduser()]
    for d in dirs:
        candidates.append(d.expanduser() / name)
        if len(parts) >= 2:
            candidates.append(d.expanduser() / parts[-2] / parts[-1])
    looked: list[tuple[str, str]] = []
    for candidate in dict.fromkeys(candidates):  # ordered, without repeats
        why = _check(candidate, sha256)
        if why is None:
            return str(candidate.resolve())
        looked.append((str(candidate), why))
    where = "\n".join(f"  {p}: {why}" for p, why in looked)
    if not dirs:
        where += f"\n  (no base models directory: model.base_models_dir and ${ENV_BASE_MODELS} are unset)"
    need = f"weights sha256 {sha256}" if sha256 else "any weights (no hash recorded)"
    raise CheckpointNotFound(
        f"pretrained checkpoint {name!r} ({need}) was not found. Looked in:\n{where}\n"
        f"Fix: put the checkpoint (the same files) at <dir>/{name} and give that directory with "
        f"config model.base_models_dir=<dir> or env {ENV_BASE_MODELS}=<dir>.",
        name, sha256, looked)

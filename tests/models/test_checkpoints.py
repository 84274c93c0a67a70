"""Portable checkpoint references: hashing, its cache, and finding a moved base model."""

from __future__ import annotations

import builtins
import json
import os
import shutil
import threading
from pathlib import Path

import pytest

from vcritic.models.checkpoints import (
    CheckpointNotFound,
    cache_dir,
    checkpoint_ref,
    resolve_checkpoint,
    weight_files,
    weights_hash,
)


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Each test gets its own hash cache and no base models directory from the environment."""
    monkeypatch.setenv("VCRITIC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("VCRITIC_BASE_MODELS", raising=False)


def make_checkpoint(directory: Path, seed: int = 0) -> Path:
    """A miniature of a sharded HF checkpoint (plus a nested sub-model, as Kimi-Audio ships)."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps({"model_type": "tiny", "hidden_size": 8}))
    (directory / "model-00001-of-00002.safetensors").write_bytes(bytes(range(256)) * 40 + bytes([seed]))
    (directory / "model-00002-of-00002.safetensors").write_bytes(b"\x07" * 3000)
    (directory / "model.safetensors.index.json").write_text("{}")
    (directory / "tokenizer.json").write_text("{}")
    (directory / "README.md").write_text("# tiny\n")
    (directory / "whisper").mkdir()
    (directory / "whisper" / "config.json").write_text("{}")
    (directory / "whisper" / "model.safetensors").write_bytes(b"whisper" * 100)
    (directory / ".cache" / "huggingface").mkdir(parents=True)
    (directory / ".cache" / "huggingface" / "x.safetensors").write_bytes(b"download metadata")
    return directory


def rewrite_same_size(file: Path) -> None:
    """Change one byte, keep the size, and move mtime on (as any real write does)."""
    before = file.stat()
    data = bytearray(file.read_bytes())
    data[10] ^= 0xFF
    file.write_bytes(bytes(data))
    os.utime(file, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
    assert file.stat().st_size == before.st_size


def test_weight_files_are_sorted_relative_and_include_config(tmp_path):
    ckpt = make_checkpoint(tmp_path / "Tiny-7B")
    assert [p.as_posix() for p in weight_files(ckpt)] == [
        "config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        "whisper/config.json", "whisper/model.safetensors"]
    assert weight_files(ckpt / "config.json") == [Path("config.json")]  # a single file is a checkpoint


def test_hash_is_stable_and_equal_for_a_copy(tmp_path):
    ckpt = make_checkpoint(tmp_path / "a" / "Tiny-7B")
    first = weights_hash(ckpt)
    assert len(first) == 64 and weights_hash(ckpt) == first and weights_hash(str(ckpt)) == first
    copy = shutil.copytree(ckpt, tmp_path / "b" / "Tiny-7B")  # another place, same files
    assert weights_hash(copy) == first
    assert weights_hash(make_checkpoint(tmp_path / "c" / "Tiny-7B", seed=1)) != first


def test_a_changed_byte_changes_the_hash_despite_the_cache(tmp_path):
    ckpt = make_checkpoint(tmp_path / "Tiny-7B")
    before = weights_hash(ckpt)
    rewrite_same_size(ckpt / "model-00001-of-00002.safetensors")
    changed = weights_hash(ckpt)
    assert changed != before
    rewrite_same_size(ckpt / "whisper" / "model.safetensors")  # a nested file counts too
    assert weights_hash(ckpt) not in (before, changed)


def test_config_counts_but_other_files_do_not(tmp_path):
    ckpt = make_checkpoint(tmp_path / "Tiny-7B")
    before = weights_hash(ckpt)
    (ckpt / "README.md").write_text("# edited\n")
    (ckpt / "tokenizer.json").write_text('{"edited": true}')
    (ckpt / "model.safetensors.index.json").write_text('{"edited": true}')
    (ckpt / ".cache" / "huggingface" / "x.safetensors").write_bytes(b"other")
    assert weights_hash(ckpt) == before
    # Same tensors, different architecture: a different model.
    (ckpt / "config.json").write_text(json.dumps({"model_type": "tiny", "hidden_size": 16}))
    assert weights_hash(ckpt) != before


def test_a_cache_hit_reads_no_weights(tmp_path, monkeypatch):
    ckpt = make_checkpoint(tmp_path / "Tiny-7B")
    expected = weights_hash(ckpt)
    assert (cache_dir() / "weights_sha256.v1.json").exists()
    opened: list[str] = []
    real_open = builtins.open

    def counting_open(file, *args, **kwargs):
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    assert weights_hash(ckpt) == expected
    assert not [f for f in opened if f.startswith(str(ckpt))], opened
    rewrite_same_size(ckpt / "model-00002-of-00002.safetensors")
    weights_hash(ckpt)
    assert any(f.endswith("model-00002-of-00002.safetensors") for f in opened)  # a miss re-reads


def test_cache_dir_defaults_and_a_corrupt_cache_is_ignored(tmp_path, monkeypatch):
    monkeypatch.delenv("VCRITIC_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "vcritic"
    ckpt = make_checkpoint(tmp_path / "Tiny-7B")
    expected = weights_hash(ckpt)
    (cache_dir() / "weights_sha256.v1.json").write_text("{torn")
    assert weights_hash(ckpt) == expected
    assert str(ckpt.resolve()) in json.loads((cache_dir() / "weights_sha256.v1.json").read_text())


def test_concurrent_writers_leave_a_valid_cache(tmp_path):
    ckpts = [make_checkpoint(tmp_path / f"m{i}" / "Tiny-7B", seed=i) for i in range(8)]
    errors: list[BaseException] = []

    def work(path):
        try:
            for _ in range(5):
                weights_hash(path)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(p,)) for p in ckpts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert isinstance(json.loads((cache_dir() / "weights_sha256.v1.json").read_text()), dict)
    assert not list(cache_dir().glob("*.tmp"))


def test_errors_name_the_path(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README.md").write_text("no weights")
    with pytest.raises(ValueError, match="empty"):
        weights_hash(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        weights_hash(tmp_path / "nowhere")


def test_checkpoint_ref(tmp_path, monkeypatch):
    ckpt = make_checkpoint(tmp_path / "Tiny-7B")
    monkeypatch.chdir(tmp_path)
    expected = {"path": str(ckpt.resolve()), "name": "Tiny-7B", "sha256": weights_hash(ckpt)}
    assert checkpoint_ref("Tiny-7B") == expected
    hub = {"path": "Qwen/Qwen2.5-Omni-7B", "name": "Qwen2.5-Omni-7B", "sha256": None}
    assert checkpoint_ref("Qwen/Qwen2.5-Omni-7B") == hub
    assert checkpoint_ref("s3://bucket/models/mimi/")["name"] == "mimi"
    snapshot = make_checkpoint(tmp_path / "hub" / "models--kyutai--mimi" / "snapshots" / "0123abc")
    assert checkpoint_ref(snapshot)["name"] == "mimi"


def test_resolves_the_recorded_path_only_while_its_weights_match(tmp_path):
    ckpt = make_checkpoint(tmp_path / "Tiny-7B")
    ref = checkpoint_ref(ckpt)
    assert resolve_checkpoint(ref) == str(ckpt.resolve())
    rewrite_same_size(ckpt / "model-00001-of-00002.safetensors")  # retrained in place
    with pytest.raises(CheckpointNotFound, match="different weights"):
        resolve_checkpoint(ref)


def test_resolves_a_moved_checkpoint_by_argument_and_by_env(tmp_path, monkeypatch):
    ckpt = make_checkpoint(tmp_path / "old" / "Tiny-7B")
    ref = checkpoint_ref(ckpt)
    (tmp_path / "base").mkdir()
    moved = Path(shutil.move(ckpt, tmp_path / "base" / "Tiny-7B")).resolve()
    assert resolve_checkpoint(ref, base_models_dir=tmp_path / "base") == str(moved)
    assert resolve_checkpoint(ref, base_models_dir=str(tmp_path / "base")) == str(moved)
    several = os.pathsep.join([str(tmp_path / "other"), str(tmp_path / "base")])
    monkeypatch.setenv("VCRITIC_BASE_MODELS", several)
    assert resolve_checkpoint(ref) == str(moved)


def test_a_wrong_hash_candidate_is_skipped_and_named(tmp_path, monkeypatch):
    ckpt = make_checkpoint(tmp_path / "old" / "Tiny-7B")
    ref = checkpoint_ref(ckpt)
    shutil.rmtree(ckpt)
    impostor = make_checkpoint(tmp_path / "wrong" / "Tiny-7B", seed=9)
    right = shutil.copytree(make_checkpoint(tmp_path / "src" / "Tiny-7B"), tmp_path / "right" / "Tiny-7B")
    monkeypatch.setenv("VCRITIC_BASE_MODELS", str(tmp_path / "right"))
    # The argument's directory comes first but holds different weights: the env's one wins.
    assert resolve_checkpoint(ref, tmp_path / "wrong") == str(right)
    monkeypatch.delenv("VCRITIC_BASE_MODELS")
    with pytest.raises(CheckpointNotFound) as err:
        resolve_checkpoint(ref, tmp_path / "wrong")
    message = str(err.value)
    assert str(impostor) in message and weights_hash(impostor) in message and "different weights" in message
    assert str(ckpt) in message and "missing" in message


def test_missing_everywhere_says_what_it_needs_and_how_to_fix(tmp_path):
    ckpt = make_checkpoint(tmp_path / "old" / "Tiny-7B")
    ref = checkpoint_ref(ckpt)
    shutil.rmtree(ckpt)
    with pytest.raises(FileNotFoundError) as err:  # CheckpointNotFound is a FileNotFoundError
        resolve_checkpoint(ref)
    assert isinstance(err.value, CheckpointNotFound)
    message = str(err.value)
    for needed in ("Tiny-7B", ref["sha256"], str(ckpt), "VCRITIC_BASE_MODELS", "model.base_models_dir"):
        assert needed in message
    assert err.value.name == "Tiny-7B" and err.value.sha256 == ref["sha256"]


def test_hub_id_without_hash_resolves_by_existence(tmp_path, monkeypatch):
    ref = checkpoint_ref("Qwen/Qwen2.5-Omni-7B")
    with pytest.raises(CheckpointNotFound, match="Qwen2.5-Omni-7B") as err:
        resolve_checkpoint(ref, tmp_path / "models")
    assert str(tmp_path / "models" / "Qwen" / "Qwen2.5-Omni-7B") in str(err.value)
    nested = make_checkpoint(tmp_path / "models" / "Qwen" / "Qwen2.5-Omni-7B")  # <d>/<org>/<name>
    assert resolve_checkpoint(ref, tmp_path / "models") == str(nested)
    flat = make_checkpoint(tmp_path / "flat" / "Qwen2.5-Omni-7B", seed=3)  # <d>/<name>, any weights
    monkeypatch.setenv("VCRITIC_BASE_MODELS", str(tmp_path / "flat"))
    assert resolve_checkpoint(ref) == str(flat)

"""The data stage: manifest → validated, separated, embedded, deduplicated, split and
tokenized Parquet shards, every step a Ray Data operation over CPU workers.

Outputs go to ``<output_dir>/prepared/<fingerprint>/``; the fingerprint covers the manifest
bytes, each audio file's identity (path, size, modification time) and every setting that changes the result, so a rerun with the same inputs reuses
the finished directory and a changed input gets a new one. Work happens in a ``.partial``
directory renamed at the end, so an interrupted run never leaves half-written shards.

``run.output_dir`` may be a URI (``s3://bucket/prefix``): the shards are then written there by the
Ray Data tasks, the small files (audio tokenizer, from-scratch backbone, quarantine) are built in
this node's staging directory and uploaded, and ``prepared.json`` is uploaded last, as the mark that
the prepared data is complete. ``vcritic/storage.py`` says which file lives where.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.data.expressions import col

from vcritic import storage
from vcritic.config import to_dict
from vcritic.data import annotate, audio, demo, filters, reactions, stages
from vcritic.data.dedup import drop_duplicates
from vcritic.data.schema import critic_prompt
from vcritic.data.split import add_split_column
from vcritic.models.build import materialize_backbone

log = logging.getLogger(__name__)
FORMAT = 6  # bump when the shard layout changes, so old prepared data is not reused


@dataclass
class PreparedData:
    root: str
    train_dir: str
    val_dir: str
    quarantine_path: str
    duplicates_path: str
    backbone_spec: dict[str, Any]
    audio_tokenizer_spec: dict[str, Any]
    audio_tokenizer_dir: str
    audio_codes: int
    audio_feature_dim: int
    audio_frame_rate: float
    counts: dict[str, int]
    manifest: str
    audio_num_codebooks: int = 1
    music_seconds_cut: float = 0.0
    """Seconds of music cut off clips longer than a natively hearing backbone's limit (summed)."""
    test_dir: str = ""
    """Shards of the test split (songs in neither train nor val, ``data.test_fraction``): only the
    final evaluation reads them. The directory is absent when the split is empty."""
    local_root: str = ""
    """This node's copy of the small files (``audio_tokenizer_dir``, the quarantine, a from-scratch
    backbone); the same directory as ``root`` when ``run.output_dir`` is local."""
    shared_audio_tokenizer_dir: str = ""
    """``audio_tokenizer_dir`` in ``run.output_dir`` (a URI there), for workers on other nodes:
    ``storage.local_copy(shared_audio_tokenizer_dir)`` gives a local directory anywhere."""
    shared_backbone_dir: str = ""
    """A from-scratch backbone's directory in ``run.output_dir`` (like the above); "" when the
    backbone is the user's own checkpoint (``backbone_spec`` then names its path)."""

    @classmethod
    def load(cls, root: Path) -> PreparedData:
        return cls(**json.loads((root / "prepared.json").read_text()))


def _placed(data: dict[str, Any], stored: storage.Location, local_root: Path) -> PreparedData:
    """``data`` (a prepared.json) with every path pointing at ``stored`` and this node's
    ``local_root``, so a copy prepared on another machine is usable here."""
    data = {**data, "backbone_spec": {**data["backbone_spec"], "options": dict(data["backbone_spec"]["options"])}}
    if data["backbone_spec"].get("from_scratch"):
        data["backbone_spec"]["options"]["path"] = str(local_root / "base")
        data["shared_backbone_dir"] = stored.join("base").uri
    data.update(root=stored.uri, train_dir=stored.join("train").uri, val_dir=stored.join("val").uri,
                test_dir=stored.join("test").uri,
                quarantine_path=str(local_root / "quarantine.jsonl"), duplicates_path=str(local_root / "duplicates.jsonl"),
                audio_tokenizer_dir=str(local_root / "audio_tokenizer"), local_root=str(local_root),
                shared_audio_tokenizer_dir=stored.join("audio_tokenizer").uri)
    return PreparedData(**data)


SMALL_FILES = ("audio_tokenizer", "base", "quarantine.jsonl", "duplicates.jsonl")
"""What this node keeps a copy of under ``local_root`` (the shards stay in the storage)."""


def _reuse(stored: storage.Location, local_root: Path) -> PreparedData | None:
    """The finished prepared data at ``stored``, with this node's copy of its small files fetched
    when missing; None when there is none (``prepared.json`` is written last)."""
    marker = stored.join("prepared.json")
    if not storage.exists(marker):
        return None
    data = json.loads(storage.read_text(marker))
    if not stored.is_local and not (local_root / "prepared.json").exists():
        work = local_root.with_name(local_root.name + ".partial")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        for name in SMALL_FILES:
            if storage.exists(stored.join(name)):
                if name.endswith(".jsonl"):
                    (work / name).write_text(storage.read_text(stored.join(name)))
                else:
                    storage.download_dir(stored.join(name), work / name)
        (work / "prepared.json").write_text(json.dumps(data, indent=2))
        shutil.rmtree(local_root, ignore_errors=True)
        work.rename(local_root)
    log.info("reusing prepared data in %s", stored.uri)
    return _placed(data, stored, local_root)


def _tokenize_on_any_node(batch: pd.DataFrame, **kwargs: Any) -> pd.DataFrame:
    """``stages.tokenize`` where its directories may be URIs: each task's node copies them once."""
    spec = kwargs["backbone_spec"]
    kwargs.update(tokenizer_dir=storage.local_copy(kwargs["tokenizer_dir"]),
                  audio_dir=storage.local_copy(kwargs["audio_dir"]),
                  backbone_spec={**spec, "options": {**spec["options"],
                                                     "path": storage.local_copy(str(spec["options"].get("path", "")))}}
                  if spec["options"].get("path") else spec)
    return stages.tokenize(batch, **kwargs)


def manifest_path(cfg) -> Path:
    """The configured manifest, or the demo set (generated once) in the local staging dir
    (``run.output_dir`` itself when it is a local path)."""
    if cfg.data.manifest:
        path = Path(cfg.data.manifest)
        if not path.exists():
            raise FileNotFoundError(f"data.manifest={cfg.data.manifest!r} does not exist; give a JSONL/Parquet manifest "
                                    f"or leave it unset for the demo set")
        return path
    d = cfg.data.demo
    staging = storage.staging_dir(storage.resolve_output_dir(str(cfg.run.output_dir)))
    return Path(demo.generate(staging / "demo_data", songs=d.songs, clips_per_song=d.clips_per_song,
                              clip_seconds=d.clip_seconds, hum_seconds=d.hum_seconds, near_duplicates=d.near_duplicates,
                              bad_rows=d.bad_rows, sample_rate=cfg.data.sample_rate, seed=cfg.run.seed))


def manifest_files(manifest: Path) -> list[Path]:
    """The files a manifest consists of, in manifest order: a JSONL or Parquet file itself, or a
    directory's ``*.parquet`` files (searched recursively, hidden ``.``/``_`` entries skipped) by name."""
    if manifest.is_dir():
        files = sorted((p for p in manifest.rglob("*.parquet") if p.is_file()
                        and not any(part.startswith((".", "_")) for part in p.relative_to(manifest).parts)),
                       key=lambda p: p.relative_to(manifest).as_posix())
        if not files:
            raise ValueError(f"manifest directory {manifest} holds no .parquet files")
        return files
    if manifest.suffix not in (".parquet", ".jsonl", ".json"):
        raise ValueError(f"manifest {manifest} must be .jsonl or .parquet (or a directory of .parquet files)")
    return [manifest]


def _hash_manifest(h, manifest: Path) -> None:
    """Feed the manifest into ``h``: a file's bytes; for a directory, each file's relative name,
    size and bytes, in name order (so a renamed, resized or edited file changes the hash)."""
    files = manifest_files(manifest)
    for path in files:
        if manifest.is_dir():
            h.update(json.dumps([path.relative_to(manifest).as_posix(), path.stat().st_size]).encode() + b"\0")
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)


AUDIO_COLUMNS = ("audio_path", "target_audio_path")


def _audio_paths(manifest: Path) -> list[str]:
    """Every distinct audio file a manifest names (``audio_path`` and ``target_audio_path``), sorted."""
    paths: set[str] = set()
    for path in manifest_files(manifest):
        if path.suffix == ".parquet":
            names = pq.ParquetFile(path).schema_arrow.names
            frame = pq.read_table(path, columns=[c for c in AUDIO_COLUMNS if c in names]).to_pandas()
        else:
            frame = pd.read_json(path, lines=True, dtype=False)
        for column in AUDIO_COLUMNS:
            if column in frame:
                paths.update(str(v) for v in frame[column].dropna() if isinstance(v, str) and v)
    return sorted(paths)


def hash_audio_files(h, paths: list[str]) -> None:
    """Feed each audio file's identity into ``h``: its path, size and modification time (nanoseconds).

    A re-rendered or replaced recording at the same path then changes the fingerprint, so the
    prepared data made from the old audio is not reused. Size plus mtime is what ``make`` and
    ``rsync`` trust; hashing every byte would read a terabyte-scale corpus once per job start. A
    missing file is hashed as missing (validation quarantines its rows) and a URI by its text only.
    """
    for path in paths:
        try:
            st = os.stat(path)
            identity = [path, st.st_size, st.st_mtime_ns]
        except (OSError, ValueError):
            identity = [path, None, None]
        h.update(json.dumps(identity).encode() + b"\0")


def fingerprint(cfg, manifest: Path) -> str:
    h = hashlib.sha256()
    _hash_manifest(h, manifest)
    hash_audio_files(h, _audio_paths(manifest))
    annotate.hash_inputs(h, cfg)  # data.annotate's clip manifest, its audio, the persona library
    reactions.hash_inputs(h, cfg)  # the reactions manifest, its recordings and subtitle sidecars
    settings = {k: v for k, v in to_dict(cfg.data).items() if k not in ("manifest", "demo")}
    h.update(json.dumps({"format": FORMAT, "data": settings, "seed": cfg.run.seed,
                         "backbone": to_dict(cfg.model.backbone),
                         "audio_tokenizer": to_dict(cfg.model.audio_tokenizer)}, sort_keys=True).encode())
    return h.hexdigest()[:16]


def _read_manifest_file(path: str, first_row: int) -> pa.Table:
    if path.endswith(".parquet"):
        table = pq.ParquetFile(path).read()
    else:
        # dtype=False: ids such as "007" stay strings (pandas would otherwise make "007" and "7" both 7).
        table = pa.Table.from_pandas(pd.read_json(path, lines=True, dtype=False), preserve_index=False)
    rows = pa.array(np.arange(first_row, first_row + table.num_rows, dtype=np.int64))
    return table.append_column(stages.ROW_COLUMN, rows)


class _ManifestDatasource(ray.data.Datasource):
    """One read task per manifest file; each row gets its 1-based position in manifest order
    (``stages.ROW_COLUMN``), which Ray Data's own readers cannot give (block order is not kept)."""

    def __init__(self, files: list[Path]):
        super().__init__()
        self.files = [str(p) for p in files]
        # Only a Parquet directory has several files; their footers give the row counts.
        counts = [pq.ParquetFile(p).metadata.num_rows if p.endswith(".parquet") else 0 for p in self.files]
        self.first_rows = [1 + sum(counts[:k]) for k in range(len(counts))]

    def estimate_inmemory_data_size(self) -> int | None:
        return sum(Path(p).stat().st_size for p in self.files)

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None):
        from ray.data.block import BlockMetadata
        from ray.data.datasource import ReadTask

        return [ReadTask(lambda path=path, first=first: [_read_manifest_file(path, first)],
                         BlockMetadata(num_rows=None, size_bytes=Path(path).stat().st_size, exec_stats=None,
                                       input_files=[path]), per_task_row_limit=per_task_row_limit)
                for path, first in zip(self.files, self.first_rows, strict=True)]


def _read(manifest: Path) -> ray.data.Dataset:
    ds = ray.data.read_datasource(_ManifestDatasource(manifest_files(manifest)))
    rows = ds.count()
    # Enough blocks that every CPU worker gets a share of the decoding.
    return ds.repartition(max(2, min(256, rows // 16)))


def sample_rows(rows: ray.data.Dataset, n: int, seed: int, columns: list[str] | None = None) -> list[dict]:
    """``n`` rows picked by a seeded draw over the sorted example ids, returned sorted by id.

    ``Dataset.take`` returns whichever blocks finish first, so anything fitted on it (the audio
    tokenizer's codebook, the from-scratch BPE vocabulary) could differ between reruns of the same
    inputs. This sample depends only on the ids and the seed.
    """
    picked = rows.select_columns(columns) if columns else rows
    ids = sorted(r["example_id"] for r in rows.select_columns(["example_id"]).take_all())
    if len(ids) > n:
        wanted = np.random.default_rng(seed).choice(ids, size=n, replace=False).tolist()
        picked = picked.filter(expr=col("example_id").is_in(wanted))
    return sorted(picked.take_all(), key=lambda r: r["example_id"])


def _fit_audio_tokenizer(cfg, train: ray.data.Dataset, out_dir: Path):
    tok = stages.plugin("audio_tokenizers", to_dict(cfg.model.audio_tokenizer))
    clips = []
    for row in sample_rows(train, int(cfg.data.tokenizer_fit_clips), int(cfg.run.seed)):
        ex = stages.example_of(row)
        clips.append(audio.load(ex.music, tok.sample_rate))
        if ex.target_audio is not None:
            clips.append(audio.load(ex.target_audio, tok.sample_rate))
    tok.fit(clips)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir))
    return tok


def _corpus(train: ray.data.Dataset, seed: int, limit: int = 100_000) -> list[str]:
    texts = []
    for row in sample_rows(train, limit, seed, columns=["example_id", "persona", "context", "target_text"]):
        texts += [critic_prompt(row["persona"], row["context"]), " " + row["target_text"]]
    return texts


ROWS_PER_SHARD_FILE = 2048


def in_order(rows: ray.data.Dataset, count: int) -> ray.data.Dataset:
    """A split's rows sorted by example_id, in blocks of equal row counts.

    Ray Data writes blocks in the order its tasks finish, so without this the same inputs give
    shard files that differ from run to run in which rows they hold and in what order. Training
    reads the files in name order with ``preserve_order`` (see ``driver.ingest_options``), so a fixed
    layout makes each worker's rows, and the seeded shuffle over them, the same on every rerun.
    """
    blocks = max(1, -(-int(count) // ROWS_PER_SHARD_FILE))
    return rows.sort("example_id").repartition(blocks, shuffle=False)


def _write_jsonl(df: pd.DataFrame, path: Path) -> None:
    df.to_json(path, orient="records", lines=True)


def prepare(cfg) -> PreparedData:
    """Run the whole data stage (or reuse its finished output). Needs a running Ray."""
    manifest = manifest_path(cfg)
    output = storage.resolve_output_dir(str(cfg.run.output_dir))
    fp = fingerprint(cfg, manifest)
    stored = storage.location(output).join("prepared", fp)  # the durable copy
    root = storage.staging_dir(output) / "prepared" / fp  # this node's copy (== stored when local)
    if (done := _reuse(stored, root)) is not None:
        return done
    work = root.with_name(root.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    if not stored.is_local:
        storage.delete_dir(stored)  # leftovers of an interrupted run (prepared.json is written last)
    sr = int(cfg.data.sample_rate)

    rows = _read(manifest).materialize()
    rows, annotated = annotate.add_to(cfg, rows)  # data.annotate: MLLM critiques as more rows
    # data.reactions: reaction recordings as more rows (their separated music outside .partial, as below)
    rows, reacted = reactions.add_to(cfg, rows, root.parent.parent / "reactions" / root.name)
    # A repeated example_id keeps its first row in manifest order; the later rows are quarantined.
    repeats = stages.repeated_ids(rows.select_columns(["example_id", stages.ROW_COLUMN]).to_pandas()) \
        if "example_id" in rows.schema().names else {}
    if repeats:
        log.warning("%d manifest rows repeat an earlier row's example_id; they are quarantined", len(repeats))
    # Validation, separation and embedding run as one operator, so each clip is decoded once here
    # (tokenize decodes the kept clips once more, at the rates the critic reads).
    separating = cfg.data.separator.name != "identity"  # identity would only copy files
    checked = rows.map_batches(stages.curate, batch_format="pandas", batch_size=16, fn_kwargs={
        "sample_rate": sr, "embedder": to_dict(cfg.data.embedder),
        "checks": {"min_s": cfg.data.min_clip_seconds, "max_s": cfg.data.max_clip_seconds,
                   "max_target_s": cfg.data.max_target_audio_seconds, "repeats": repeats,
                   "min_words": int(cfg.data.min_critique_words), "max_words": int(cfg.data.max_critique_words),
                   "filter_settings": to_dict(cfg.data.filters)},
        "separator": to_dict(cfg.data.separator) if separating else None,
        "sources": list(cfg.data.separate_sources), "out_dir": str(root.parent.parent / "separated" / root.name),
        "cache_dir": str(root.parent.parent / "curated" / root.name),  # finished batches survive a crash
    }).materialize()
    embedded = checked.filter(expr=col("error") == "")
    kept, dropped = drop_duplicates(embedded, threshold=float(cfg.data.dedup_threshold),
                                    settings=to_dict(cfg.data.dedup))
    kept = add_split_column(kept.drop_columns(["embedding"]), float(cfg.data.val_fraction), int(cfg.run.seed),
                            test_fraction=float(cfg.data.test_fraction)).materialize()

    train_rows = kept.filter(expr=col("split") == "train")
    audio_tok = _fit_audio_tokenizer(cfg, train_rows, work / "audio_tokenizer")
    backbone_spec = materialize_backbone(to_dict(cfg.model.backbone), _corpus(train_rows, int(cfg.run.seed)), work / "base")
    # The backbone was saved under .partial; point at where it will live after the rename.
    stage_backbone = {"name": backbone_spec["name"], "options": dict(backbone_spec["options"])}
    audio_dir = str(work / "audio_tokenizer")
    if not stored.is_local:
        # The tokenize tasks may run on any node: they read these from the storage.
        storage.upload_dir(work / "audio_tokenizer", stored.join("audio_tokenizer"))
        audio_dir = stored.join("audio_tokenizer").uri
    if backbone_spec.get("from_scratch"):
        backbone_spec["options"]["path"] = str(root / "base")
        stage_backbone["options"]["path"] = tokenizer_dir = str(work / "base")
        if not stored.is_local:
            storage.upload_dir(work / "base", stored.join("base"))
            stage_backbone["options"]["path"] = tokenizer_dir = stored.join("base").uri
    else:
        tokenizer_dir = backbone_spec["options"]["path"]

    tokenized = kept.map_batches(_tokenize_on_any_node, batch_format="pandas", batch_size=16, fn_kwargs={
        "tokenizer_dir": tokenizer_dir, "audio_spec": to_dict(cfg.model.audio_tokenizer),
        "audio_dir": audio_dir, "backbone_spec": stage_backbone,
        "max_prompt_tokens": int(cfg.model.max_prompt_tokens)}).materialize()
    ok = tokenized.filter(expr=col("error") == "").drop_columns(["error", "stage", "raw"])
    split_counts = {split: ok.filter(expr=col("split") == split).count() for split in ("train", "val", "test")}
    for split in ("train", "val", "test"):
        if split == "test" and not split_counts[split]:
            continue  # no test split (data.test_fraction=0 or too few songs): no directory
        shards = stored.join(split) if not stored.is_local else storage.location(str(work / split))
        in_order(ok.filter(expr=col("split") == split), split_counts[split]).write_parquet(shards.path, filesystem=shards.fs)

    bad = pd.concat([checked.filter(expr=col("error") != "").drop_columns(["embedding"]).to_pandas(),
                     tokenized.filter(expr=col("error") != "").to_pandas(), annotated.failed, reacted.failed],
                    ignore_index=True)
    columns = ["example_id", "stage", "error", "raw"]
    _write_jsonl(bad[columns] if len(bad) else pd.DataFrame(columns=columns), work / "quarantine.jsonl")
    dup = dropped.to_pandas()
    _write_jsonl(dup[["example_id", "song_id", "reason"]] if len(dup) else pd.DataFrame(columns=["example_id"]),
                 work / "duplicates.jsonl")
    clips_cut = ok.filter(expr=col("music_cut_s") > 0).count()
    seconds_cut = float(ok.sum("music_cut_s") or 0.0) if clips_cut else 0.0
    counts = {"input": checked.count() + len(annotated.failed) + len(reacted.failed), "quarantined": len(bad), "near_duplicates": len(dup),
              "train": split_counts["train"], "val": split_counts["val"], "test": split_counts["test"],
              "clips_cut": int(clips_cut), **filters.count_filtered(bad["error"] if len(bad) else []),
              **annotated.counts, **reacted.counts}
    if clips_cut:
        log.warning("%d clips were longer than the backbone's audio limit and were cut (%.1f s of music dropped)",
                    clips_cut, seconds_cut)
    prepared = _placed(asdict(PreparedData(
        root="", train_dir="", val_dir="", quarantine_path="", duplicates_path="",
        backbone_spec=backbone_spec, audio_tokenizer_spec=to_dict(cfg.model.audio_tokenizer),
        audio_tokenizer_dir="", audio_codes=int(audio_tok.codebook_size),
        audio_feature_dim=int(audio_tok.feature_dim),
        audio_frame_rate=float(audio_tok.frame_rate), counts=counts, manifest=str(manifest.resolve()),
        audio_num_codebooks=int(audio_tok.num_codebooks), music_seconds_cut=seconds_cut,
    )), stored, root)
    (work / "prepared.json").write_text(json.dumps(asdict(prepared), indent=2))
    if not stored.is_local:
        for name in ("quarantine.jsonl", "duplicates.jsonl"):
            storage.write_text(stored.join(name), (work / name).read_text())
        storage.write_text(stored.join("prepared.json"), (work / "prepared.json").read_text())  # last: complete
    shutil.rmtree(root, ignore_errors=True)
    work.rename(root)
    return prepared

"""Where a run's outputs live, and moving them between that place and this machine.

``run.output_dir`` is either a local path or a filesystem URI that pyarrow understands
(``s3://bucket/prefix``, ``gs://bucket/prefix``, ``hdfs://...``, ``file:///...``). What goes where:

**In ``run.output_dir`` (the durable storage every node can reach):**

- ``ray_results/``: Ray Train's ``storage_path`` (checkpoints, each with its ``export/``).
- ``prepared/<fingerprint>/train``, ``.../val``: the tokenized Parquet shards, written by Ray Data
  tasks and read by the train workers wherever they run.
- ``prepared/<fingerprint>/audio_tokenizer``, ``.../base`` (a from-scratch backbone),
  ``prepared.json``: what any node needs to rebuild the critic. ``prepared.json`` is written last:
  it marks the prepared data complete.

**In the local staging directory (this node only, see :func:`staging_dir`):**

- ``demo_data/``: the generated demo set (its audio is read by path).
- ``separated/``: stems written by the separator stage.
- ``curated/``: each finished batch of the validate/separate/embed step, so a rerun after a crash
  redoes only the batches that had not finished.
- ``prepared/<fingerprint>/``: this node's copy of the small prepared files (audio tokenizer,
  backbone, quarantine and duplicates JSONL, which the driver logs to MLflow).
- ``checkpoints/``: the best checkpoint's ``export/``, downloaded so the driver can load and log it.

For a local ``run.output_dir`` both are the same directory, so nothing is copied. Audio files are
read by path: on several nodes with a URI ``run.output_dir``, the manifest's audio (and the demo
set) must be on a path every node sees.

**Under ``ray job submit``** the job runs in Ray's temporary copy of the working directory, which
is deleted with the Ray session. A relative ``run.output_dir`` (the default ``vcritic_runs``) is
then taken relative to :func:`home` (``$VCRITIC_HOME``, default ``~/.vcritic``) instead, and the
driver logs the absolute location at start.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import pyarrow.fs as pafs

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

HOME_ENV = "VCRITIC_HOME"
# Set by Ray's job supervisor for the entrypoint of every `ray job submit` (Ray 2.60,
# dashboard/modules/job/job_supervisor.py); RAY_JOB_ID is not: Ray strips it on submission.
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
RAY_WORKING_DIR_MARK = ("runtime_resources", "working_dir_files")


# -- the Ray job situation -----------------------------------------------------------------
def home() -> Path:
    """vcritic's own durable directory: ``$VCRITIC_HOME``, else ``~/.vcritic``."""
    return Path(os.environ.get(HOME_ENV) or Path.home() / ".vcritic").expanduser().resolve()


def in_ray_working_dir(path: str | Path | None = None) -> bool:
    """Whether ``path`` (default: the working directory) lies in a copy Ray made of a job's
    ``working_dir`` (``<temp>/session_*/runtime_resources/working_dir_files/_ray_pkg_*``)."""
    parts = Path(path or Path.cwd()).resolve().parts
    mark = RAY_WORKING_DIR_MARK
    return any(parts[i:i + len(mark)] == mark for i in range(len(parts)))


def in_ray_job() -> bool:
    """Whether this process is (a child of) a ``ray job submit`` entrypoint, or runs in a
    working-directory copy made by Ray: there, relative paths vanish with the Ray session."""
    return bool(os.environ.get(RAY_JOB_ENV)) or in_ray_working_dir()


# -- locations ------------------------------------------------------------------------------
def is_uri(location: str) -> bool:
    """``s3://...`` and the like; a Windows-free project, so any ``scheme://`` counts."""
    return "://" in location and not location.startswith("file://")


def resolve_output_dir(output_dir: str) -> str:
    """``run.output_dir`` made absolute: a URI as given; an absolute path as given; a relative path
    against the working directory, or, under a Ray job, against :func:`home`."""
    if not output_dir:
        raise ValueError("run.output_dir is empty; give a directory or a URI such as s3://bucket/prefix")
    if is_uri(output_dir):
        return output_dir.rstrip("/")
    if output_dir.startswith("file://"):
        output_dir = output_dir[len("file://"):]
    path = Path(output_dir).expanduser()
    if not path.is_absolute():
        path = (home() if in_ray_job() else Path.cwd()) / path
    return str(path.resolve())


def resolve_run_output(cfg) -> str:
    """Where ``cfg.run.output_dir`` resolves to (see :func:`resolve_output_dir`), logged; the driver
    calls this once at the start of a run. Every other function here resolves the same way, so
    the (read-only) config keeps the value as given."""
    given = str(cfg.run.output_dir)
    resolved = resolve_output_dir(given)
    if in_ray_job() and not is_uri(given) and not Path(given).expanduser().is_absolute():
        log.warning("running under a Ray job: relative run.output_dir=%r goes to %s (under $%s, default "
                    "~/.vcritic), not into Ray's temporary copy of the working directory; pass an absolute "
                    "run.output_dir or a URI to choose", given, resolved, HOME_ENV)
    log.info("outputs: %s (local staging: %s)", resolved, staging_dir(resolved))
    return resolved


@dataclass(frozen=True)
class Location:
    """A directory in some filesystem: ``uri`` to show and to hand to Ray, ``fs`` + ``path`` to use."""

    uri: str
    fs: pafs.FileSystem
    path: str

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def join(self, *parts: str) -> Location:
        tail = "/".join(p.strip("/") for p in parts)
        return Location(f"{self.uri.rstrip('/')}/{tail}", self.fs, f"{self.path.rstrip('/')}/{tail}")


def location(place: str | Path) -> Location:
    """A :class:`Location` for a local path or URI (credentials and endpoint come from the
    environment: for S3 ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``)."""
    place = str(place)
    if not is_uri(place):
        path = resolve_output_dir(place)
        return Location(path, pafs.LocalFileSystem(), path)
    try:
        fs, path = pafs.FileSystem.from_uri(place)
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError with its own text
        raise ValueError(f"cannot open {place!r} as a pyarrow filesystem ({exc}); use a local path or a URI such "
                         f"as s3://bucket/prefix, with credentials in the environment") from exc
    return Location(place.rstrip("/"), fs, path.rstrip("/"))


def output_location(cfg) -> Location:
    """Where ``cfg.run.output_dir`` points, resolved by the rules of :func:`resolve_output_dir`."""
    return location(resolve_output_dir(str(cfg.run.output_dir)))


def train_storage_path(cfg) -> str:
    """Ray Train's ``RunConfig(storage_path=...)``: ``<run.output_dir>/ray_results``, absolute or a
    URI (Ray opens URIs itself with pyarrow, so no ``storage_filesystem`` is needed)."""
    return output_location(cfg).join("ray_results").uri


def staging_dir(output_dir: str) -> Path:
    """This node's scratch for ``output_dir`` (resolved): the directory itself when it is local,
    else ``<home>/staging/<scheme>/<bucket>/<prefix>``."""
    if not is_uri(output_dir):
        return Path(resolve_output_dir(output_dir))
    scheme, rest = output_dir.split("://", 1)
    return home() / "staging" / scheme / rest.strip("/")


# -- moving files -----------------------------------------------------------------------------
def exists(loc: Location) -> bool:
    return loc.fs.get_file_info(loc.path).type != pafs.FileType.NotFound


def read_text(loc: Location) -> str:
    with loc.fs.open_input_stream(loc.path) as f:
        return f.read().decode()


def write_text(loc: Location, text: str) -> None:
    parent = loc.path.rsplit("/", 1)[0]
    loc.fs.create_dir(parent, recursive=True)
    with loc.fs.open_output_stream(loc.path) as f:
        f.write(text.encode())


def delete_dir(loc: Location) -> None:
    """Remove a directory and everything under it, if it is there."""
    if loc.fs.get_file_info(loc.path).type == pafs.FileType.Directory:
        loc.fs.delete_dir(loc.path)


def upload_dir(local: str | Path, dest: Location) -> None:
    """Copy a local directory's files to ``dest`` (which need not exist)."""
    if dest.is_local and Path(dest.path).resolve() == Path(local).resolve():
        return
    dest.fs.create_dir(dest.path, recursive=True)
    pafs.copy_files(str(Path(local).resolve()), dest.path, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=dest.fs)


def download_dir(src: Location, local: str | Path) -> Path:
    """Copy a directory of ``src`` to the local ``local`` (replacing what is there); returns it."""
    local = Path(local)
    if src.is_local and Path(src.path).resolve() == local.resolve():
        return local
    if src.fs.get_file_info(src.path).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"{src.uri} is not a directory")
    tmp = local.with_name(f".{local.name}.{uuid.uuid4().hex[:8]}.download")
    # copy_files creates the subdirectories it meets, not the destination itself
    tmp.mkdir(parents=True)
    pafs.copy_files(src.path, str(tmp), source_filesystem=src.fs, destination_filesystem=pafs.LocalFileSystem())
    shutil.rmtree(local, ignore_errors=True)
    tmp.rename(local)
    return local


def read_parquet_rows(place: str, limit: int) -> list[dict[str, Any]]:
    """The first ``limit`` rows of a directory of Parquet shards (local or URI) as dicts; [] when
    the directory is missing or holds no shards. For the driver, e.g. SCQ's held-out rows."""
    import pyarrow.dataset as pads

    loc = location(place)
    if loc.fs.get_file_info(loc.path).type != pafs.FileType.Directory:
        return []
    files = [f.path for f in loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True))
             if f.type == pafs.FileType.File and f.path.endswith(".parquet")]
    if not files:
        return []
    table = pads.dataset(sorted(files), filesystem=loc.fs, format="parquet").head(int(limit))
    return table.to_pandas().to_dict("records")


def read_parquet_columns(place: str, columns: list[str]) -> pd.DataFrame:
    """Only ``columns`` of every row of a directory of Parquet shards (local or URI); an empty frame
    with those columns when the directory is missing or holds no shards. Columns a shard lacks are
    left out."""
    import pandas as pd
    import pyarrow.dataset as pads

    loc = location(place)
    if loc.fs.get_file_info(loc.path).type != pafs.FileType.Directory:
        return pd.DataFrame(columns=columns)
    files = [f.path for f in loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True))
             if f.type == pafs.FileType.File and f.path.endswith(".parquet")]
    if not files:
        return pd.DataFrame(columns=columns)
    dataset = pads.dataset(sorted(files), filesystem=loc.fs, format="parquet")
    return dataset.to_table(columns=[c for c in columns if c in dataset.schema.names]).to_pandas()


def local_copy(place: str) -> str:
    """A directory readable on this node: a local path as given; a URI downloaded once per node
    into ``<home>/cache/<hash of the URI>`` (reused afterwards, so call it freely in workers).
    Only for immutable directories, e.g. under ``prepared/<fingerprint>/``."""
    if not is_uri(place):
        return place
    cached = home() / "cache" / hashlib.sha256(place.encode()).hexdigest()[:20]
    if cached.is_dir():
        return str(cached)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=cached.parent))
    download_dir(location(place), tmp / "d")
    try:
        (tmp / "d").rename(cached)  # another process on this node may have won the race: fine
    except OSError:
        pass
    shutil.rmtree(tmp, ignore_errors=True)
    return str(cached)


# -- checkpoints ------------------------------------------------------------------------------
def _fs_uri(fs: pafs.FileSystem, path: str) -> str:
    if isinstance(fs, pafs.LocalFileSystem):
        return path
    scheme = {"s3": "s3", "gcs": "gs", "hdfs": "hdfs", "abfs": "abfs"}.get(fs.type_name, fs.type_name)
    return f"{scheme}://{path.lstrip('/')}"


def checkpoint_uri(checkpoint: Any) -> str:
    """A ``ray.train.Checkpoint`` as a path or URI a user can find it at."""
    return _fs_uri(checkpoint.filesystem, checkpoint.path)


def local_export_dir(checkpoint: Any, cfg) -> Path:
    """The checkpoint's ``export/`` as a local directory: in place when the checkpoint is local,
    else only ``export/`` downloaded to the staging dir (not the DeepSpeed optimizer states,
    which are many times larger)."""
    if isinstance(checkpoint.filesystem, pafs.LocalFileSystem):
        return Path(checkpoint.path) / "export"
    src = Location(checkpoint_uri(checkpoint), checkpoint.filesystem, checkpoint.path).join("export")
    parts = checkpoint.path.rstrip("/").split("/")
    dest = staging_dir(resolve_output_dir(str(cfg.run.output_dir))) / "checkpoints" / parts[-2] / parts[-1] / "export"
    return download_dir(src, dest)


# -- MLflow -----------------------------------------------------------------------------------
def sqlite_path(uri: str) -> str | None:
    """The database path of a ``sqlite:///`` tracking URI (relative stays relative), else None."""
    return uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else None


def set_experiment(name: str, tracking_uri: str) -> str:
    """``mlflow.set_experiment`` that keeps artifacts where they outlive the job.

    A new experiment on a sqlite store stores artifacts in ``mlruns/<name>`` beside the database
    (MLflow's default is ``./mlruns`` of the working directory, inside Ray's temporary copy under
    a Ray job). Under a Ray job, an experiment whose artifacts would still go into the working
    directory is refused. Returns the experiment id.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    db = sqlite_path(tracking_uri)
    if db and mlflow.get_experiment_by_name(name) is None:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
        try:
            mlflow.create_experiment(name, artifact_location=(Path(db).resolve().parent / "mlruns" / safe).as_uri())
        except MlflowException:
            if mlflow.get_experiment_by_name(name) is None:  # not a lost race with another run
                raise
    experiment = mlflow.set_experiment(name)
    parsed = urlparse(experiment.artifact_location)  # file:///..., a bare path, s3://, mlflow-artifacts:/...
    local = parsed.scheme in ("", "file")
    if in_ray_job() and local and in_ray_working_dir(parsed.path):
        raise ValueError(
            f"MLflow experiment {name!r} on {tracking_uri} keeps its artifacts in {experiment.artifact_location}, "
            f"inside Ray's temporary copy of the working directory, which is deleted with the Ray session. "
            f"Use an MLflow tracking server (mlflow.tracking_uri=http://host:5000, started with --serve-artifacts) "
            f"or another mlflow.experiment name")
    return experiment.experiment_id


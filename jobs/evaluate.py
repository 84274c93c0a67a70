"""Evaluate a trained critic on a single-choice (SCQ) and an open-ended (OEQ) question set.

    python jobs/evaluate.py models:/vcritic-critic@champion eval.scq_file=scq_test.jsonl
    python jobs/evaluate.py runs:/<run_id>/critic demo eval.scq_file=q.jsonl eval.scq_mode=loglik,generative
    python jobs/evaluate.py vcritic_runs/ray_results/.../export eval.oeq_file=oeq.jsonl \\
        'eval.judges=[{name: gpt, plugin: openai_chat, params: {model: gpt-4o}}]' eval.human_ratings=ratings.json

The first argument names the critic: a registered model (``models:/name@alias`` or
``models:/name/version``), a run's logged model (``runs:/<run_id>/critic``), a local MLflow model
folder, or an export folder (the one holding ``critic.json``). Then an optional preset (as for
jobs/train.py) and ``key=value`` overrides. Everything lands in a new MLflow run under
``mlflow.experiment``: metrics, the SCQ and OEQ reports as JSON, a per-category bar chart and an
OEQ radar plot; a table goes to the console.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

# Run from a checkout without installing, as jobs/train.py.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

log = logging.getLogger("vcritic.evaluate")
DIMENSIONS = ("completeness", "accuracy", "novelty", "composite")


def split_args(args: list[str]) -> tuple[str, str, list[str]]:
    """(model URI, preset, overrides) from the command line."""
    if not args or "=" in args[0]:
        raise SystemExit("usage: jobs/evaluate.py MODEL_URI [preset] [key=value ...] "
                         "(MODEL_URI: models:/name@alias, runs:/<id>/critic or an export folder)")
    rest = args[1:]
    if rest and "=" not in rest[0]:
        return args[0], rest[0], rest[1:]
    return args[0], "demo", rest


def _export_under(root: Path) -> Path | None:
    """The export folder (with ``critic.json``) inside an MLflow model or an export itself."""
    if (root / "critic.json").is_file():
        return root
    found = sorted(p.parent for p in root.glob("artifacts/*/critic.json"))
    return found[0] if found else None


def resolve_export(model_uri: str, workdir: Path) -> Path:
    """A local export folder for ``model_uri`` (downloaded from MLflow when it is a URI).

    Raises:
        FileNotFoundError: a local path that is neither an export nor an MLflow model of a critic.
    """
    local = Path(model_uri)
    if "://" not in model_uri and ":/" not in model_uri:
        if not local.exists():
            raise FileNotFoundError(f"{model_uri!r} is neither a model URI (models:/name@alias, runs:/<id>/critic) "
                                    f"nor an existing folder")
        found = _export_under(local)
        if found is None:
            raise FileNotFoundError(f"{model_uri} holds no vcritic export (no critic.json, nor artifacts/*/critic.json)")
        return found
    import mlflow

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    path = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(workdir / "model")))
    found = _export_under(path)
    if found is None:
        raise FileNotFoundError(f"{model_uri} is not a vcritic critic: its artifacts hold no export with critic.json")
    return found


def model_tags(model_uri: str) -> dict[str, str]:
    """Which registered version / source run a ``models:/`` URI resolved to (for the run's tags)."""
    tags = {"vcritic.evaluated_model": model_uri}
    if not model_uri.startswith("models:/"):
        if model_uri.startswith("runs:/"):
            tags["vcritic.evaluated_run_id"] = model_uri[len("runs:/"):].split("/")[0]
        return tags
    from mlflow.tracking import MlflowClient

    name_ref = model_uri[len("models:/"):]
    client = MlflowClient()
    try:
        if "@" in name_ref:
            name, alias = name_ref.split("@", 1)
            version = client.get_model_version_by_alias(name, alias)
        else:
            name, number = name_ref.split("/", 1)
            version = client.get_model_version(name, number)
        tags.update({"vcritic.evaluated_version": str(version.version), "vcritic.evaluated_run_id": version.run_id or ""})
    except Exception as exc:  # the download already worked; missing tags are not worth failing over
        log.warning("could not resolve %s to a version: %s", model_uri, exc)
    return tags


# -- SCQ ---------------------------------------------------------------------------------------
def run_scq_modes(critic, cfg) -> dict[str, Any]:
    """Every configured mode over ``eval.scq_file``: {mode: ScqReport}."""
    from vcritic.evaluate.scq import load_questions, run_scq

    questions = load_questions(cfg.eval.scq_file)
    modes = [m.strip() for m in str(cfg.eval.scq_mode).split(",") if m.strip()]
    if "cloze" in modes:
        raise SystemExit("eval.scq_mode=cloze asks bank questions about the training job's tokenized rows "
                         "(it runs inside jobs/train.py); question files take generative and loglik")
    return {mode: run_scq(critic, questions, mode, max_text_tokens=int(cfg.eval.max_new_text_tokens))
            for mode in modes}


def category_chart(reports: dict[str, Any], path: Path) -> Path:
    """Bar chart of accuracy per category (one bar group per category, one bar per mode)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    categories = sorted({c for r in reports.values() for c in r.to_dict()["categories"]})
    width = 0.8 / max(len(reports), 1)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.4 * len(categories) + 2), 3.5))
    x = np.arange(len(categories))
    for k, (mode, report) in enumerate(reports.items()):
        cats = report.to_dict()["categories"]
        ax.bar(x + k * width, [cats.get(c, {}).get("accuracy", 0.0) for c in categories], width,
               label=f"{mode} ({report.accuracy:.2f} overall)")
    ax.set_xticks(x + width * (len(reports) - 1) / 2, [c[:24] for c in categories], rotation=15)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title("SCQ accuracy per category")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# -- OEQ ---------------------------------------------------------------------------------------
def read_jsonl(path: str, required: tuple[str, ...], what: str) -> list[dict[str, Any]]:
    """Rows of a JSONL file, each with ``required`` fields; bad lines fail naming file:line."""
    rows, problems = [], []
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append(f"{path}:{lineno}: not valid JSON ({exc.msg})")
                continue
            missing = [k for k in required if not isinstance(row, dict) or k not in row]
            if missing:
                problems.append(f"{path}:{lineno}: missing field(s) {', '.join(missing)}; each line needs "
                                f"{', '.join(required)}")
                continue
            rows.append({**row, "_line": lineno})
    if problems or not rows:
        raise SystemExit(f"{what} {path}: " + ("\n  ".join(problems) if problems else "holds no rows"))
    return rows


def read_human_ratings(path: str) -> dict[str, dict[str, float]]:
    """{item_id: {dimension: rating}} from a JSON object of that shape or JSONL rows with item_id."""
    text = Path(path).read_text(encoding="utf-8-sig").strip()
    if text.startswith("{") and "\n{" not in text:
        data = json.loads(text)
        return {str(k): dict(v) for k, v in data.items()}
    rows = read_jsonl(path, ("item_id",), "human ratings")
    return {str(r["item_id"]): {k: v for k, v in r.items() if k not in ("item_id", "_line")} for r in rows}


def run_oeq(critic, cfg, out_dir: Path) -> dict[str, Any]:
    """Critiques of ``eval.oeq_file`` scored by ``eval.judges`` (vcritic.evaluate.oeq)."""
    try:
        from vcritic.evaluate import oeq
    except ImportError as exc:
        raise SystemExit(f"eval.oeq_file needs vcritic.evaluate.oeq, which this checkout lacks ({exc})") from exc
    if not cfg.eval.judges:
        raise SystemExit("eval.oeq_file needs eval.judges, e.g. 'eval.judges=[{name: gpt, plugin: openai_chat, "
                         "params: {model: gpt-4o}}]'")
    from vcritic.config import to_dict

    rows = read_jsonl(cfg.eval.oeq_file, ("audio_path", "persona", "context", "reference"), "OEQ file")
    folder = Path(cfg.eval.oeq_file).resolve().parent
    items, failed = [], []
    for row in rows:
        item_id = str(row.get("id") or row.get("item_id") or f"{Path(cfg.eval.oeq_file).name}:{row['_line']}")
        audio = Path(row["audio_path"])
        audio = audio if audio.is_absolute() else folder / audio
        try:
            text = critic.critique(str(audio), str(row["persona"]), str(row["context"] or ""), speak=False,
                                   max_text_tokens=int(cfg.eval.max_new_text_tokens)).text
        except Exception as exc:  # one unreadable clip must not stop the evaluation
            log.warning("OEQ %s: no critique (%s: %s)", item_id, type(exc).__name__, exc)
            failed.append({"id": item_id, "audio_path": str(audio), "error": f"{type(exc).__name__}: {exc}"})
            continue
        items.append(oeq.OeqItem(item_id, text, str(row["reference"]), str(row["context"] or ""), str(row["persona"])))
    judges = oeq.build_judges(to_dict(cfg.eval)["judges"])
    report = oeq.judge_oeq(items, judges, weights=tuple(float(w) for w in cfg.eval.oeq_weights),
                           cache_dir=str(out_dir / "judge_cache"))
    metrics = {f"oeq_{k}" if not k.startswith("oeq") else k: float(v) for k, v in report.metrics.items()}
    metrics["oeq_items"], metrics["oeq_failed_clips"] = float(len(items)), float(len(failed))
    agreement = {}
    if cfg.eval.human_ratings:
        agreement = {f"oeq_agreement_{k}": float(v)
                     for k, v in oeq.agreement(report.rows, read_human_ratings(cfg.eval.human_ratings)).items()}
        metrics.update(agreement)
    critiques = [{"id": i.item_id, "critique": i.critique, "reference": i.reference} for i in items]
    return {"report": report, "metrics": metrics, "failed": failed, "critiques": critiques, "agreement": agreement}


def judge_means(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """{judge: {dimension: mean}} over OEQ rows (rows without a judge name count as "judge")."""
    sums: dict[str, dict[str, list[float]]] = {}
    for row in rows:
        judge = str(row.get("judge", "judge"))
        for dim in DIMENSIONS:
            value = row.get(dim)
            if isinstance(value, int | float) and value == value:
                sums.setdefault(judge, {}).setdefault(dim, []).append(float(value))
    return {j: {d: sum(v) / len(v) for d, v in dims.items()} for j, dims in sums.items()}


def radar_chart(means: dict[str, dict[str, float]], path: Path) -> Path:
    """Radar (polar) plot of each judge's mean completeness, accuracy, novelty and composite."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    angles = np.linspace(0, 2 * np.pi, len(DIMENSIONS), endpoint=False).tolist()
    fig, ax = plt.subplots(figsize=(4.5, 4.5), subplot_kw={"projection": "polar"})
    for judge, dims in sorted(means.items()):
        values = [dims.get(d, 0.0) for d in DIMENSIONS]
        ax.plot(angles + angles[:1], values + values[:1], label=judge)
        ax.fill(angles + angles[:1], values + values[:1], alpha=0.15)
    ax.set_xticks(angles, DIMENSIONS)
    ax.set_ylim(0, 1)
    ax.set_title("OEQ scores per judge")
    if means:
        ax.legend(fontsize="small", loc="lower right", bbox_to_anchor=(1.25, -0.1))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# -- the job -----------------------------------------------------------------------------------
def print_table(scq: dict[str, Any], oeq_result: dict[str, Any] | None, run_id: str) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if scq:
        table = Table(title="SCQ accuracy")
        table.add_column("category")
        for mode in scq:
            table.add_column(mode, justify="right")
        categories = sorted({c for r in scq.values() for c in r.to_dict()["categories"]})
        summaries = {mode: r.to_dict() for mode, r in scq.items()}
        for c in categories:
            cells = []
            for mode in scq:
                cat = summaries[mode]["categories"].get(c)
                cells.append(f"{cat['accuracy']:.3f} ({cat['correct']}/{cat['questions']})" if cat else "-")
            table.add_row(c, *cells)
        table.add_row("overall", *[f"{s['accuracy']:.3f} ({s['questions']} asked)" for s in summaries.values()])
        table.add_row("unparsed / failed clips", *[f"{s['unparsed']} / {s['failed_clips']}" for s in summaries.values()])
        console.print(table)
    if oeq_result:
        table = Table(title="OEQ")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for key, value in sorted(oeq_result["metrics"].items()):
            table.add_row(key, f"{value:.4f}")
        console.print(table)
    console.print(f"MLflow run: {run_id}")


def evaluate(model_uri: str, cfg) -> dict[str, Any]:
    """Run the evaluation described by ``cfg.eval`` on ``model_uri``; returns metrics, run id and files."""
    import mlflow

    from vcritic import storage
    from vcritic.config import flatten
    from vcritic.critic import Critic
    from vcritic.tracking import tracking_uri

    if not cfg.eval.scq_file and not cfg.eval.oeq_file:
        raise SystemExit("nothing to evaluate: give eval.scq_file=FILE (single-choice questions) and/or "
                         "eval.oeq_file=FILE (open-ended questions)")
    for key in ("scq_file", "oeq_file", "human_ratings"):
        value = getattr(cfg.eval, key)
        if value and not Path(value).is_file():
            raise SystemExit(f"eval.{key}={value!r} does not exist")
    uri = tracking_uri(cfg.mlflow.tracking_uri)
    mlflow.set_tracking_uri(uri)
    storage.set_experiment(cfg.mlflow.experiment, uri)
    out: dict[str, Any] = {"metrics": {}, "files": []}
    with tempfile.TemporaryDirectory(prefix="vcritic-eval-") as tmp, \
            mlflow.start_run(run_name=f"evaluate {model_uri}") as run:
        # The plots and the judge cache stay on disk (also logged); a URI output_dir keeps them in the temp dir.
        output = storage.resolve_output_dir(str(cfg.run.output_dir))
        work = (Path(tmp) if storage.is_uri(output) else Path(output)) / "evaluations" / run.info.run_id
        work.mkdir(parents=True, exist_ok=True)
        mlflow.set_tags({**model_tags(model_uri), "vcritic.job": "evaluate"})
        mlflow.log_params({k: v[:500] for k, v in flatten(cfg).items() if k.startswith("eval.")})
        critic = Critic.from_export(resolve_export(model_uri, Path(tmp)), cfg.model.base_models_dir)
        scq: dict[str, Any] = {}
        if cfg.eval.scq_file:
            scq = run_scq_modes(critic, cfg)
            for mode, report in scq.items():
                out["metrics"].update(report.metrics(prefix=f"scq_{mode}"))
                mlflow.log_dict(report.to_dict(), f"scq/{mode}.json")
            out["files"].append(str(category_chart(scq, work / "scq_categories.png")))
            mlflow.log_artifact(out["files"][-1], "scq")
        oeq_result = None
        if cfg.eval.oeq_file:
            oeq_result = run_oeq(critic, cfg, work)
            out["metrics"].update(oeq_result["metrics"])
            report = oeq_result["report"]
            mlflow.log_dict({"rows": report.rows, "failed": oeq_result["failed"], "agreement": oeq_result["agreement"],
                             "critiques": oeq_result["critiques"]}, "oeq/report.json")
            mlflow.log_dict({"raw_replies": report.raw_replies}, "oeq/raw_replies.json")
            out["files"].append(str(radar_chart(judge_means(report.rows), work / "oeq_radar.png")))
            mlflow.log_artifact(out["files"][-1], "oeq")
        mlflow.log_metrics(out["metrics"])
        out["run_id"], out["tracking_uri"], out["output_dir"] = run.info.run_id, uri, str(work)
        print_table(scq, oeq_result, run.info.run_id)
    return out


def main(args: list[str]) -> int:
    from vcritic.config import ConfigError, load

    model_uri, preset, overrides = split_args(args)
    try:
        cfg = load(preset, overrides)
    except ConfigError as exc:
        print(f"vcritic: config error: {exc}", file=sys.stderr)
        return 2
    for key, value in {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
                       "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}.items():
        os.environ.setdefault(key, value)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from vcritic.evaluate.scq import ScqFileError

    try:
        evaluate(model_uri, cfg)
    except (ScqFileError, FileNotFoundError) as exc:  # bad inputs: the message says what to fix
        print(f"vcritic: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

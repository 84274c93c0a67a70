"""The MLflow pyfunc flavour of a critic, so ``models:/<name>@<alias>`` loads anywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd

from vcritic.critic import Critic, CritiqueRequest

# Per-call generation overrides a caller may pass in ``params`` (None: the export's model.generate).
GENERATION_PARAMS: dict[str, str] = {
    "max_text_tokens": "long", "max_audio_tokens": "long", "min_text_tokens": "long", "min_audio_tokens": "long",
    "temperature": "double", "top_p": "double", "repetition_penalty": "double", "audio_temperature": "double",
    "audio_top_p": "double", "batch_size": "long", "seed": "long", "cache": "boolean",
}


def generation_param_specs() -> list:
    """MLflow ``ParamSpec``s of :data:`GENERATION_PARAMS` (default None: use the export's settings)."""
    from mlflow.types import ParamSpec

    return [ParamSpec(name, dtype, None) for name, dtype in GENERATION_PARAMS.items()]


def generation_overrides(params: dict[str, Any] | None) -> dict[str, Any]:
    """The generation settings among ``params`` that were given (as plain Python values)."""
    out: dict[str, Any] = {}
    for name, dtype in GENERATION_PARAMS.items():
        value = (params or {}).get(name)
        if value is None:
            continue
        out[name] = {"long": int, "double": float, "boolean": bool}[dtype](value)
    return out


class CriticPyfunc(mlflow.pyfunc.PythonModel):
    """Rows with ``audio_path`` and ``persona`` (optional ``context``) → a ``critique`` column.

    Rows are critiqued ``batch_size`` at a time with the export's generation settings
    (``model.generate``); ``params`` may override any of them per call (:data:`GENERATION_PARAMS`).
    With ``params={"speech_dir": DIR}`` the spoken critique of each row is written to DIR and its
    path returned in a ``speech_path`` column.
    """

    def load_context(self, context) -> None:
        self.critic = Critic.from_export(context.artifacts["critic"])

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        missing = {"audio_path", "persona"} - set(model_input.columns)
        if missing:
            raise ValueError(f"critic input is missing column(s) {sorted(missing)}; give audio_path and persona per row")
        speech_dir = (params or {}).get("speech_dir")
        rows = model_input.to_dict("records")
        requests = [CritiqueRequest(row["audio_path"], row["persona"],
                                    row["context"] if isinstance(row.get("context"), str) else "") for row in rows]
        results = self.critic.critique_batch(requests, speak=bool(speech_dir), **generation_overrides(params))
        out = []
        for i, result in enumerate(results):
            record = {"critique": result.text}
            if speech_dir:
                import soundfile as sf

                path = Path(speech_dir) / f"critique_{i:04d}.wav"
                path.parent.mkdir(parents=True, exist_ok=True)
                sf.write(path, result.speech, result.sample_rate)
                record["speech_path"] = str(path)
            out.append(record)
        return pd.DataFrame(out)

"""The MLflow pyfunc flavour of a critic, so ``models:/<name>@<alias>`` loads anywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd

from vcritic.critic import Critic


class CriticPyfunc(mlflow.pyfunc.PythonModel):
    """Rows with ``audio_path`` and ``persona`` (optional ``context``) → a ``critique`` column.

    With ``params={"speech_dir": DIR}`` the spoken critique of each row is written to DIR and
    its path returned in a ``speech_path`` column.
    """

    def load_context(self, context) -> None:
        self.critic = Critic.from_export(context.artifacts["critic"])

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        missing = {"audio_path", "persona"} - set(model_input.columns)
        if missing:
            raise ValueError(f"critic input is missing column(s) {sorted(missing)}; give audio_path and persona per row")
        speech_dir = (params or {}).get("speech_dir")
        out = []
        for i, row in enumerate(model_input.to_dict("records")):
            result = self.critic.critique(row["audio_path"], row["persona"], row.get("context") or "", speak=bool(speech_dir))
            record = {"critique": result.text}
            if speech_dir:
                import soundfile as sf

                path = Path(speech_dir) / f"critique_{i:04d}.wav"
                path.parent.mkdir(parents=True, exist_ok=True)
                sf.write(path, result.speech, result.sample_rate)
                record["speech_path"] = str(path)
            out.append(record)
        return pd.DataFrame(out)

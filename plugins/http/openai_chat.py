"""Annotator and judge plugins for any OpenAI-compatible ``/chat/completions`` endpoint."""

from __future__ import annotations

import base64
import io
import json
import os
import re
from typing import Any

import numpy as np
import requests
import soundfile as sf
import soxr
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from vcritic.protocols import JudgeScore

DEFAULT_BASE_URL = "https://api.openai.com/v1"
RETRY_STATUSES = (429, 500, 502, 503, 504)

ANNOTATOR_SYSTEM = (
    "You review recordings of singing voice synthesis as a music critic. Listen to the clip "
    "and write a spoken-style critique of a few sentences, covering four things: the melody "
    "and how well it is carried, the lyrics and what the song is saying, the vocal technique "
    "(pitch, breath, phrasing, expression) and the sound quality (artefacts, mix, noise). "
    "Say concretely what works and what does not. Stay in the persona you are given: its "
    "tastes, vocabulary and tone. Answer with the critique only, no headings or lists."
)

JUDGE_SYSTEM = (
    "You grade a critique of a sung recording by comparing it with a reference critique "
    "written by a person who heard the same recording. Give three integer scores from 0 to "
    "10. completeness: how many of the points in the reference the critique also covers. "
    "accuracy: whether what the critique claims agrees with the reference and the song "
    "facts; penalise claims the reference contradicts. novelty: sound, relevant "
    "observations that the reference does not make. Reply with one JSON object with the keys "
    '"completeness", "accuracy", "novelty" (numbers) and "rationale" (one or two sentences).'
)


class ChatCompletionError(RuntimeError):
    """The endpoint failed, or answered with something that is not a chat completion."""


class OpenAIChatClient:
    """A minimal chat-completions client: retries on 429/5xx, timeout, bearer auth.

    ``base_url`` includes the API version, as in the OpenAI SDK ("https://host/v1"). The
    key comes from ``api_key`` or else, at request time, from the environment variable
    named by ``api_key_env``; with neither, no Authorization header is sent (local servers).
    The HTTP session is created lazily and never pickled.
    """

    def __init__(
        self,
        model: str,
        base_url: str = DEFAULT_BASE_URL,
        api_key: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        timeout: float = 120.0,
        max_retries: int = 3,
        backoff_factor: float = 1.0,
    ) -> None:
        if not model:
            raise ValueError("model must be a non-empty model name")
        self.model = model
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.api_key_env = api_key_env
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff_factor = backoff_factor
        self._session: requests.Session | None = None

    @property
    def url(self) -> str:
        return f"{self.base_url}/chat/completions"

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_session"] = None  # sockets and pools do not pickle; each process opens its own
        return state

    def session(self) -> requests.Session:
        if self._session is None:
            retry = Retry(
                total=self.max_retries,
                status_forcelist=RETRY_STATUSES,
                allowed_methods=frozenset({"POST"}),  # urllib3 does not retry POST by default
                backoff_factor=self.backoff_factor,
                raise_on_status=False,  # hand back the last response so its body can be reported
            )
            session = requests.Session()
            session.mount("http://", HTTPAdapter(max_retries=retry))
            session.mount("https://", HTTPAdapter(max_retries=retry))
            self._session = session
        return self._session

    def headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        key = self.api_key or os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def complete(self, messages: list[dict[str, Any]], **params: Any) -> str:
        """POST ``messages`` (plus ``params`` such as temperature) and return the reply text."""
        body = {"model": self.model, "messages": messages, **params}
        try:
            resp = self.session().post(self.url, json=body, headers=self.headers(), timeout=self.timeout)
        except requests.RequestException as exc:
            raise ChatCompletionError(f"POST {self.url} failed: {type(exc).__name__}: {exc}") from exc
        excerpt = resp.text[:500]
        if resp.status_code != 200:
            hint = ""
            if resp.status_code == 401:
                hint = f" (set api_key or the {self.api_key_env} environment variable)"
            raise ChatCompletionError(f"POST {self.url} returned HTTP {resp.status_code}{hint}: {excerpt}")
        try:
            message = resp.json()["choices"][0]["message"]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise ChatCompletionError(
                f"POST {self.url} returned a malformed chat completion: {excerpt}"
            ) from exc
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, str) or not content.strip():
            refusal = message.get("refusal") if isinstance(message, dict) else None
            why = f"the model refused: {refusal}" if refusal else f"no text content in: {excerpt}"
            raise ChatCompletionError(f"POST {self.url}: {why}")
        return content.strip()


def wav_base64(samples: np.ndarray, sample_rate: int, target_rate: int = 16000) -> str:
    """Mono audio → base64 of a 16-bit PCM WAV at ``target_rate`` (small enough to upload)."""
    audio = np.asarray(samples, dtype=np.float32)
    if audio.ndim != 1 or audio.size == 0:
        raise ValueError(f"expected non-empty mono audio (1-D), got shape {audio.shape}")
    if sample_rate != target_rate:
        audio = soxr.resample(audio, sample_rate, target_rate).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, np.clip(audio, -1.0, 1.0), target_rate, format="WAV", subtype="PCM_16")
    return base64.b64encode(buf.getvalue()).decode("ascii")


class OpenAIChatAnnotator:
    """The ``Annotator`` plugin ``openai_chat``: an audio-capable chat model writes critiques."""

    def __init__(
        self,
        model: str = "gpt-4o-audio-preview",
        base_url: str = DEFAULT_BASE_URL,
        api_key: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        timeout: float = 120.0,
        max_retries: int = 3,
        temperature: float = 0.7,
        max_tokens: int = 600,
        upload_rate: int = 16000,
        system_prompt: str = ANNOTATOR_SYSTEM,
    ) -> None:
        self.client = OpenAIChatClient(model, base_url, api_key, api_key_env, timeout, max_retries)
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.upload_rate = upload_rate
        self.system_prompt = system_prompt

    def messages(self, samples: np.ndarray, sample_rate: int, context: str, persona: str) -> list[dict]:
        text = f"Your persona: {persona}"
        if context:
            text += f"\nWhat is known about the song: {context}"
        text += "\nListen to the attached clip and give your critique."
        audio = {"data": wav_base64(samples, sample_rate, self.upload_rate), "format": "wav"}
        return [
            {"role": "system", "content": self.system_prompt},
            {
                "role": "user",
                "content": [{"type": "text", "text": text}, {"type": "input_audio", "input_audio": audio}],
            },
        ]

    def annotate(self, samples: np.ndarray, sample_rate: int, context: str, persona: str) -> str:
        return self.client.complete(
            self.messages(samples, sample_rate, context, persona),
            temperature=self.temperature,
            max_tokens=self.max_tokens,
        )


_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


def parse_judge_reply(reply: str) -> JudgeScore:
    """Parse the judge's JSON reply (0-10 scores) into a :class:`JudgeScore` in [0, 1].

    Raises:
        ValueError: the reply is not a JSON object with the three scores in range.
    """
    text = reply.strip()
    fenced = _FENCE.match(text)  # some servers wrap JSON in a code fence despite json mode
    if fenced:
        text = fenced.group(1)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"judge reply is not JSON: {reply!r}") from exc
    if not isinstance(obj, dict):
        raise ValueError(f"judge reply is not a JSON object: {reply!r}")
    scores = {}
    for key in ("completeness", "accuracy", "novelty"):
        value = obj.get(key)
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        # bool is an int subclass; a true/false score means the model misread the format
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"judge reply has no numeric {key!r}: {reply!r}")
        if not 0.0 <= float(value) <= 10.0:
            raise ValueError(f"judge score {key}={value} is outside 0-10: {reply!r}")
        scores[key] = float(value) / 10.0
    rationale = obj.get("rationale", "")
    return JudgeScore(rationale=rationale if isinstance(rationale, str) else json.dumps(rationale), **scores)


class OpenAIChatJudge:
    """The ``Judge`` plugin ``openai_chat``: an LLM grades a critique against a reference."""

    def __init__(
        self,
        model: str = "gpt-4o-mini",
        base_url: str = DEFAULT_BASE_URL,
        api_key: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        timeout: float = 60.0,
        max_retries: int = 3,
        temperature: float = 0.0,
        system_prompt: str = JUDGE_SYSTEM,
    ) -> None:
        self.client = OpenAIChatClient(model, base_url, api_key, api_key_env, timeout, max_retries)
        self.temperature = temperature
        self.system_prompt = system_prompt

    def messages(self, critique: str, reference: str, context: str) -> list[dict]:
        parts = [f"Song facts: {context}"] if context else []
        parts += [f"Reference critique:\n{reference}", f"Critique to grade:\n{critique}"]
        return [
            {"role": "system", "content": self.system_prompt},
            {"role": "user", "content": "\n\n".join(parts)},
        ]

    def score(self, critique: str, reference: str, context: str) -> JudgeScore:
        reply = self.client.complete(
            self.messages(critique, reference, context),
            temperature=self.temperature,
            response_format={"type": "json_object"},
        )
        return parse_judge_reply(reply)

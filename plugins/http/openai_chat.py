"""Annotator and judge plugins for any OpenAI-compatible chat-completions endpoint.

Requests go through the maintained ``openai`` client (hosted OpenAI, vLLM, or any server that
speaks ``POST <base_url>/chat/completions``), which retries 408/409/429/5xx replies, timeouts
and dropped connections with exponential backoff and honours a server's ``Retry-After``.
Keys come only from the environment (``api_key_env``, default ``OPENAI_API_KEY``).
"""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
import soundfile as sf
import soxr

from plugins.http.base import LazyClient
from plugins.http.critique_prompt import ANNOTATOR_SYSTEM, user_text
from plugins.http.keys import key_from_env
from vcritic.evaluate.oeq import RubricScoring
from vcritic.registry import require

require("openai")

DEFAULT_BASE_URL = "https://api.openai.com/v1"
NO_KEY = "EMPTY"  # what the client sends to a server that needs no key (vLLM's convention)

class ChatCompletionError(RuntimeError):
    """The endpoint failed (after the client's retries), or answered with no chat completion."""


class OpenAIChatClient(LazyClient):
    """One model behind an OpenAI-compatible endpoint, via the ``openai`` client.

    ``base_url`` includes the API version ("https://host/v1"). The key is read from
    ``$api_key_env`` when the client is made (None: a server that needs no key). ``max_retries``
    is the client's own retry budget for 408/409/429/5xx, timeouts and connection errors.
    The underlying client is created lazily and never pickled (each process opens its own).

    Raises:
        plugins.http.keys.MissingAPIKeyError: ``$api_key_env`` is unset (the message names it).
    """

    def __init__(
        self,
        model: str,
        base_url: str = DEFAULT_BASE_URL,
        api_key_env: str | None = "OPENAI_API_KEY",
        timeout: float = 120.0,
        max_retries: int = 3,
    ) -> None:
        if not model or not isinstance(model, str):
            raise ValueError("model must be a non-empty model name")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.model = model
        self.base_url = base_url.rstrip("/")
        self.api_key_env = api_key_env
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        key_from_env(api_key_env, self.url, "openai_chat")  # fail now, not at the first request
        self._client: Any = None

    @property
    def url(self) -> str:
        return f"{self.base_url}/chat/completions"

    def _new_client(self) -> Any:
        import openai

        key = key_from_env(self.api_key_env, self.url, "openai_chat") or NO_KEY
        return openai.OpenAI(api_key=key, base_url=self.base_url, timeout=self.timeout, max_retries=self.max_retries)

    def complete(self, messages: list[dict[str, Any]], **params: Any) -> str:
        """Send ``messages`` (plus ``params`` such as temperature) and return the reply text.

        Raises:
            ChatCompletionError: naming the endpoint, after the client's retries: an HTTP error
                (with the server's message), a timeout, no connection, or a reply that is not a
                chat completion with text.
        """
        import openai

        tries = f"{self.max_retries + 1} attempt(s)"
        try:
            completion = self.client().chat.completions.create(model=self.model, messages=messages, **params)
        except openai.APIStatusError as exc:
            hint = f" (is {self.api_key_env} the right key?)" if exc.status_code in (401, 403) and self.api_key_env else ""
            raise ChatCompletionError(
                f"POST {self.url} returned HTTP {exc.status_code} after {tries}{hint}: {_excerpt(exc)}"
            ) from exc
        except openai.APITimeoutError as exc:
            raise ChatCompletionError(f"POST {self.url} timed out ({self.timeout:g} s) on each of {tries}") from exc
        except openai.APIConnectionError as exc:
            raise ChatCompletionError(f"POST {self.url} failed after {tries}: {type(exc).__name__}: {exc}") from exc
        except (openai.APIResponseValidationError, ValueError) as exc:  # a 200 whose body is not JSON
            raise ChatCompletionError(f"POST {self.url} returned a malformed chat completion: {exc}") from exc
        return _reply_text(completion, self.url)


def _excerpt(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict) and isinstance(body.get("error"), dict) and body["error"].get("message"):
        return str(body["error"]["message"])[:500]
    response = getattr(exc, "response", None)
    return (response.text if response is not None else str(exc))[:500]


def _reply_text(completion: Any, url: str) -> str:
    """The text of the first choice, or a ChatCompletionError saying what the reply lacks."""
    choices = getattr(completion, "choices", None)
    if not choices:
        shown = completion.model_dump_json(exclude_none=True) if hasattr(completion, "model_dump_json") else completion
        raise ChatCompletionError(f"POST {url} returned a malformed chat completion (no choices): {str(shown)[:500]}")
    message = getattr(choices[0], "message", None)
    content = getattr(message, "content", None)
    if not isinstance(content, str) or not content.strip():
        refusal = getattr(message, "refusal", None)
        why = f"the model refused: {refusal}" if refusal else "no text content in the reply"
        raise ChatCompletionError(f"POST {url}: {why} (finish_reason={getattr(choices[0], 'finish_reason', None)})")
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
    """The ``Annotator`` plugin ``openai_chat``: an audio-capable chat model writes critiques.

    The clip goes up as an ``input_audio`` part (16-bit WAV at ``upload_rate``) after the text
    of :func:`plugins.http.critique_prompt.user_text`; the endpoint must accept audio input
    (hosted audio models, or vLLM serving an audio-language model). ``extra_body`` is merged into
    each request (e.g. ``{"top_k": 20}`` for vLLM). ``max_tokens`` leaves room for 500 words.
    """

    def __init__(
        self,
        model: str = "gpt-4o-audio-preview",
        base_url: str = DEFAULT_BASE_URL,
        api_key_env: str | None = "OPENAI_API_KEY",
        timeout: float = 120.0,
        max_retries: int = 3,
        temperature: float = 0.7,
        max_tokens: int = 1200,
        upload_rate: int = 16000,
        system_prompt: str = ANNOTATOR_SYSTEM,
        extra_body: dict[str, Any] | None = None,
    ) -> None:
        self.client = OpenAIChatClient(model, base_url, api_key_env, timeout, max_retries)
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.upload_rate = upload_rate
        self.system_prompt = system_prompt
        self.extra_body = dict(extra_body or {})

    def request_identity(self, context: str, persona: str) -> dict[str, Any]:
        """Everything besides the audio that shapes the reply: the annotate stage's cache key."""
        return {"api": "openai_chat", "base_url": self.client.base_url, "model": self.client.model,
                "system": self.system_prompt, "user": user_text(context, persona), "temperature": self.temperature,
                "max_tokens": self.max_tokens, "upload_rate": self.upload_rate, "extra_body": self.extra_body}

    def messages(self, samples: np.ndarray, sample_rate: int, context: str, persona: str) -> list[dict]:
        audio = {"data": wav_base64(samples, sample_rate, self.upload_rate), "format": "wav"}
        return [
            {"role": "system", "content": self.system_prompt},
            {
                "role": "user",
                "content": [{"type": "text", "text": user_text(context, persona)},
                            {"type": "input_audio", "input_audio": audio}],
            },
        ]

    def annotate(self, samples: np.ndarray, sample_rate: int, context: str, persona: str) -> str:
        params: dict[str, Any] = {"temperature": self.temperature, "max_tokens": self.max_tokens}
        if self.extra_body:
            params["extra_body"] = self.extra_body
        return self.client.complete(self.messages(samples, sample_rate, context, persona), **params)


class OpenAIChatJudge(RubricScoring):
    """The ``Judge`` plugin ``openai_chat``: a chat model behind an OpenAI-compatible endpoint
    answers the OEQ rubric prompts (:mod:`vcritic.evaluate.oeq` writes them and reads the scores).

    ``extra_body`` is merged into each request (e.g. ``{"top_k": 1}`` for vLLM).
    """

    def __init__(
        self,
        model: str = "gpt-4o-mini",
        base_url: str = DEFAULT_BASE_URL,
        api_key_env: str | None = "OPENAI_API_KEY",
        timeout: float = 60.0,
        max_retries: int = 3,
        temperature: float = 0.0,
        max_tokens: int | None = 1024,
        extra_body: dict[str, Any] | None = None,
    ) -> None:
        self.client = OpenAIChatClient(model, base_url, api_key_env, timeout, max_retries)
        self.model = model
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.extra_body = dict(extra_body or {})

    def complete(self, messages: list[dict[str, str]]) -> str:
        params: dict[str, Any] = {"temperature": self.temperature}
        if self.max_tokens is not None:
            params["max_tokens"] = self.max_tokens
        if self.extra_body:
            params["extra_body"] = self.extra_body
        return self.client.complete(messages, **params)

"""Gemini plugins: the ``Judge`` ``gemini`` (answers the OEQ rubric prompts) and the ``Annotator``
``gemini`` (listens to a clip and writes a persona's critique).

Requests go through the maintained ``google-genai`` client (``POST
<base_url>/<api_version>/models/<model>:generateContent``), pointed at ``base_url`` (default
Google's endpoint; a proxy or a compatible server otherwise). google-genai's own retries
(``HttpRetryOptions``) ignore a ``Retry-After`` header, so its retries are switched off and
tenacity (the library google-genai itself retries with) retries here instead: 408/429/5xx
replies, timeouts and dropped connections, waiting what the server's ``Retry-After`` asks (up
to ``max_retry_after`` seconds) or else an exponential backoff with jitter between
``initial_delay`` and ``max_delay``. The key comes only from the environment (``api_key_env``,
default ``GEMINI_API_KEY``).
"""

from __future__ import annotations

import email.utils
import importlib
import time
from typing import Any

import numpy as np
import tenacity

from plugins.http.base import LazyClient
from plugins.http.critique_prompt import ANNOTATOR_SYSTEM, user_text
from plugins.http.keys import key_from_env
from vcritic.evaluate.oeq import RubricScoring
from vcritic.registry import require

require("google.genai")

DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com"
RETRY_STATUSES = (408, 429, 500, 502, 503, 504)
_ROLES = {"user": "user", "assistant": "model", "model": "model"}


class GeminiError(RuntimeError):
    """The endpoint failed (after the client's retries), or answered with no text."""


def _transient_errors() -> tuple[type[BaseException], ...]:
    """Timeout and connection errors of whichever httpx flavour google-genai runs on."""
    found: list[type[BaseException]] = []
    for module in ("httpx", "httpx2"):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        found += [getattr(mod, n) for n in ("TimeoutException", "TransportError") if hasattr(mod, n)]
    return tuple(found)


def retry_after_seconds(exc: BaseException) -> float | None:
    """The wait a failed reply's ``Retry-After`` header asks for (seconds or an HTTP date), if any."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    value = headers.get("retry-after") if headers is not None else None
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class GeminiEndpoint(LazyClient):
    """One Gemini model behind ``base_url``: the client, the retries and the error messages that
    the judge and the annotator share.

    Args:
        model: the Gemini model id (e.g. ``gemini-2.5-flash``).
        base_url: the endpoint without the API version (None: Google's).
        api_key_env: the environment variable holding the key (sent as ``x-goog-api-key``); None
            for a server that needs none.
        api_version: the URL's version segment.
        timeout: seconds per attempt.
        max_retries: retries after the first attempt.
        initial_delay, max_delay: the backoff's first and longest wait, in seconds, when the
            server sends no ``Retry-After``.
        max_retry_after: the longest ``Retry-After`` wait honoured (a longer one is cut to this).

    Raises:
        plugins.http.keys.MissingAPIKeyError: ``$api_key_env`` is unset (the message names it).
    """

    def __init__(self, model: str, base_url: str | None, api_key_env: str | None, api_version: str,
                 timeout: float, max_retries: int, initial_delay: float, max_delay: float,
                 max_retry_after: float) -> None:
        if not model or not isinstance(model, str):
            raise ValueError("model must be a non-empty Gemini model id")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.model = model
        self.base_url = (base_url or DEFAULT_BASE_URL).rstrip("/")
        self.api_key_env = api_key_env
        self.api_version = api_version
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.initial_delay = float(initial_delay)
        self.max_delay = float(max_delay)
        self.max_retry_after = float(max_retry_after)
        key_from_env(api_key_env, self.url, "gemini")  # fail now, not at the first request

    @property
    def url(self) -> str:
        return f"{self.base_url}/{self.api_version}/models/{self.model}:generateContent"

    def _new_client(self) -> Any:
        from google import genai
        from google.genai import types

        # attempts=1: google-genai must not retry by itself (it would ignore Retry-After); see _retrying.
        options = types.HttpOptions(base_url=self.base_url, api_version=self.api_version,
                                    timeout=int(self.timeout * 1000),
                                    retry_options=types.HttpRetryOptions(attempts=1))
        key = key_from_env(self.api_key_env, self.url, "gemini") or "EMPTY"  # None: a keyless server
        return genai.Client(api_key=key, http_options=options)

    def _retryable(self, exc: BaseException) -> bool:
        from google.genai import errors

        return (isinstance(exc, errors.APIError) and exc.code in RETRY_STATUSES) or \
            isinstance(exc, _transient_errors())

    def _wait(self, state: tenacity.RetryCallState) -> float:
        """The server's ``Retry-After`` when it sent one, else exponential backoff with jitter."""
        asked = retry_after_seconds(state.outcome.exception()) if state.outcome is not None else None
        if asked is not None:
            return min(asked, self.max_retry_after)
        return tenacity.wait_exponential_jitter(initial=self.initial_delay, max=self.max_delay)(state)

    def _retrying(self) -> tenacity.Retrying:
        return tenacity.Retrying(stop=tenacity.stop_after_attempt(self.max_retries + 1),
                                 retry=tenacity.retry_if_exception(self._retryable), wait=self._wait, reraise=True)

    def generate(self, contents: list[Any], config: Any) -> str:
        """The reply text of one ``generateContent`` call, after the retries.

        Raises:
            GeminiError: naming the endpoint, after the retries: an HTTP error (with the server's
                message), a timeout or lost connection, a body that is not JSON, or a reply with
                no text (blocked, empty).
        """
        from google.genai import errors

        tries = f"{self.max_retries + 1} attempt(s)"
        try:
            response = self._retrying()(self.client().models.generate_content,
                                        model=self.model, contents=contents, config=config)
        except errors.APIError as exc:
            hint = f" (is {self.api_key_env} the right key?)" if exc.code in (401, 403) and self.api_key_env else ""
            raise GeminiError(f"POST {self.url} returned HTTP {exc.code} {exc.status or ''} after {tries}{hint}: "
                              f"{(exc.message or str(exc.details))[:500]}") from exc
        except _transient_errors() as exc:
            raise GeminiError(f"POST {self.url} failed on each of {tries} (timeout {self.timeout:g} s): "
                              f"{type(exc).__name__}: {exc}") from exc
        except ValueError as exc:  # a 200 whose body is not JSON
            raise GeminiError(f"POST {self.url} returned a malformed reply: {str(exc)[:500]}") from exc
        text = response.text
        if not isinstance(text, str) or not text.strip():
            raise GeminiError(f"POST {self.url}: no text in the reply ({_why_empty(response)})")
        return text.strip()


class GeminiJudge(GeminiEndpoint, RubricScoring):
    """A Gemini model as an OEQ judge (arguments as :class:`GeminiEndpoint`, plus the generation
    settings ``temperature`` and ``max_output_tokens``)."""

    def __init__(
        self,
        model: str = "gemini-2.5-flash",
        base_url: str | None = None,
        api_key_env: str | None = "GEMINI_API_KEY",
        api_version: str = "v1beta",
        timeout: float = 60.0,
        max_retries: int = 3,
        initial_delay: float = 1.0,
        max_delay: float = 30.0,
        temperature: float = 0.0,
        max_output_tokens: int | None = 1024,
        max_retry_after: float = 120.0,
    ) -> None:
        super().__init__(model, base_url, api_key_env, api_version, timeout, max_retries, initial_delay, max_delay,
                         max_retry_after)
        self.temperature = temperature
        self.max_output_tokens = max_output_tokens

    def request(self, messages: list[dict[str, str]]) -> tuple[list[Any], Any]:
        """OpenAI-style messages → Gemini ``contents`` and a config with the system instruction."""
        from google.genai import types

        system = "\n\n".join(m["content"] for m in messages if m.get("role") == "system")
        contents = []
        for m in messages:
            if m.get("role") == "system":
                continue
            role = _ROLES.get(str(m.get("role")))
            if role is None:
                raise ValueError(f"gemini: unsupported message role {m.get('role')!r} (system, user, assistant)")
            contents.append(types.Content(role=role, parts=[types.Part(text=str(m["content"]))]))
        config = types.GenerateContentConfig(system_instruction=system or None, temperature=self.temperature,
                                             max_output_tokens=self.max_output_tokens)
        return contents, config

    def complete(self, messages: list[dict[str, str]]) -> str:
        """The model's reply text (see :meth:`GeminiEndpoint.generate` for the errors)."""
        return self.generate(*self.request(messages))


class GeminiAnnotator(GeminiEndpoint):
    """The ``Annotator`` plugin ``gemini``: a Gemini model listens to the clip and writes the
    persona's critique.

    The clip goes inline (a 16-bit WAV at ``upload_rate``, ``audio/wav``) after the text of
    :func:`plugins.http.critique_prompt.user_text`; the system instruction is ``system_prompt``.
    Other arguments as :class:`GeminiEndpoint`; ``max_output_tokens`` leaves room for 500 words.
    """

    def __init__(
        self,
        model: str = "gemini-2.5-flash",
        base_url: str | None = None,
        api_key_env: str | None = "GEMINI_API_KEY",
        api_version: str = "v1beta",
        timeout: float = 120.0,
        max_retries: int = 3,
        initial_delay: float = 1.0,
        max_delay: float = 30.0,
        temperature: float = 0.7,
        max_output_tokens: int | None = 1500,
        upload_rate: int = 16000,
        system_prompt: str = ANNOTATOR_SYSTEM,
        max_retry_after: float = 120.0,
    ) -> None:
        super().__init__(model, base_url, api_key_env, api_version, timeout, max_retries, initial_delay, max_delay,
                         max_retry_after)
        self.temperature = temperature
        self.max_output_tokens = max_output_tokens
        self.upload_rate = int(upload_rate)
        self.system_prompt = system_prompt

    def request_identity(self, context: str, persona: str) -> dict[str, Any]:
        """Everything besides the audio that shapes the reply: the annotate stage's cache key."""
        return {"api": "gemini", "base_url": self.base_url, "api_version": self.api_version, "model": self.model,
                "system": self.system_prompt, "user": user_text(context, persona), "temperature": self.temperature,
                "max_output_tokens": self.max_output_tokens, "upload_rate": self.upload_rate}

    def request(self, samples: np.ndarray, sample_rate: int, context: str, persona: str) -> tuple[list[Any], Any]:
        """The ``contents`` (text, then the inline audio) and the config of one annotation."""
        import base64

        from google.genai import types

        from plugins.http.openai_chat import wav_base64

        wav = base64.b64decode(wav_base64(samples, sample_rate, self.upload_rate))
        parts = [types.Part(text=user_text(context, persona)), types.Part.from_bytes(data=wav, mime_type="audio/wav")]
        config = types.GenerateContentConfig(system_instruction=self.system_prompt, temperature=self.temperature,
                                             max_output_tokens=self.max_output_tokens)
        return [types.Content(role="user", parts=parts)], config

    def annotate(self, samples: np.ndarray, sample_rate: int, context: str, persona: str) -> str:
        return self.generate(*self.request(samples, sample_rate, context, persona))


def _why_empty(response: Any) -> str:
    feedback = getattr(response, "prompt_feedback", None)
    if feedback is not None and getattr(feedback, "block_reason", None):
        return f"prompt blocked: {feedback.block_reason}"
    candidates = getattr(response, "candidates", None) or []
    if not candidates:
        return "no candidates"
    return f"finish_reason={getattr(candidates[0], 'finish_reason', None)}"

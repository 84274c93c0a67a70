"""The ``Judge`` plugin ``gemini``: a Gemini model answers the OEQ rubric prompts.

Requests go through the maintained ``google-genai`` client (``POST
<base_url>/<api_version>/models/<model>:generateContent``), pointed at ``base_url`` (default
Google's endpoint; a proxy or a compatible server otherwise). The client's own retry settings
(``HttpRetryOptions``, built on tenacity) retry 408/429/5xx replies, timeouts and dropped
connections with exponential backoff and jitter; note that google-genai does not read a
``Retry-After`` header, so ``initial_delay``/``max_delay`` set the pace. The key comes only from
the environment (``api_key_env``, default ``GEMINI_API_KEY``).
"""

from __future__ import annotations

import importlib
import threading
from typing import Any

from plugins.http.keys import key_from_env
from vcritic.evaluate.oeq import RubricScoring
from vcritic.registry import require

require("google.genai")

DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com"
RETRY_STATUSES = (408, 429, 500, 502, 503, 504)
_ROLES = {"user": "user", "assistant": "model", "model": "model"}
# One client per judge even when OEQ asks from several threads: a second, discarded client
# would close its connections under the thread still using it.
_CLIENT_LOCK = threading.Lock()


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


class GeminiJudge(RubricScoring):
    """A Gemini model as an OEQ judge.

    Args:
        model: the Gemini model id (e.g. ``gemini-2.5-flash``).
        base_url: the endpoint without the API version (None: Google's).
        api_key_env: the environment variable holding the key (sent as ``x-goog-api-key``); None
            for a server that needs none.
        api_version: the URL's version segment.
        timeout: seconds per attempt.
        max_retries: retries after the first attempt.
        initial_delay, max_delay: the backoff's first and longest wait, in seconds.
        temperature, max_output_tokens: generation settings.

    Raises:
        plugins.http.keys.MissingAPIKeyError: ``$api_key_env`` is unset (the message names it).
    """

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
    ) -> None:
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
        self.temperature = temperature
        self.max_output_tokens = max_output_tokens
        key_from_env(api_key_env, self.url, "gemini")  # fail now, not at the first request
        self._client: Any = None

    @property
    def url(self) -> str:
        return f"{self.base_url}/{self.api_version}/models/{self.model}:generateContent"

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_client"] = None  # the HTTP client does not pickle
        return state

    def client(self) -> Any:
        with _CLIENT_LOCK:
            if self._client is None:
                self._client = self._new_client()
            return self._client

    def _new_client(self) -> Any:
        from google import genai
        from google.genai import types

        retry = types.HttpRetryOptions(
            attempts=self.max_retries + 1, initial_delay=self.initial_delay, max_delay=self.max_delay,
            http_status_codes=list(RETRY_STATUSES),
        )
        options = types.HttpOptions(base_url=self.base_url, api_version=self.api_version,
                                    timeout=int(self.timeout * 1000), retry_options=retry)
        key = key_from_env(self.api_key_env, self.url, "gemini") or "EMPTY"  # None: a keyless server
        return genai.Client(api_key=key, http_options=options)

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
        """The model's reply text.

        Raises:
            GeminiError: naming the endpoint, after the client's retries: an HTTP error (with the
                server's message), a timeout or lost connection, a body that is not JSON, or a
                reply with no text (blocked, empty).
        """
        from google.genai import errors

        contents, config = self.request(messages)
        tries = f"{self.max_retries + 1} attempt(s)"
        try:
            response = self.client().models.generate_content(model=self.model, contents=contents, config=config)
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


def _why_empty(response: Any) -> str:
    feedback = getattr(response, "prompt_feedback", None)
    if feedback is not None and getattr(feedback, "block_reason", None):
        return f"prompt blocked: {feedback.block_reason}"
    candidates = getattr(response, "candidates", None) or []
    if not candidates:
        return "no candidates"
    return f"finish_reason={getattr(candidates[0], 'finish_reason', None)}"

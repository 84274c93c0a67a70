"""A chat-model server on loopback that speaks the real wire formats, for testing judge plugins.

It answers ``POST /v1/chat/completions`` as an OpenAI-compatible server does and ``POST
/<version>/models/<model>:generateContent`` as the Gemini API does, so the maintained clients
(``openai``, ``google-genai``) run unmodified against it. Replies are scripted: queue
:class:`Reply` objects (HTTP errors with ``Retry-After``, garbage bodies, slow replies that outlive
a client's timeout), and when the queue is empty a ``responder`` writes the reply text (by default
:func:`rubric_responder`, which grades OEQ rubric prompts). Every request is recorded, and
:func:`prompt_text` / :func:`audio_parts` read back what an annotator sent (text and audio).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Responder = Callable[[str, dict[str, Any]], "str | Reply"]
"""Writes the reply to a request that finds the queue empty: its text, or a whole :class:`Reply`
(so a test can fail chosen requests, whatever order concurrent clients send them in)."""


@dataclass
class Reply:
    """One scripted reply. ``text``: a normal reply with this text, in the request's wire format;
    ``body``: sent verbatim (bytes) or as JSON (anything else); ``delay``: seconds to wait first."""

    status: int = 200
    text: str | None = None
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


@dataclass
class Request:
    path: str
    headers: dict[str, str]  # lower-case names
    body: Any  # parsed JSON (None if the body was not JSON)
    at: float  # time.monotonic() on arrival


def openai_completion(text: str | None, model: str = "test-model") -> dict[str, Any]:
    """A chat-completions response body whose one choice says ``text``."""
    return {
        "id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


def gemini_response(text: str, model: str = "test-model") -> dict[str, Any]:
    """A generateContent response body whose one candidate says ``text``."""
    return {
        "candidates": [{"content": {"parts": [{"text": text}], "role": "model"}, "finishReason": "STOP", "index": 0}],
        "usageMetadata": {"promptTokenCount": 1, "candidatesTokenCount": 1, "totalTokenCount": 2},
        "modelVersion": model,
    }


def error_body(path: str, status: int, message: str) -> dict[str, Any]:
    """An error body in the format of the API that ``path`` belongs to."""
    if path.endswith(":generateContent"):
        names = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
                 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE"}
        return {"error": {"code": status, "message": message, "status": names.get(status, "UNKNOWN")}}
    return {"error": {"message": message, "type": "server_error" if status >= 500 else "invalid_request_error",
                      "code": None}}


def prompt_text(path: str, body: dict[str, Any]) -> tuple[str, str]:
    """``(system, user)`` text of a request in either wire format (audio parts left out)."""
    if path.endswith(":generateContent"):
        system = " ".join(p.get("text", "") for p in (body.get("systemInstruction") or {}).get("parts", []))
        user = " ".join(p.get("text", "") for c in body.get("contents", []) for p in c.get("parts", []))
        return system, user
    def text(content: Any) -> str:
        if isinstance(content, list):  # parts: keep the text ones
            return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text")
        return str(content)

    messages = body.get("messages", [])
    system = " ".join(text(m.get("content")) for m in messages if m.get("role") == "system")
    user = " ".join(text(m.get("content")) for m in messages if m.get("role") != "system")
    return system, user


def audio_parts(path: str, body: dict[str, Any]) -> list[tuple[str, bytes]]:
    """``(format, bytes)`` of each audio part of a request: OpenAI ``input_audio`` parts (format
    "wav", "mp3"...) or Gemini ``inlineData`` parts (their MIME type), decoded from base64."""
    import base64

    found: list[tuple[str, bytes]] = []
    if path.endswith(":generateContent"):
        for content in body.get("contents", []):
            for part in content.get("parts", []):
                inline = part.get("inlineData") or part.get("inline_data")
                if inline:
                    # google-genai sends URL-safe base64; accept the standard alphabet too
                    data = str(inline["data"]).replace("+", "-").replace("/", "_")
                    found.append((str(inline.get("mimeType") or inline.get("mime_type")),
                                  base64.urlsafe_b64decode(data + "=" * (-len(data) % 4))))
        return found
    for message in body.get("messages", []):
        content = message.get("content")
        for part in content if isinstance(content, list) else []:
            if isinstance(part, dict) and part.get("type") == "input_audio":
                found.append((str(part["input_audio"].get("format")), base64.b64decode(part["input_audio"]["data"])))
    return found


def rubric_responder(path: str, body: dict[str, Any]) -> str:
    """Grades OEQ rubric prompts by a visible rule, so example runs give varied, checkable scores:
    completeness counts which of a few topic words the critique uses, accuracy checks the stated
    facts against the reference, novelty rewards length."""
    from vcritic.evaluate.oeq import RUBRICS

    system, user = prompt_text(path, body)
    critique = user.rsplit("Critique to grade:", 1)[-1].lower()
    reference = user.split("Reference record of the song (expert):", 1)[-1].split("Critique to grade:", 1)[0].lower()
    if system == RUBRICS["completeness"].system_prompt:
        topics = ["melody", "key", "tempo", "vibrato", "breath", "lyrics", "chorus", "persona"]
        hits = [t for t in topics if t in critique]
        points = min(16, 2 * len(hits))
        return f"Topics covered: {', '.join(hits) or 'none'}.\nScore: {points}/16"
    if system == RUBRICS["accuracy"].system_prompt:
        facts = [w for w in ("major", "minor", "waltz", "ballad", "folk", "bpm") if w in critique]
        correct = [w for w in facts if w in reference]
        lines = [f"- {w}: {'correct' if w in correct else 'incorrect'}" for w in facts]
        pct = 100.0 * len(correct) / len(facts) if facts else 0.0
        return "\n".join([*lines, f"Correct facts: {len(correct)} of {len(facts)}", f"Accuracy: {pct:.0f}%"])
    if system == RUBRICS["novelty"].system_prompt:
        points = min(10, len(critique.split()) // 4)
        return f"新颖性：{min(4, points)}/4\n总分：{points}/10"
    return "ok"


class ChatServer:
    """The server; use as a context manager or call :meth:`close`."""

    def __init__(self, responder: Responder = rubric_responder) -> None:
        self.replies: list[Reply] = []
        self.requests: list[Request] = []
        self.responder = responder
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = None
                with outer._lock:
                    outer.requests.append(Request(self.path, {k.lower(): v for k, v in self.headers.items()},
                                                  body, time.monotonic()))
                    reply = outer.replies.pop(0) if outer.replies else None
                if reply is None:
                    answer = outer.responder(self.path, body or {})
                    reply = answer if isinstance(answer, Reply) else Reply(text=answer)
                if reply.delay:
                    time.sleep(reply.delay)
                self._send(reply)

            def _send(self, reply: Reply) -> None:
                if reply.body is not None:
                    payload = reply.body if isinstance(reply.body, bytes) else json.dumps(reply.body).encode()
                elif reply.status != 200:
                    payload = json.dumps(error_body(self.path, reply.status, reply.text or "error")).encode()
                elif self.path.endswith(":generateContent"):
                    payload = json.dumps(gemini_response(reply.text or "")).encode()
                else:
                    payload = json.dumps(openai_completion(reply.text)).encode()
                try:
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timed out) before a slow reply was sent

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.openai_base_url = f"{self.base_url}/v1"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def queue(self, *replies: Reply) -> None:
        with self._lock:
            self.replies.extend(replies)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> ChatServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

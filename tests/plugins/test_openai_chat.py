import base64
import io
import json
import pickle
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import soundfile as sf

from plugins.http.openai_chat import (
    ChatCompletionError,
    OpenAIChatAnnotator,
    OpenAIChatJudge,
    parse_judge_reply,
)
from vcritic.protocols import Annotator, Judge
from vcritic.testing import sine


def completion(content):
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": 0,
        "model": "test-model",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


class FakeServer:
    """A local chat-completions endpoint that replays queued (status, body) replies."""

    def __init__(self):
        self.replies = []
        self.requests = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                outer.requests.append((self.path, dict(self.headers), self.rfile.read(length)))
                status, body = outer.replies.pop(0) if outer.replies else (200, completion("ok"))
                raw = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = FakeServer()
    yield s
    s.close()


def test_annotator_request_shape(server, monkeypatch):
    monkeypatch.setenv("VCRITIC_TEST_KEY", "sk-test-123")
    server.replies.append((200, completion("  The chorus soars but the vibrato wobbles.  ")))
    annotator = OpenAIChatAnnotator(
        model="audio-model", base_url=server.base_url, api_key_env="VCRITIC_TEST_KEY"
    )
    assert isinstance(annotator, Annotator)
    clip = sine(440.0, 1.0, 22050, 0.3)
    text = annotator.annotate(clip, 22050, "pop ballad, female voice", "a strict vocal coach")
    assert text == "The chorus soars but the vibrato wobbles."

    ((path, headers, raw),) = server.requests
    assert path == "/v1/chat/completions"
    assert headers["Authorization"] == "Bearer sk-test-123"
    assert headers["Content-Type"] == "application/json"
    body = json.loads(raw)
    assert body["model"] == "audio-model" and body["max_tokens"] == 600
    system, user = body["messages"]
    assert system["role"] == "system" and "vocal technique" in system["content"]
    assert user["role"] == "user"
    text_part, audio_part = user["content"]
    assert text_part["type"] == "text"
    assert "a strict vocal coach" in text_part["text"] and "pop ballad, female voice" in text_part["text"]
    assert audio_part["type"] == "input_audio" and audio_part["input_audio"]["format"] == "wav"
    wav, sr = sf.read(io.BytesIO(base64.b64decode(audio_part["input_audio"]["data"])), dtype="float32")
    assert sr == 16000 and len(wav) == 16000  # resampled for upload
    assert abs(float(np.sqrt(np.mean(wav**2))) - 0.3 / np.sqrt(2)) < 0.01


def test_explicit_key_wins_and_no_key_sends_no_header(server, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    OpenAIChatJudge(base_url=server.base_url, api_key="explicit").client.complete([])
    OpenAIChatJudge(base_url=server.base_url).client.complete([])
    assert server.requests[0][1]["Authorization"] == "Bearer explicit"
    assert "Authorization" not in server.requests[1][1]


def test_retries_on_503_then_succeeds(server):
    server.replies += [(503, {"error": {"message": "overloaded"}}), (200, completion("fine"))]
    annotator = OpenAIChatAnnotator(base_url=server.base_url, api_key="k")
    assert annotator.annotate(sine(220, 0.2), 16000, "", "critic") == "fine"
    assert len(server.requests) == 2


def test_gives_up_after_max_retries(server):
    server.replies += [(429, {"error": {"message": "slow down"}})] * 2
    annotator = OpenAIChatAnnotator(base_url=server.base_url, api_key="k", max_retries=1)
    with pytest.raises(ChatCompletionError, match="HTTP 429.*slow down"):
        annotator.annotate(sine(220, 0.2), 16000, "", "critic")
    assert len(server.requests) == 2


def test_clear_error_on_400(server):
    server.replies.append((400, {"error": {"message": "input_audio is not supported by this model"}}))
    annotator = OpenAIChatAnnotator(base_url=server.base_url, api_key="k")
    with pytest.raises(ChatCompletionError) as info:
        annotator.annotate(sine(220, 0.2), 16000, "", "critic")
    msg = str(info.value)
    assert f"{server.base_url}/chat/completions" in msg and "HTTP 400" in msg and "not supported" in msg
    assert len(server.requests) == 1  # 4xx other than 429 is not retried


@pytest.mark.parametrize("body", [b"<html>gateway</html>", {"choices": []}, completion(None)])
def test_malformed_completion_raises(server, body):
    server.replies.append((200, body))
    with pytest.raises(ChatCompletionError, match="chat/completions"):
        OpenAIChatJudge(base_url=server.base_url, api_key="k").client.complete([])


def test_connection_error_names_url():
    judge = OpenAIChatJudge(base_url="http://127.0.0.1:9/v1", api_key="k", max_retries=0, timeout=2)
    with pytest.raises(ChatCompletionError, match=r"http://127.0.0.1:9/v1/chat/completions"):
        judge.score("a", "b", "c")


def test_judge_request_and_scaling(server):
    reply = {"completeness": 8, "accuracy": 5, "novelty": 10, "rationale": "Covers the pitch issue."}
    server.replies.append((200, completion(json.dumps(reply))))
    judge = OpenAIChatJudge(model="judge-model", base_url=server.base_url, api_key="k")
    assert isinstance(judge, Judge)
    score = judge.score("the critique", "the reference", "tempo 90 bpm")
    assert (score.completeness, score.accuracy, score.novelty) == (0.8, 0.5, 1.0)
    assert score.rationale == "Covers the pitch issue."
    assert score.weighted() == pytest.approx(0.2 * 0.8 + 0.6 * 0.5 + 0.2 * 1.0)
    body = json.loads(server.requests[0][2])
    assert body["response_format"] == {"type": "json_object"} and body["temperature"] == 0.0
    user = body["messages"][1]["content"]
    assert "the critique" in user and "the reference" in user and "tempo 90 bpm" in user


def test_judge_unparsable_reply_raises_value_error(server):
    server.replies.append((200, completion("I think it deserves a 7.")))
    judge = OpenAIChatJudge(base_url=server.base_url, api_key="k")
    with pytest.raises(ValueError, match="deserves a 7"):
        judge.score("a", "b", "")


def test_parse_judge_reply_edge_cases():
    fenced = '```json\n{"completeness": "6", "accuracy": 7.5, "novelty": 0}\n```'
    s = parse_judge_reply(fenced)
    assert (s.completeness, s.accuracy, s.novelty, s.rationale) == (0.6, 0.75, 0.0, "")
    for bad in [
        '{"completeness": 11, "accuracy": 5, "novelty": 5}',
        '{"completeness": 5, "accuracy": 5}',
        '{"completeness": true, "accuracy": 5, "novelty": 5}',
        "[1, 2, 3]",
        "not json",
    ]:
        with pytest.raises(ValueError, match="judge"):
            parse_judge_reply(bad)


def test_plugins_pickle_without_a_live_session(server):
    judge = OpenAIChatJudge(base_url=server.base_url, api_key="k")
    judge.client.complete([])  # opens the session
    assert judge.client._session is not None
    clone = pickle.loads(pickle.dumps(judge))
    assert clone.client._session is None
    server.replies.append((200, completion('{"completeness": 1, "accuracy": 2, "novelty": 3}')))
    assert clone.score("a", "b", "").novelty == pytest.approx(0.3)
    annotator = pickle.loads(pickle.dumps(OpenAIChatAnnotator(base_url=server.base_url)))
    assert annotator.client.url == f"{server.base_url}/chat/completions"

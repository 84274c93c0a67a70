"""openai_chat annotator and judge against a loopback server speaking the chat-completions format."""

import base64
import io
import pickle

import numpy as np
import pytest
import soundfile as sf

from plugins.http.keys import MissingAPIKeyError
from plugins.http.openai_chat import ChatCompletionError, OpenAIChatAnnotator, OpenAIChatJudge
from vcritic import registry
from vcritic.evaluate.oeq import OeqItem, judge_oeq, rubric_messages
from vcritic.protocols import Annotator, Judge
from vcritic.testing import sine
from vcritic.testing.chat_server import ChatServer, Reply

KEY_ENV = "VCRITIC_TEST_OPENAI_KEY"


@pytest.fixture
def server():
    with ChatServer() as s:
        yield s


@pytest.fixture(autouse=True)
def key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-test-123")


def judge(server, **kw):
    return OpenAIChatJudge(model="judge-model", base_url=server.openai_base_url, api_key_env=KEY_ENV, **kw)


def test_annotator_request_shape(server):
    server.queue(Reply(text="  The chorus soars but the vibrato wobbles.  "))
    annotator = OpenAIChatAnnotator(model="audio-model", base_url=server.openai_base_url, api_key_env=KEY_ENV)
    assert isinstance(annotator, Annotator)
    clip = sine(440.0, 1.0, 22050, 0.3)
    text = annotator.annotate(clip, 22050, "pop ballad, female voice", "a strict vocal coach")
    assert text == "The chorus soars but the vibrato wobbles."

    (req,) = server.requests
    assert req.path == "/v1/chat/completions"
    assert req.headers["authorization"] == "Bearer sk-test-123"
    assert req.headers["content-type"] == "application/json"
    assert req.body["model"] == "audio-model" and req.body["max_tokens"] == 1200
    system, user = req.body["messages"]
    assert system["role"] == "system" and "300 and 500 words" in system["content"]
    assert all(topic in system["content"] for topic in ("melody", "breath", "genre", "listeners"))
    text_part, audio_part = user["content"]
    assert "a strict vocal coach" in text_part["text"] and "pop ballad, female voice" in text_part["text"]
    assert audio_part["type"] == "input_audio" and audio_part["input_audio"]["format"] == "wav"
    wav, sr = sf.read(io.BytesIO(base64.b64decode(audio_part["input_audio"]["data"])), dtype="float32")
    assert sr == 16000 and len(wav) == 16000  # resampled for upload
    assert abs(float(np.sqrt(np.mean(wav**2))) - 0.3 / np.sqrt(2)) < 0.01


def test_missing_key_names_the_variable(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(MissingAPIKeyError, match="OPENAI_API_KEY.*api_key_env"):
        OpenAIChatJudge()
    with pytest.raises(MissingAPIKeyError, match="MY_VLLM_KEY"):
        OpenAIChatAnnotator(api_key_env="MY_VLLM_KEY")


def test_a_server_without_keys_needs_no_variable(server, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    server.queue(Reply(text="fine"))
    assert OpenAIChatJudge(base_url=server.openai_base_url, api_key_env=None).complete([]) == "fine"
    assert server.requests[0].headers["authorization"] == "Bearer EMPTY"


def test_judge_request_carries_model_messages_and_settings(server):
    j = judge(server, temperature=0.0, max_tokens=256, extra_body={"top_k": 1})
    assert isinstance(j, Judge) and j.model == "judge-model"
    messages = rubric_messages("novelty", OeqItem("a", "the critique", "the reference", "tempo 90 bpm"))
    server.queue(Reply(text="Score: 7/10"))
    assert j.complete(messages) == "Score: 7/10"
    body = server.requests[0].body
    assert body["model"] == "judge-model" and body["messages"] == messages
    assert body["temperature"] == 0.0 and body["max_tokens"] == 256 and body["top_k"] == 1


def test_registry_builds_the_judge(server):
    j = registry.create("judges", "openai_chat", model="m", base_url=server.openai_base_url, api_key_env=KEY_ENV)
    assert isinstance(j, OpenAIChatJudge)


def test_429_with_retry_after_is_retried_after_the_wait(server):
    server.queue(Reply(429, "slow down", headers={"Retry-After": "0.3"}), Reply(text="Score: 5/10"))
    assert judge(server).complete([{"role": "user", "content": "hi"}]) == "Score: 5/10"
    first, second = server.requests
    assert second.at - first.at >= 0.3  # the client waited as long as the server asked


def test_500s_are_retried_then_succeed(server):
    server.queue(Reply(500, "boom"), Reply(503, "overloaded"), Reply(text="fine"))
    assert judge(server, max_retries=2).complete([]) == "fine"
    assert len(server.requests) == 3


def test_gives_up_after_max_retries_naming_the_endpoint(server):
    server.queue(*[Reply(429, "quota exceeded", headers={"Retry-After": "0.01"})] * 2)
    with pytest.raises(ChatCompletionError) as info:
        judge(server, max_retries=1).complete([])
    msg = str(info.value)
    assert f"{server.openai_base_url}/chat/completions" in msg and "HTTP 429" in msg and "quota exceeded" in msg
    assert "2 attempt(s)" in msg and len(server.requests) == 2


def test_timeout_is_retried_then_reported(server):
    server.queue(Reply(text="late", delay=1.5), Reply(text="on time"))
    assert judge(server, timeout=0.5, max_retries=1).complete([]) == "on time"
    server.queue(*[Reply(text="late", delay=1.5)] * 2)
    with pytest.raises(ChatCompletionError, match=r"chat/completions timed out \(0.5 s\) on each of 2 attempt"):
        judge(server, timeout=0.5, max_retries=1).complete([])


def test_client_errors_are_not_retried(server):
    server.queue(Reply(400, "input_audio is not supported by this model"))
    annotator = OpenAIChatAnnotator(base_url=server.openai_base_url, api_key_env=KEY_ENV)
    with pytest.raises(ChatCompletionError, match="HTTP 400.*not supported"):
        annotator.annotate(sine(220, 0.2), 16000, "", "critic")
    assert len(server.requests) == 1


def test_wrong_key_hints_at_the_variable(server):
    server.queue(Reply(401, "invalid api key"))
    with pytest.raises(ChatCompletionError, match=f"HTTP 401.*{KEY_ENV}"):
        judge(server).complete([])


@pytest.mark.parametrize(
    "reply, match",
    [
        (Reply(body=b"<html>bad gateway</html>"), "malformed chat completion"),
        (Reply(body={"id": "x", "object": "chat.completion"}), "no choices"),
        (Reply(body={"choices": []}), "no choices"),
        (Reply(text=None), "no text content"),
    ],
)
def test_garbage_replies_raise_naming_the_endpoint(server, reply, match):
    server.queue(reply)
    with pytest.raises(ChatCompletionError, match=match) as info:
        judge(server).complete([])
    assert "/v1/chat/completions" in str(info.value)


def test_reply_without_a_score_is_unparsed_not_zero(server, tmp_path):
    server.queue(Reply(text="I think it deserves a 7."), Reply(text="Accuracy: 50%"), Reply(text="Score: 4/10"))
    report = judge_oeq([OeqItem("a", "critique", "reference")], {"gpt": judge(server)}, concurrency=1)
    (row,) = report.rows
    assert row["completeness"] is None and row["unparsed"] == ["completeness"] and row["composite"] is None
    assert report.metrics["oeq_gpt_accuracy"] == 0.5 and "oeq_gpt_completeness" not in report.metrics
    assert report.metrics["oeq_gpt_unparsed"] == 1


def test_connection_refused_names_the_url():
    j = OpenAIChatJudge(base_url="http://127.0.0.1:9/v1", api_key_env=KEY_ENV, max_retries=0, timeout=2)
    with pytest.raises(ChatCompletionError, match=r"http://127.0.0.1:9/v1/chat/completions failed"):
        j.complete([])


def test_plugins_pickle_without_a_live_client(server):
    j = judge(server)
    j.complete([])  # opens the client
    assert j.client._client is not None
    clone = pickle.loads(pickle.dumps(j))
    assert clone.client._client is None
    server.queue(Reply(text="Score: 3/10"))
    assert clone.complete([]) == "Score: 3/10"
    annotator = pickle.loads(pickle.dumps(OpenAIChatAnnotator(base_url=server.openai_base_url, api_key_env=KEY_ENV)))
    assert annotator.client.url == f"{server.openai_base_url}/chat/completions"

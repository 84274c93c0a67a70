"""gemini judge (google-genai client) against a loopback server speaking the generateContent format."""

import pickle

import pytest

from plugins.http.gemini import GeminiError, GeminiJudge
from plugins.http.keys import MissingAPIKeyError
from vcritic.evaluate.oeq import OeqError, OeqItem, build_judges, judge_oeq, rubric_messages
from vcritic.protocols import Judge
from vcritic.testing.chat_server import ChatServer, Reply

KEY_ENV = "VCRITIC_TEST_GEMINI_KEY"


@pytest.fixture
def server():
    with ChatServer() as s:
        yield s


@pytest.fixture(autouse=True)
def key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "gk-test-456")


def judge(server, **kw):
    kw.setdefault("initial_delay", 0.05)
    kw.setdefault("max_delay", 0.2)
    return GeminiJudge(model="gemini-test", base_url=server.base_url, api_key_env=KEY_ENV, **kw)


def test_request_path_key_and_body(server):
    j = judge(server, temperature=0.0, max_output_tokens=128)
    assert isinstance(j, Judge) and j.model == "gemini-test"
    messages = rubric_messages("completeness", OeqItem("a", "the critique", "the reference", "folk", "a fan"))
    server.queue(Reply(text="Score: 12/16"))
    assert j.complete(messages) == "Score: 12/16"
    (req,) = server.requests
    assert req.path == "/v1beta/models/gemini-test:generateContent"
    assert req.headers["x-goog-api-key"] == "gk-test-456"
    assert req.body["systemInstruction"]["parts"] == [{"text": messages[0]["content"]}]
    assert req.body["contents"] == [{"role": "user", "parts": [{"text": messages[1]["content"]}]}]
    assert req.body["generationConfig"] == {"temperature": 0.0, "maxOutputTokens": 128}


def test_missing_key_names_the_variable(monkeypatch):
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    with pytest.raises(MissingAPIKeyError, match="GEMINI_API_KEY.*generativelanguage.googleapis.com"):
        GeminiJudge()
    with pytest.raises(OeqError, match=r"eval.judges\[0\] \('gem', plugin 'gemini'\).*OTHER_KEY"):
        build_judges([{"name": "gem", "plugin": "gemini", "params": {"api_key_env": "OTHER_KEY"}}])


def test_429_with_retry_after_and_500_are_retried(server):
    server.queue(Reply(429, "quota", headers={"Retry-After": "1"}), Reply(500, "internal"), Reply(text="Score: 6/10"))
    assert judge(server, max_retries=2).complete([{"role": "user", "content": "hi"}]) == "Score: 6/10"
    assert len(server.requests) == 3


def test_gives_up_after_max_retries_naming_the_endpoint(server):
    server.queue(*[Reply(503, "backend unavailable")] * 2)
    with pytest.raises(GeminiError) as info:
        judge(server, max_retries=1).complete([{"role": "user", "content": "hi"}])
    msg = str(info.value)
    assert f"{server.base_url}/v1beta/models/gemini-test:generateContent" in msg
    assert "HTTP 503" in msg and "backend unavailable" in msg and "2 attempt(s)" in msg
    assert len(server.requests) == 2


def test_client_errors_are_not_retried(server):
    server.queue(Reply(400, "bad request field"))
    with pytest.raises(GeminiError, match="HTTP 400.*bad request field"):
        judge(server).complete([{"role": "user", "content": "hi"}])
    assert len(server.requests) == 1


def test_timeout_is_retried_then_reported(server):
    server.queue(Reply(text="late", delay=2.5), Reply(text="on time"))
    assert judge(server, timeout=1, max_retries=1).complete([{"role": "user", "content": "hi"}]) == "on time"
    server.queue(*[Reply(text="late", delay=2.5)] * 2)
    with pytest.raises(GeminiError, match="generateContent failed on each of 2 attempt"):
        judge(server, timeout=1, max_retries=1).complete([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize(
    "reply, match",
    [
        (Reply(body=b"<html>bad gateway</html>"), "malformed reply"),
        (Reply(body={}), "no text in the reply \\(no candidates\\)"),
        (Reply(body={"candidates": [{"finishReason": "SAFETY", "index": 0}]}), "finish_reason=.*SAFETY"),
        (Reply(body={"promptFeedback": {"blockReason": "SAFETY"}}), "prompt blocked"),
    ],
)
def test_garbage_replies_raise_naming_the_endpoint(server, reply, match):
    server.queue(reply)
    with pytest.raises(GeminiError, match=match) as info:
        judge(server).complete([{"role": "user", "content": "hi"}])
    assert ":generateContent" in str(info.value)


def test_a_gemini_judge_grades_oeq_and_reruns_from_the_cache(server, tmp_path):
    items = [OeqItem("a", "The melody in the chorus is in E major.", "A folk song in E major.")]
    first = judge_oeq(items, {"gem": judge(server)}, cache_dir=str(tmp_path / "cache"))
    assert len(server.requests) == 3 and first.rows[0]["unparsed"] == []
    again = judge_oeq(items, {"gem": judge(server)}, cache_dir=str(tmp_path / "cache"))
    assert len(server.requests) == 3 and all(r["cached"] for r in again.raw_replies)
    assert again.rows == first.rows


def test_unsupported_role_is_refused(server):
    with pytest.raises(ValueError, match="unsupported message role 'tool'"):
        judge(server).complete([{"role": "tool", "content": "x"}])


def test_pickles_without_a_live_client(server):
    j = judge(server)
    j.complete([{"role": "user", "content": "hi"}])
    clone = pickle.loads(pickle.dumps(j))
    assert clone._client is None
    server.queue(Reply(text="Score: 2/10"))
    assert clone.complete([{"role": "user", "content": "hi"}]) == "Score: 2/10"


# ----------------------------------------------------------------------------- the annotator


def annotator(server, **kw):
    from plugins.http.gemini import GeminiAnnotator

    kw.setdefault("initial_delay", 0.05)
    kw.setdefault("max_delay", 0.2)
    return GeminiAnnotator(model="gemini-audio", base_url=server.base_url, api_key_env=KEY_ENV, **kw)


def test_annotator_sends_the_persona_the_song_and_the_audio_inline(server):
    import io

    import numpy as np
    import soundfile as sf

    from vcritic import registry
    from vcritic.protocols import Annotator
    from vcritic.testing import sine
    from vcritic.testing.chat_server import audio_parts

    a = registry.create("annotators", "gemini", model="gemini-audio", base_url=server.base_url, api_key_env=KEY_ENV)
    assert isinstance(a, Annotator)
    server.queue(Reply(text="  A warm folk melody, sung with steady breath.  "))
    text = a.annotate(sine(330.0, 1.5, 22050, 0.3), 22050, "title: Tune; genre: folk", "Style: blunt. Writes in English.")
    assert text == "A warm folk melody, sung with steady breath."
    (req,) = server.requests
    assert req.path == "/v1beta/models/gemini-audio:generateContent" and req.headers["x-goog-api-key"] == "gk-test-456"
    assert "300 and 500 words" in req.body["systemInstruction"]["parts"][0]["text"]
    text_part = req.body["contents"][0]["parts"][0]["text"]
    assert "Style: blunt. Writes in English." in text_part and "genre: folk" in text_part
    ((mime, wav),) = audio_parts(req.path, req.body)
    samples, rate = sf.read(io.BytesIO(wav), dtype="float32")
    assert mime == "audio/wav" and rate == 16000 and len(samples) == 24000  # resampled for upload
    assert abs(float(np.sqrt(np.mean(samples**2))) - 0.3 / np.sqrt(2)) < 0.01
    assert req.body["generationConfig"]["maxOutputTokens"] == 1500


def test_annotator_waits_what_retry_after_asks(server):
    from vcritic.testing import sine

    server.queue(Reply(429, "quota", headers={"Retry-After": "1"}), Reply(text="fine"))
    assert annotator(server, max_retries=1).annotate(sine(440.0, 1.0, 16000), 16000, "", "a fan") == "fine"
    first, second = server.requests
    assert second.at - first.at >= 0.9  # the backoff alone would wait at most max_delay=0.2 s


def test_retry_after_is_capped_and_parsed_as_seconds_or_a_date():
    import email.utils
    import time

    from plugins.http.gemini import retry_after_seconds

    class Err(Exception):
        def __init__(self, value):
            self.response = type("R", (), {"headers": {"retry-after": value}})()

    assert retry_after_seconds(Err("3")) == 3.0
    soon = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 <= retry_after_seconds(Err(soon)) <= 31
    assert retry_after_seconds(Err("soon-ish")) is None and retry_after_seconds(ValueError()) is None


def test_annotator_identity_changes_with_what_shapes_the_reply(server):
    a, b = annotator(server), annotator(server, temperature=0.1)
    assert a.request_identity("ctx", "p") != b.request_identity("ctx", "p")
    assert a.request_identity("ctx", "p") == annotator(server, timeout=5).request_identity("ctx", "p")
    assert a.request_identity("ctx", "p") != a.request_identity("ctx", "q")

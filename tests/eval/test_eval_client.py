"""The async client against a live local aiohttp server: retries on 500s, resume from a partial
results file, chat mode with a continued answer prefix, loud warnings, streaming."""

import asyncio
import json

import pytest
from fake_server import FakeServer

from sparsekv_eval import client as C


def _samples(n):
    return [{"id": f"s{i}", "input": f"One of the special magic numbers for key-{i} is: {1000 + i}. "
             f"What is the special magic number for key-{i} mentioned in the provided text?",
             "answer_prefix": f" The special magic number for key-{i} mentioned in the provided text is",
             "outputs": [str(1000 + i)], "max_tokens": 8, "task": "niah"} for i in range(n)]


def _cfg(url, **kw):
    return C.ClientConfig(base_url=url + "/v1", model="fake-model", backoff_base_s=0.001,
                          backoff_max_s=0.01, concurrency=3, **kw)


def test_retries_on_500_then_success(tmp_path):
    with FakeServer(fail_times=2) as srv:
        out = tmp_path / "r.jsonl"
        recs = C.run_sync(_cfg(srv.url), _samples(5), out, progress=False, check_template=False)
        assert [r["id"] for r in recs] == [f"s{i}" for i in range(5)]
        assert all("error" not in r for r in recs)
        assert all(r["pred"].strip() == f"{1000 + i}." for i, r in enumerate(recs))
        assert all(v == 3 for v in srv.attempts.values())  # 2 failures + 1 success each
        assert len(srv.requests) == 15
        assert recs[0]["outputs"] == ["1000"] and recs[0]["task"] == "niah"  # sample fields kept


def test_gives_up_after_max_retries_and_records_error(tmp_path, capsys):
    with FakeServer(fail_times=100) as srv:
        out = tmp_path / "r.jsonl"
        recs = C.run_sync(_cfg(srv.url, max_retries=2), _samples(2), out, progress=False,
                          check_template=False)
        assert all("error" in r and "500" in r["error"] for r in recs)
        assert len(srv.requests) == 2 * 3
    assert "requests failed after retries" in capsys.readouterr().err


def test_resume_from_partial_file(tmp_path):
    out = tmp_path / "r.jsonl"
    with out.open("w") as f:
        f.write(json.dumps({"id": "s0", "pred": "PRESET"}) + "\n")
        f.write(json.dumps({"id": "s1", "error": "gave up"}) + "\n")  # errors are retried
        f.write('{"id": "s2", "pred": "tor')  # a torn line from a killed run
    with FakeServer() as srv:
        recs = C.run_sync(_cfg(srv.url), _samples(4), out, progress=False, check_template=False)
        sent = sorted(b["prompt"].split("key-")[1][0] for _, b in srv.requests)
        assert sent == ["1", "2", "3"]  # s0 was not asked again
    assert recs[0]["pred"] == "PRESET"
    assert [r["id"] for r in recs] == ["s0", "s1", "s2", "s3"] and all("error" not in r for r in recs)
    again = C.load_results(out)
    assert set(again) == {"s0", "s1", "s2", "s3"} and "error" not in again["s1"]
    with FakeServer() as srv:  # a complete file: nothing to do
        C.run_sync(_cfg(srv.url), _samples(4), out, progress=False, check_template=False)
        assert srv.requests == []


def test_chat_mode_continues_the_answer_prefix(tmp_path):
    with FakeServer() as srv:
        recs = C.run_sync(_cfg(srv.url, mode="chat"), _samples(1), tmp_path / "c.jsonl", progress=False)
        chat_bodies = [b for p, b in srv.requests if p == "/v1/chat/completions"]
        (body,) = chat_bodies
        assert body["messages"][-1]["role"] == "assistant"
        assert body["messages"][-1]["content"].startswith(" The special magic number")
        assert body["continue_final_message"] is True and body["add_generation_prompt"] is False
        assert recs[0]["pred"].strip() == "1000."


def test_no_chat_samples_use_completions_in_chat_mode(tmp_path):
    with FakeServer() as srv:
        s = _samples(1)[0] | {"no_chat": True}
        C.run_sync(_cfg(srv.url, mode="chat"), [s], tmp_path / "c.jsonl", progress=False, check_template=False)
        assert [p for p, _ in srv.requests] == ["/v1/completions"]


def test_missing_chat_template_warns_loudly(tmp_path, capsys):
    with FakeServer(has_chat_template=False) as srv:
        recs = C.run_sync(_cfg(srv.url, mode="chat"), _samples(1), tmp_path / "c.jsonl", progress=False)
        assert "error" in recs[0] and "400" in recs[0]["error"]
        assert len([p for p, _ in srv.requests if p == "/v1/chat/completions"]) == 1  # 4xx: no retry
    err = capsys.readouterr().err
    assert "WARNING" in err and "chat template" in err


def test_completion_mode_with_chat_model_warns(capsys):
    async def go(url):
        cfg = C.ClientConfig(base_url=url, model="SmolLM2-135M-Instruct")
        async with C.OpenAIClient(cfg) as c:
            return await c.check_chat_template()
    with FakeServer() as srv:
        warns = asyncio.run(go(srv.url))
    assert len(warns) == 1 and "without its chat template" in warns[0]
    assert "!!" in capsys.readouterr().err


def test_run_on_generations_warn_about_stop_tokens(tmp_path, capsys):
    with FakeServer(finish_reason="length") as srv:
        C.run_sync(_cfg(srv.url), _samples(6), tmp_path / "r.jsonl", progress=False, check_template=False)
    assert "stop token" in capsys.readouterr().err


def test_stream_measures_ttft():
    async def go(url):
        async with C.OpenAIClient(_cfg(url)) as c:
            return await c.stream("hello", max_tokens=5)
    with FakeServer(stream_tokens_delay=0.01) as srv:
        r = asyncio.run(go(srv.url))
        assert srv.requests[0][1]["ignore_eos"] is True
    assert r["text"] == " t0 t1 t2 t3 t4" and r["usage"]["completion_tokens"] == 5
    assert 0 < r["ttft_s"] <= r["latency_s"] and len(r["chunk_times"]) == 5


def test_base_url_forms():
    assert C.split_base_url("http://h:8000/v1/") == "http://h:8000"
    assert C.split_base_url("http://h:8000") == "http://h:8000"
    with pytest.raises(ValueError):
        C.ClientConfig(base_url="x", model="m", mode="bogus")

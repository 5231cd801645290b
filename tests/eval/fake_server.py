"""A local OpenAI-compatible fake server (aiohttp) for the client, CLI and serving-benchmark tests.

It answers like a perfect needle finder (the values of the queried keys), fails each distinct
request ``fail_times`` times with HTTP 500 before answering, returns deterministic prompt
log-probabilities for ``echo`` requests, streams tokens, and implements vLLM's ``/tokenize``.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
from collections import Counter

from aiohttp import web


def fake_logprob(token_id: int) -> float:
    return -0.1 * ((token_id % 7) + 1)


def needle_answer(prompt: str) -> str:
    m = re.findall(r"magic \w+ for (.+?) mentioned in the provided text", prompt)
    if not m:
        return "I do not know."
    keys = [k.strip() for k in re.split(r", and |, ", m[-1])]
    vals = []
    for k in keys:
        vals += re.findall(r"for " + re.escape(k) + r" is: (\S+?)\.(?:\s|$)", prompt)
    return " " + ", ".join(vals) + "."


class FakeServer:
    def __init__(self, fail_times: int = 0, answer_fn=needle_answer, finish_reason: str = "stop",
                 has_chat_template: bool = True, stream_tokens_delay: float = 0.0):
        self.fail_times = fail_times
        self.answer_fn = answer_fn
        self.finish_reason = finish_reason
        self.has_chat_template = has_chat_template
        self.delay = stream_tokens_delay
        self.requests: list[tuple[str, dict]] = []
        self.stat_reads = 0
        self.attempts: Counter = Counter()
        self.port = None
        self._loop = None
        self._thread = None
        self._runner = None

    # -------------------------------------------------------------- handlers
    def _maybe_fail(self, body: dict):
        key = json.dumps(body, sort_keys=True)
        self.attempts[key] += 1
        if self.attempts[key] <= self.fail_times:
            return web.json_response({"error": "injected failure"}, status=500)
        return None

    async def completions(self, request):
        body = await request.json()
        self.requests.append(("/v1/completions", body))
        fail = self._maybe_fail(body)
        if fail is not None:
            return fail
        prompt = body["prompt"]
        if body.get("stream"):
            return await self._stream(request, body)
        if body.get("echo"):
            ids = prompt if isinstance(prompt, list) else list(prompt.encode())
            lps = [None] + [fake_logprob(t) for t in ids[1:]] + [-0.5]
            return web.json_response({"choices": [{"text": "x", "finish_reason": "length", "logprobs": {
                "tokens": [str(t) for t in ids] + ["x"], "token_logprobs": lps}}]})
        text = self.answer_fn(prompt if isinstance(prompt, str) else "")
        return web.json_response({"choices": [{"text": text, "finish_reason": self.finish_reason}],
                                  "usage": {"prompt_tokens": len(prompt), "completion_tokens": 3}})

    async def chat(self, request):
        body = await request.json()
        self.requests.append(("/v1/chat/completions", body))
        if not self.has_chat_template:
            return web.json_response({"object": "error", "message": "Cannot use chat template functions "
                                      "because tokenizer.chat_template is not set"}, status=400)
        fail = self._maybe_fail(body)
        if fail is not None:
            return fail
        prompt = "".join(m["content"] for m in body["messages"])
        return web.json_response({"choices": [{"message": {"role": "assistant", "content": self.answer_fn(prompt)},
                                               "finish_reason": self.finish_reason}]})

    async def tokenize(self, request):
        body = await request.json()
        if "messages" in body:
            if not self.has_chat_template:
                return web.json_response({"message": "chat template is not set"}, status=400)
            text = "".join(f"<|{m['role']}|>{m['content']}<|end|>" for m in body["messages"]) + "<|assistant|>"
        else:
            text = body["prompt"]
        toks = list(text.encode())
        return web.json_response({"tokens": toks, "count": len(toks), "max_model_len": 8192})

    async def _stream(self, request, body):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        n = body.get("max_tokens", 4)
        for i in range(n):
            await asyncio.sleep(self.delay)
            chunk = {"choices": [{"index": 0, "text": f" t{i}", "finish_reason": None}]}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": n}
        await resp.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def stats(self, request):  # cumulative counters, as vllm_sparsekv.stats.snapshot()
        self.stat_reads += 1
        return web.json_response({"attended_pages": 30 * self.stat_reads, "held_pages": 120 * self.stat_reads})

    # -------------------------------------------------------------- lifecycle
    def start(self) -> "FakeServer":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        ready = threading.Event()

        def run():
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
            app = web.Application()
            app.router.add_post("/v1/completions", self.completions)
            app.router.add_post("/v1/chat/completions", self.chat)
            app.router.add_post("/tokenize", self.tokenize)
            app.router.add_get("/sparsekv/stats", self.stats)
            self._runner = web.AppRunner(app)
            self._loop.run_until_complete(self._runner.setup())
            self._loop.run_until_complete(web.TCPSite(self._runner, "127.0.0.1", self.port).start())
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self._loop is None:
            return
        fut = asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop)
        fut.result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

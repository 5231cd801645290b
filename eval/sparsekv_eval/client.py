"""Async client for any OpenAI-compatible endpoint (``vllm serve`` with or without sparsekv, or any
other server), built for long evaluations:

- bounded concurrency (a semaphore), one aiohttp session;
- retries with exponential backoff and jitter on 5xx / 408 / 429, connection errors and timeouts;
  other 4xx fail at once (they will not get better);
- resume: results go to an append-only JSONL file, one record per sample keyed by ``id``; a rerun
  skips ids already answered (records with an ``error`` field are retried), and a torn last line
  (a killed run) is ignored;
- a tqdm progress bar;
- completion mode (``/v1/completions``, prompt = input + answer_prefix) or chat mode
  (``/v1/chat/completions``, user message = input; a non-empty answer prefix is sent as a partial
  assistant message that the server continues: vLLM's ``continue_final_message``);
- loud warnings where published numbers went wrong elsewhere: a chat model queried without its
  chat template, a server whose tokenizer has no chat template, generations that never stop
  (missing stop tokens / EOS).

The root URL may be given with or without ``/v1``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

logger = logging.getLogger("sparsekv_eval")

RETRY_STATUS = {408, 429, 500, 502, 503, 504}


class EndpointError(RuntimeError):
    def __init__(self, msg: str, status: int | None = None, body: str = ""):
        super().__init__(msg)
        self.status, self.body = status, body


def loud_warning(msg: str) -> None:
    """A warning nobody scrolls past: logged, and printed framed to stderr."""
    bar = "!" * 78
    logger.warning(msg)
    print(f"\n{bar}\n!! WARNING: {msg}\n{bar}\n", file=sys.stderr, flush=True)


def split_base_url(base_url: str) -> str:
    """Server root without a trailing ``/v1``."""
    u = base_url.rstrip("/")
    return u[:-3] if u.endswith("/v1") else u


@dataclass
class ClientConfig:
    base_url: str
    model: str
    mode: str = "completion"  # or "chat"
    api_key: str | None = None
    concurrency: int = 8
    max_retries: int = 6
    timeout_s: float = 1800.0
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    temperature: float = 0.0
    chat_continue_prefix: bool = True
    extra_body: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.mode not in ("completion", "chat"):
            raise ValueError(f"mode must be 'completion' or 'chat', not {self.mode!r}")
        if self.api_key is None:
            self.api_key = os.environ.get("OPENAI_API_KEY", "EMPTY")


class OpenAIClient:
    """Use as ``async with OpenAIClient(cfg) as c: ...``."""

    def __init__(self, cfg: ClientConfig):
        self.cfg = cfg
        self.root = split_base_url(cfg.base_url)
        self._sem = asyncio.Semaphore(cfg.concurrency)
        self._session = None
        self.stats = {"requests": 0, "retries": 0, "failures": 0}

    async def __aenter__(self) -> "OpenAIClient":
        import aiohttp

        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.cfg.timeout_s),
            headers={"Authorization": f"Bearer {self.cfg.api_key}"},
            connector=aiohttp.TCPConnector(limit=max(self.cfg.concurrency * 2, 16)),
        )
        return self

    async def __aexit__(self, *exc) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ------------------------------------------------------------------ transport
    def _backoff(self, attempt: int) -> float:
        d = min(self.cfg.backoff_max_s, self.cfg.backoff_base_s * (2 ** attempt))
        return d * (0.5 + 0.5 * random.random())

    async def post(self, path: str, payload: dict, retries: int | None = None) -> dict:
        """POST JSON with retries; returns the decoded JSON body."""
        import aiohttp

        retries = self.cfg.max_retries if retries is None else retries
        url = self.root + path
        last: Exception | None = None
        for attempt in range(retries + 1):
            if attempt:
                self.stats["retries"] += 1
                await asyncio.sleep(self._backoff(attempt - 1))
            try:
                self.stats["requests"] += 1
                async with self._session.post(url, json=payload) as resp:
                    body = await resp.text()
                    if resp.status == 200:
                        return json.loads(body)
                    err = EndpointError(f"HTTP {resp.status} from {url}: {body[:500]}", resp.status, body)
                    if resp.status in RETRY_STATUS or resp.status >= 500:
                        last = err
                        logger.info("retrying after %s (attempt %d)", err, attempt + 1)
                        continue
                    raise err
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError,
                    asyncio.TimeoutError) as e:
                last = e
                logger.info("retrying after %r (attempt %d)", e, attempt + 1)
        self.stats["failures"] += 1
        raise EndpointError(f"gave up on {url} after {retries + 1} attempts: {last!r}",
                            getattr(last, "status", None))

    async def get(self, path: str) -> dict:
        async with self._session.get(self.root + path) as resp:
            body = await resp.text()
            if resp.status != 200:
                raise EndpointError(f"HTTP {resp.status} from {path}: {body[:300]}", resp.status, body)
            return json.loads(body)

    # ------------------------------------------------------------------ requests
    def _sampling(self, max_tokens: int, stop: Sequence[str] | None, extra: dict | None) -> dict:
        p = {"model": self.cfg.model, "max_tokens": max_tokens, "temperature": self.cfg.temperature}
        if stop:
            p["stop"] = list(stop)
        p.update(self.cfg.extra_body)
        if extra:
            p.update(extra)
        return p

    async def complete(self, prompt: str | list[int], max_tokens: int, stop=None, **extra) -> dict:
        async with self._sem:
            t0 = time.perf_counter()
            r = await self.post("/v1/completions", {"prompt": prompt, **self._sampling(max_tokens, stop, extra)})
        ch = r["choices"][0]
        return {"text": ch.get("text", ""), "finish_reason": ch.get("finish_reason"),
                "usage": r.get("usage"), "latency_s": time.perf_counter() - t0, "raw_choice": ch}

    async def chat(self, user: str, max_tokens: int, assistant_prefix: str = "", stop=None,
                   system: str | None = None, **extra) -> dict:
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        body = {"messages": msgs, **self._sampling(max_tokens, stop, extra)}
        if assistant_prefix and self.cfg.chat_continue_prefix:
            msgs.append({"role": "assistant", "content": assistant_prefix})
            body.update(add_generation_prompt=False, continue_final_message=True)
        async with self._sem:
            t0 = time.perf_counter()
            r = await self.post("/v1/chat/completions", body)
        ch = r["choices"][0]
        return {"text": (ch.get("message") or {}).get("content") or "",
                "finish_reason": ch.get("finish_reason"), "usage": r.get("usage"),
                "latency_s": time.perf_counter() - t0}

    async def generate(self, sample: dict, default_max_tokens: int = 128) -> dict:
        """Answer one sample: ``input`` (+ ``answer_prefix``) or ``prompt``; ``max_tokens``; ``stop``."""
        max_tokens = int(sample.get("max_tokens") or default_max_tokens)
        stop = sample.get("stop")
        extra = sample.get("extra") or {}
        prefix = sample.get("answer_prefix", "") or ""
        if self.cfg.mode == "chat" and not sample.get("no_chat"):
            user = sample.get("input", sample.get("prompt", ""))
            if not self.cfg.chat_continue_prefix:
                user = user + prefix
                prefix = ""
            return await self.chat(user, max_tokens, prefix, stop, **extra)
        prompt = sample.get("prompt") or (sample.get("input", "") + prefix)
        return await self.complete(prompt, max_tokens, stop, **extra)

    async def stream(self, prompt: str, max_tokens: int, ignore_eos: bool = True,
                     **extra) -> dict:
        """Streamed completion for latency measurements: time to first token, per-token gaps.

        ``ignore_eos`` (a vLLM extension) makes every request produce exactly ``max_tokens``.
        """
        body = {"prompt": prompt, "stream": True, "stream_options": {"include_usage": True},
                **self._sampling(max_tokens, None, extra)}
        if ignore_eos:
            body.update(ignore_eos=True, min_tokens=max_tokens)
        if self.cfg.mode == "chat":
            body.pop("prompt")
            body["messages"] = [{"role": "user", "content": prompt}]
            path = "/v1/chat/completions"
        else:
            path = "/v1/completions"
        async with self._sem:
            t0 = time.perf_counter()
            ttft, times, text, usage = None, [], [], None
            async with self._session.post(self.root + path, json=body) as resp:
                if resp.status != 200:
                    raise EndpointError(f"HTTP {resp.status}: {(await resp.text())[:300]}", resp.status)
                async for raw in resp.content:
                    line = raw.decode("utf-8", "replace").strip()
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if chunk.get("usage"):
                        usage = chunk["usage"]
                    for ch in chunk.get("choices") or []:
                        piece = ch.get("text") if "text" in ch else (ch.get("delta") or {}).get("content")
                        if piece:
                            now = time.perf_counter()
                            if ttft is None:
                                ttft = now - t0
                            times.append(now)
                            text.append(piece)
            end = time.perf_counter()
        return {"ttft_s": ttft, "latency_s": end - t0, "chunk_times": [t - t0 for t in times],
                "text": "".join(text), "usage": usage}

    # ------------------------------------------------------------------ checks
    async def tokenize(self, prompt: str | None = None, messages: list | None = None) -> list[int]:
        """vLLM's ``/tokenize`` endpoint (not part of the OpenAI API)."""
        body: dict[str, Any] = {"model": self.cfg.model}
        if messages is not None:
            body["messages"] = messages
        else:
            body["prompt"] = prompt
        r = await self.post("/tokenize", body, retries=1)
        return r["tokens"]

    async def check_chat_template(self, tokenizer: Any = None) -> list[str]:
        """Warn loudly when the chat template is missing or bypassed; returns the warnings."""
        warns = []
        name = self.cfg.model.lower()
        looks_chat = any(k in name for k in ("instruct", "chat", "-it", "assistant"))
        tmpl = getattr(getattr(tokenizer, "tok", tokenizer), "chat_template", None) if tokenizer else None
        if tokenizer is not None and tmpl is None and (self.cfg.mode == "chat" or looks_chat):
            warns.append(f"the tokenizer of {self.cfg.model} has no chat template: chat prompts will be "
                         "formatted wrongly (or rejected); pass --chat-template to the server")
        if self.cfg.mode == "completion" and (looks_chat or tmpl):
            warns.append(f"{self.cfg.model} looks like a chat model but prompts are sent raw to "
                         "/v1/completions, without its chat template; use --mode chat unless you "
                         "mean to (published LongBench numbers apply the template)")
        if self.cfg.mode == "chat":
            try:
                plain = await self.tokenize(prompt="hello")
                chat = await self.tokenize(messages=[{"role": "user", "content": "hello"}])
                if len(chat) <= len(plain) + 1:
                    warns.append("the server applied no chat template to a chat request "
                                 f"({len(chat)} vs {len(plain)} tokens for 'hello')")
            except EndpointError as e:
                if e.status is not None and e.status == 400 and "template" in (e.body or "").lower():
                    warns.append(f"the server has no chat template for {self.cfg.model}: {e.body[:200]}")
                else:
                    logger.info("chat-template probe skipped: %s", e)
        for w in warns:
            loud_warning(w)
        return warns


# ---------------------------------------------------------------------- results files


def load_results(path: str | os.PathLike) -> dict[str, dict]:
    """Records of an append-only JSONL results file by id (the last record of an id wins); a torn
    final line is skipped."""
    out: dict[str, dict] = {}
    p = Path(path)
    if not p.exists():
        return out
    with p.open(encoding="utf-8") as f:
        for ln, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                logger.warning("%s:%d: unreadable line skipped (torn write?)", p, ln)
                continue
            if "id" in rec:
                out[str(rec["id"])] = rec
    return out


def check_stop_behaviour(records: Iterable[dict], threshold: float = 0.5, min_n: int = 5) -> str | None:
    recs = [r for r in records if "error" not in r and r.get("finish_reason") is not None]
    if len(recs) < min_n:
        return None
    frac = sum(1 for r in recs if r.get("finish_reason") == "length") / len(recs)
    if frac > threshold:
        msg = (f"{frac:.0%} of {len(recs)} generations stopped at max_tokens instead of a stop token: "
               "the model's EOS / stop tokens may be missing (generation_config.json, --chat-template), "
               "or the prompts need stop strings; scores computed from run-on answers are not comparable")
        loud_warning(msg)
        return msg
    return None


KEEP_FIELDS = ("task", "outputs", "answers", "all_classes", "length", "target_length", "meta",
               "dataset", "answer_prefix")


async def run_samples(client: OpenAIClient, samples: Sequence[dict], out_path: str | os.PathLike,
                      resume: bool = True, progress: bool = True, desc: str = "eval",
                      keep: Sequence[str] = KEEP_FIELDS,
                      postprocess: Callable[[dict, dict], dict] | None = None) -> list[dict]:
    """Answer every sample not yet in ``out_path``; returns the records of all samples, in order.

    Each record: ``id``, ``pred``, ``finish_reason``, ``usage``, ``latency_s``, the sample's fields
    named in ``keep``, or ``id`` + ``error`` when all retries failed (retried on the next run).
    """
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    done = load_results(out_path) if resume else {}
    if not resume and out_path.exists():
        out_path.unlink()
    done = {k: v for k, v in done.items() if "error" not in v}
    ids = [str(s["id"]) for s in samples]
    if len(set(ids)) != len(ids):
        raise ValueError("sample ids must be unique")
    todo = [s for s in samples if str(s["id"]) not in done]
    if done:
        logger.info("resuming: %d of %d samples already answered in %s", len(samples) - len(todo),
                    len(samples), out_path)
    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(samples), initial=len(samples) - len(todo), desc=desc, dynamic_ncols=True)
        except ImportError:  # pragma: no cover
            bar = None
    new: dict[str, dict] = {}
    if out_path.exists() and out_path.stat().st_size > 0:
        with out_path.open("rb") as f:  # a torn last line must not swallow the next record
            f.seek(-1, os.SEEK_END)
            torn = f.read(1) != b"\n"
        if torn:
            with out_path.open("a", encoding="utf-8") as f:
                f.write("\n")
    with out_path.open("a", encoding="utf-8") as fout:
        async def one(s: dict):
            sid = str(s["id"])
            try:
                r = await client.generate(s)
                rec = {"id": sid, "pred": r["text"], "finish_reason": r.get("finish_reason"),
                       "usage": r.get("usage"), "latency_s": round(r.get("latency_s", 0.0), 4),
                       "model": client.cfg.model, "mode": client.cfg.mode}
                rec.update({k: s[k] for k in keep if k in s})
                if postprocess is not None:
                    rec = postprocess(s, rec)
            except EndpointError as e:
                rec = {"id": sid, "error": str(e)}
            fout.write(json.dumps(rec, ensure_ascii=False) + "\n")
            fout.flush()
            new[sid] = rec
            if bar is not None:
                bar.update(1)

        await asyncio.gather(*(one(s) for s in todo))
    if bar is not None:
        bar.close()
    allrec = {**done, **new}
    errors = [r for r in new.values() if "error" in r]
    if errors:
        loud_warning(f"{len(errors)} of {len(todo)} requests failed after retries (first: "
                     f"{errors[0]['error'][:200]}); rerun the same command to retry them")
    check_stop_behaviour(new.values())
    return [allrec[i] for i in ids if i in allrec]


def run_sync(cfg: ClientConfig, samples: Sequence[dict], out_path: str | os.PathLike, *,
             resume: bool = True, progress: bool = True, desc: str = "eval", tokenizer: Any = None,
             check_template: bool = True, **kw) -> list[dict]:
    """Synchronous entry point: open a client, check the chat template, run the samples."""
    async def main():
        async with OpenAIClient(cfg) as c:
            if check_template:
                await c.check_chat_template(tokenizer)
            return await run_samples(c, samples, out_path, resume=resume, progress=progress, desc=desc, **kw)

    return asyncio.run(main())


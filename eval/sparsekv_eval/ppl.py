"""Sliding-window perplexity over long text, from per-token log-probabilities.

The log-probabilities come from a callable ``logprobs(ids) -> [None, lp_1, ..., lp_{n-1}]`` (lp_i =
log p(ids[i] | ids[:i])), for instance an OpenAI-compatible completions endpoint asked for prompt
log-probabilities (``echo=True, logprobs=0``: see ``endpoint_logprobs``), or an offline model.

The window recipe is Hugging Face's: windows of ``window`` tokens start every ``stride`` tokens; each
window scores only the tokens the previous window did not (so with ``stride < window`` every scored
token has at least ``window - stride`` tokens of context), and the first token of the text is never
scored.

Caveat for sparse attention: prompt log-probabilities are computed in *prefill*, and the sparsekv
backend runs prefill dense; through a server this measures the dense model (a useful check that
sparse == dense there). Perplexity *under sparse decode* needs each scored token to be computed as a
decode step over the sparse selection: the offline driver (``sweep``) does that; its per-token
log-probabilities plug into ``perplexity_from_logprobs``.
"""

from __future__ import annotations

import asyncio
import math
from typing import Awaitable, Callable, Sequence

LogprobFn = Callable[[Sequence[int]], Sequence[float | None]]
AsyncLogprobFn = Callable[[Sequence[int]], Awaitable[Sequence[float | None]]]


def sliding_windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored position) of each window over ``n_tokens`` tokens."""
    if window <= 0 or stride <= 0 or stride > window:
        raise ValueError("need 0 < stride <= window")
    out, prev_end = [], 0
    for begin in range(0, max(n_tokens, 1), stride):
        end = min(begin + window, n_tokens)
        out.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n_tokens:
            break
    return out


def _accumulate(windows, lps_per_window) -> tuple[float, int]:
    nll, count = 0.0, 0
    for (begin, end, first), lps in zip(windows, lps_per_window):
        if len(lps) != end - begin:
            raise ValueError(f"window [{begin}, {end}) got {len(lps)} log-probabilities")
        for pos in range(first, end):
            lp = lps[pos - begin]
            if lp is None:
                raise ValueError(f"no log-probability for position {pos}")
            nll -= float(lp)
            count += 1
    return nll, count


def _result(nll: float, count: int, windows) -> dict:
    return {"ppl": math.exp(nll / count) if count else float("nan"), "nll": nll,
            "mean_nll": nll / count if count else float("nan"), "tokens": count, "windows": len(windows)}


def sliding_window_ppl(ids: Sequence[int], logprobs: LogprobFn, window: int = 2048,
                       stride: int = 1024) -> dict:
    """{"ppl", "nll", "mean_nll", "tokens" (scored), "windows"}."""
    wins = sliding_windows(len(ids), window, stride)
    return _result(*_accumulate(wins, [logprobs(ids[b:e]) for b, e, _ in wins]), wins)


async def sliding_window_ppl_async(ids: Sequence[int], logprobs: AsyncLogprobFn, window: int = 2048,
                                   stride: int = 1024) -> dict:
    wins = sliding_windows(len(ids), window, stride)
    lps = await asyncio.gather(*(logprobs(ids[b:e]) for b, e, _ in wins))
    return _result(*_accumulate(wins, lps), wins)


def perplexity_from_logprobs(lps: Sequence[float]) -> float:
    """exp(mean negative log-likelihood) of already-scored tokens."""
    return math.exp(-sum(lps) / len(lps))


def endpoint_logprobs(client) -> AsyncLogprobFn:
    """An async logprob function over an OpenAI-compatible ``/v1/completions`` endpoint.

    Sends the window as token ids with ``echo=True, logprobs=0, max_tokens=1`` and keeps the first
    ``len(ids)`` entries of ``token_logprobs`` (the prompt's; the first is null).
    """
    async def fn(ids: Sequence[int]) -> list[float | None]:
        async with client._sem:
            r = await client.post("/v1/completions", {
                "model": client.cfg.model, "prompt": list(ids), "max_tokens": 1, "echo": True,
                "logprobs": 0, "temperature": 0.0})
        lp = r["choices"][0]["logprobs"]["token_logprobs"]
        if len(lp) < len(ids):
            raise ValueError(f"endpoint returned {len(lp)} log-probabilities for {len(ids)} tokens")
        out = list(lp[: len(ids)])
        out[0] = None
        return out

    return fn


def endpoint_ppl(base_url: str, model: str, ids: Sequence[int], window: int = 2048,
                 stride: int = 1024, concurrency: int = 4, **client_kw) -> dict:
    """Perplexity of ``ids`` through an endpoint (synchronous wrapper)."""
    from .client import ClientConfig, OpenAIClient

    async def main():
        async with OpenAIClient(ClientConfig(base_url=base_url, model=model, concurrency=concurrency,
                                             **client_kw)) as c:
            return await sliding_window_ppl_async(ids, endpoint_logprobs(c), window, stride)

    return asyncio.run(main())

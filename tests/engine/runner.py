"""Run one vLLM engine configuration on CPU in this process and print its results as JSON.

The engine tests start one subprocess per configuration (stock CPU attention, sparsekv full,
quest...), so each engine is isolated and the comparisons are made on identical prompts.
Usage: python runner.py SPEC_JSON  (spec: model, backend, sparsekv, prompts, max_tokens,
prefix_caching, mode = "batch" | "sequential", max_model_len, block_size, num_blocks, env)
On CUDA (SPARSEKV_TEST_DEVICE=cuda, as benchmarks/gpu_e2e.py runs these tests on the GPU machine)
the engine runs in float16 with CUDA graphs (FULL decode graphs), as users run it.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # run as a file: the repo root
from tests.engine.harness import llm_device_kwargs, read_spec, set_cpu_engine_env  # noqa: E402

set_cpu_engine_env()  # before vLLM is imported


def main() -> None:
    spec = read_spec(sys.argv[1])
    os.environ.update(spec.get("env", {}))
    from vllm import LLM, SamplingParams

    cuda = os.environ.get("SPARSEKV_TEST_DEVICE") == "cuda"
    kw = dict(
        **llm_device_kwargs(), distributed_executor_backend="uni",
        max_model_len=spec.get("max_model_len", 4096), enable_prefix_caching=spec.get("prefix_caching", False),
        seed=0,
    )
    if spec.get("block_size"):
        kw["block_size"] = spec["block_size"]
    if spec.get("max_num_batched_tokens"):
        kw["max_num_batched_tokens"] = spec["max_num_batched_tokens"]
    if cuda and os.environ.get("SPARSEKV_TEST_KV_BYTES"):
        # a fixed KV size instead of a memory profile: engines of other suites may share the GPU
        # (gpu_e2e.py runs two lanes at once), and a profile would count their memory as ours
        kw["kv_cache_memory_bytes"] = int(os.environ["SPARSEKV_TEST_KV_BYTES"])
    if spec.get("num_blocks"):  # a KV cache this small forces preemption
        kw.update(num_gpu_blocks_override=spec["num_blocks"], disable_log_stats=False)
    if spec["backend"] != "stock":  # "sparsekv", or another dense backend of vLLM (e.g. TRITON_ATTN)
        kw["attention_backend"] = spec["backend"]
        if spec["backend"].lower() == "sparsekv":
            kw["additional_config"] = {"sparsekv": spec.get("sparsekv", {})}
    llm = LLM(spec["model"], **kw)
    sp = SamplingParams(temperature=0.0, max_tokens=spec.get("max_tokens", 16), logprobs=2)
    prompts = spec["prompts"]
    if spec.get("mode") == "sequential":
        outs = [llm.generate([p], sp, use_tqdm=False)[0] for p in prompts]
    else:
        outs = llm.generate(prompts, sp, use_tqdm=False)
    results = []
    for o in outs:
        c = o.outputs[0]
        lps = [lp[tid].logprob for tid, lp in zip(c.token_ids, c.logprobs)]
        # gap between the two best tokens at each step: tells a genuine near-tie from a real change
        gaps = [abs(a - b) for a, b in (sorted((x.logprob for x in lp.values()), reverse=True)[:2] for lp in c.logprobs)]
        results.append({"text": c.text, "token_ids": list(c.token_ids), "logprobs": lps, "top2_gap": gaps,
                        "prompt_tokens": len(o.prompt_token_ids),
                        "preemptions": o.metrics.num_preemptions if getattr(o, "metrics", None) else None})
    from vllm_sparsekv import stats

    backends = sorted(set(llm.collective_rpc(_backend_names)[0]))
    block_sizes = sorted(set(llm.collective_rpc(_block_sizes)[0]))
    print("RESULT " + json.dumps({"results": results, "stats": stats.collect(llm)[0], "backends": backends,
                                  "block_sizes": block_sizes}))


def _backend_names(worker) -> list[str]:
    """Which backend classes the worker's attention groups really run (logs do not say on CPU)."""
    runner = getattr(worker, "model_runner", None) or worker.worker.model_runner
    return [g.backend.__name__ for groups in runner.attn_groups for g in groups]


def _block_sizes(worker) -> list[int]:
    """The page size of the worker's KV cache, as its attention groups hold it."""
    runner = getattr(worker, "model_runner", None) or worker.worker.model_runner
    return [g.kv_cache_spec.block_size for groups in runner.attn_groups for g in groups]


if __name__ == "__main__":
    main()

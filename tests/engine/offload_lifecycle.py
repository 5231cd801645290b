"""One engine with the passive store under stress, in this process: requests preempted
and aborted while they have passive pages, a host pool so small that it fills, and prefix caching
on (prompts share their first pages), so blocks the store freed serve other requests' prefix hits.
Prints JSON: the outputs of the requests that ran to the end, the counters, and what the scheduler
and worker still hold after one more request (nothing, if nothing leaked).
Usage: python offload_lifecycle.py SPEC_JSON (model, sparsekv, prompts (>= 4), max_tokens,
first_max_tokens (requests 0-2), num_blocks, max_model_len)."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # run as a file: the repo root
from tests.engine.harness import llm_device_kwargs, read_spec, set_cpu_engine_env  # noqa: E402

set_cpu_engine_env()  # before vLLM is imported; the scheduler is inspected in-process


def main() -> None:
    spec = read_spec(sys.argv[1])
    from vllm import LLM, SamplingParams

    from vllm_sparsekv import stats
    from vllm_sparsekv.offload import store as offload_store

    llm = LLM(spec["model"], **llm_device_kwargs(), **spec.get("llm", {}),
              distributed_executor_backend="uni", max_model_len=spec.get("max_model_len", 1024),
              enable_prefix_caching=True, seed=0, num_gpu_blocks_override=spec["num_blocks"],
              disable_log_stats=False,
              attention_backend="sparsekv", additional_config={"sparsekv": spec["sparsekv"]})
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    hits = _count_hits_on_offloaded_blocks(scheduler.kv_cache_manager)
    sp = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"])
    long = SamplingParams(temperature=0.0, max_tokens=spec["first_max_tokens"])  # still running at step 3
    prompts = spec["prompts"]
    worker_store = offload_store.current()
    done: dict[str, object] = {}

    def step_until(cond) -> None:
        while engine.has_unfinished_requests() and not cond():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out

    def passive(rid: str) -> int:  # the store knows vLLM's internal ids, "<id>-<suffix>"
        return sum(len(p) for r, p in worker_store.passive.items() if r.rsplit("-", 1)[0] == rid)

    # 1. three requests decode until two of them have passive pages (a small pool fills up)
    for rid in ("0", "1", "2"):
        engine.add_request(rid, prompts[int(rid)], long)
    step_until(lambda: passive("0") and passive("1"))
    # 2. abort one of them while it holds passive pages
    aborted = [r for r in worker_store.passive if r.rsplit("-", 1)[0] == "1"]
    engine.abort_request(aborted, internal=True)
    # 3. vLLM preempts every running request (its own preemption path: blocks freed, recompute later)
    with_passive = passive("0")
    engine.reset_prefix_cache(reset_running_requests=True)
    # 4. more requests arrive; everything runs to the end
    for i in range(3, len(prompts)):
        engine.add_request(str(i), prompts[i], sp)
    step_until(lambda: False)
    # one more request: its first step applies the last finishes; then nothing may be held
    engine.add_request("last", "The capital of France is", SamplingParams(temperature=0.0, max_tokens=2))
    while engine.has_unfinished_requests():
        engine.step()
    side = scheduler.connector.scheduler_side
    results = {rid: {"token_ids": list(o.outputs[0].token_ids), "preemptions": o.metrics.num_preemptions}
               for rid, o in done.items() if rid != "1"}
    print("RESULT " + json.dumps({
        "results": results, "aborted": ["1"] if aborted else [], "stats": stats.snapshot(),
        "passive_at_preemption": with_passive, "prefix_hits_on_offloaded_blocks": hits[0],
        "held_slots": side.slots.capacity - side.slots.num_free, "slots": side.slots.capacity,
        "scheduler_passive": {r: len(p) for r, p in side.passive.items() if p},
        "worker_passive": {r: len(p) for r, p in worker_store.passive.items() if p},
        "free_blocks": scheduler.kv_cache_manager.block_pool.get_num_free_blocks(),
        "num_blocks": spec["num_blocks"],
    }))


def _count_hits_on_offloaded_blocks(kv_cache_manager) -> list[int]:
    """Count prefix-cache hits on blocks the passive store freed, while they still hold the bytes
    they held then (same block hash): vLLM gives such a block to another request as a cache hit."""
    from vllm_sparsekv.backend import compat

    freed: dict[int, object] = {}  # block id -> its hash when the passive store freed it
    hits = [0]
    free_page, lookup = compat.free_request_page, kv_cache_manager.get_computed_blocks

    def free_and_note(manager, req_id, page):
        block = manager.coordinator.single_type_managers[0].req_to_blocks[req_id][page]
        freed[block.block_id] = block.block_hash
        free_page(manager, req_id, page)

    def get_computed_blocks(request):
        out = lookup(request)
        hits[0] += sum(1 for b in out[0].blocks[0]
                       if b.block_hash is not None and freed.get(b.block_id) == b.block_hash)
        return out

    compat.free_request_page = free_and_note
    kv_cache_manager.get_computed_blocks = get_computed_blocks
    return hits


if __name__ == "__main__":
    main()

"""The passive store with vLLM's engine core in a process of its own (as `vllm serve` runs it):
the plugin's connector must reach the spawned engine core and worker through the pickled config.
Prints RESULT JSON: the token ids and the worker's counters, read from its stats file.
Usage: python offload_spawned.py SPEC_JSON (model, sparsekv, prompts, max_tokens, num_blocks,
max_model_len)."""

import json
import os
import sys
import tempfile
import time

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # run as a file: the repo root
from tests.engine.harness import llm_device_kwargs, read_spec  # noqa: E402


def main() -> None:
    spec = read_spec(sys.argv[1])
    from vllm import LLM, SamplingParams

    stats_file = os.path.join(tempfile.mkdtemp(), "stats.json")
    llm = LLM(spec["model"], **llm_device_kwargs(), **spec.get("llm", {}),
              max_model_len=spec["max_model_len"], num_gpu_blocks_override=spec["num_blocks"], seed=0,
              enable_prefix_caching=False, attention_backend="sparsekv",
              additional_config={"sparsekv": {**spec["sparsekv"], "stats_file": stats_file}})
    outs = llm.generate(spec["prompts"], SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"]),
                        use_tqdm=False)
    time.sleep(2.5)  # the worker's stats thread rewrites the file every second
    with open(stats_file) as f:
        worker = json.load(f)
    print("RESULT " + json.dumps({"results": [{"token_ids": list(o.outputs[0].token_ids)} for o in outs],
                                  "stats": worker, "pid": os.getpid()}))


if __name__ == "__main__":
    main()

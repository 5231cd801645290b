"""The README's first command: serve a small real model with sparsekv, ask it a long question
through the OpenAI API, print the answer and the fraction of KV pages decode attention read.

    python -m vllm_sparsekv.tools.demo [--model DIR] [--context 2048] [--token-budget 384]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF model folder (default: SmolLM2-135M-Instruct, fetched and converted)")
    ap.add_argument("--context", type=int, default=2048, help="prompt length in tokens")
    ap.add_argument("--token-budget", type=int, default=384, help="sparsekv token_budget")
    ap.add_argument("--passkey", default="71432")
    args = ap.parse_args(argv)

    from openai import OpenAI
    from transformers import AutoTokenizer

    from sparsekv_eval.passkey import passkey_prompt
    from vllm_sparsekv.models import ensure_model
    from vllm_sparsekv.tools import launch

    model = args.model or str(ensure_model("smollm2"))
    tmp = tempfile.mkdtemp(prefix="sparsekv-demo-")
    stats_file, log = os.path.join(tmp, "stats.json"), os.path.join(tmp, "server.log")
    cfg = {"method": "quest", "token_budget": args.token_budget, "sink_tokens": 32, "recent_tokens": 32,
           "stats_file": stats_file, "log_interval_s": 5}
    port = launch.free_port()
    cmd = launch.server_command(model, port, cfg, name="demo", max_model_len=args.context + 256)
    print("$ " + " ".join(a if " " not in a else f"'{a}'" for a in cmd), flush=True)
    proc = launch.start(cmd, log)
    try:
        t0 = time.monotonic()
        launch.wait_healthy(proc, port, log)
        print(f"server ready in {time.monotonic() - t0:.0f} s (log: {log})", flush=True)
        prompt = passkey_prompt(AutoTokenizer.from_pretrained(model), args.context, args.passkey, depth=0.35)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        t0 = time.monotonic()
        r = client.completions.create(model="demo", prompt=prompt, max_tokens=8, temperature=0)
        answer = r.choices[0].text
        print(f"prompt: {r.usage.prompt_tokens} tokens, a pass key hidden at 35% depth; "
              f"answered in {time.monotonic() - t0:.1f} s")
        print(f"answer: {answer.strip()!r}  ({'correct' if args.passkey in answer else 'WRONG'}, key {args.passkey})")
        time.sleep(2)  # the worker refreshes the stats file every second
        s = json.load(open(stats_file))
        print(f"decode attention read {s['attended_pages']} of {s['held_pages']} KV pages "
              f"({100 * s['attended_fraction']:.1f}%) on the sparse layers "
              f"(token_budget={args.token_budget}, first two layers dense)")
        ok = args.passkey in answer
    finally:
        rc = launch.stop(proc)
        print(f"server stopped (exit code {rc})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

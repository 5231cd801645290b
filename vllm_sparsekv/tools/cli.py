"""``sparsekv`` command line. Each tool adds its own subcommand builder here."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from vllm_sparsekv.tools import profile_heads, train_hash, train_relevance
    from vllm_sparsekv.tools.eval_cli import add_eval_parser

    parser = argparse.ArgumentParser(prog="sparsekv", description="vllm-sparsekv tools")
    sub = parser.add_subparsers(dest="command", required=True)
    add_eval_parser(sub)
    profile_heads.add_profile_parser(sub)
    train_hash.add_parser(sub)
    train_relevance.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args._argv = list(sys.argv[1:] if argv is None else argv)  # recorded in result files
    from vllm_sparsekv.tools.eval_cli import with_eval_hint

    return int(with_eval_hint(args.func)(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

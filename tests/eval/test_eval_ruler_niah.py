"""RULER-style generators with a real (locally trained BPE) tokenizer: lengths, answers present in
the text, needle depths, scoring; the needle grid and its heatmap."""

import re
from collections import Counter

import pytest
from conftest import needs_essays

from sparsekv_eval import niah, ruler
from sparsekv_eval.tokenization import as_tokenizer, chat_template_tokens, parse_length

pytestmark = needs_essays
SLACK = 64  # haystack granularity: one needle of the needle haystack is <= ~55 tokens here


@pytest.fixture(scope="module")
def gen(hf_tokenizer):
    return ruler.RulerGenerator(hf_tokenizer, seed=7)


def _check_length(tok, s):
    n = len(as_tokenizer(tok).encode(s.input + s.answer_prefix))
    assert n == s.length
    budget = s.target_length - s.max_tokens
    assert budget - SLACK <= n <= budget, (s.task, n, budget)


@pytest.mark.parametrize("length", [1024, 2500])
@pytest.mark.parametrize("task", list(ruler.TASKS))
def test_lengths_and_answers_present(gen, hf_tokenizer, task, length):
    samples = gen.generate(task, length, 2)
    assert len({s.id for s in samples}) == 2
    for s in samples:
        _check_length(hf_tokenizer, s)
        assert s.max_tokens == ruler.TOKENS_TO_GENERATE[ruler.TASKS[task]["kind"]]
        text = s.input
        kind = ruler.TASKS[task]["kind"]
        if kind == "niah":
            cfg = ruler.TASKS[task]
            assert len(s.outputs) == cfg["num_needle_v"] * cfg["num_needle_q"]
            for key in s.meta["keys"]:
                assert key in text.rsplit("\n", 1)[-1]  # the question names the key
            for v in s.outputs:
                # the value sits in a needle for one of the queried keys
                m = re.findall(r"for (\S+) is: " + re.escape(v) + r"\.", text)
                assert m and m[0] in s.meta["keys"], (task, v)
            assert s.answer_prefix.startswith(" The special magic")
        elif kind == "variable_tracking":
            chain = s.outputs
            assert len(chain) == 5
            # the last question is the real one (the first belongs to the one-shot example)
            value = re.findall(r"assigned the value (\d+) in the text above", text)[-1]
            assert s.meta["icl_tokens"] > 50 and text.count("Question: Find all variables") == 2
            assert re.search(rf"VAR {chain[0]} = {value}\b", text)
            for a, b in zip(chain, chain[1:]):
                assert f"VAR {b} = VAR {a}" in text
            assert f"{len(chain)} variables are assigned the value {value}" in s.answer_prefix
        elif kind == "common_words_extraction":
            main = text.split("\n")[-2]  # the numbered list of the real question
            counts = Counter(re.findall(r"\d+\. (\S+)", main))
            assert len(s.outputs) == 10
            least_common = min(counts[w] for w in s.outputs)
            assert least_common > max(c for w, c in counts.items() if w not in s.outputs)
        else:  # frequent words
            words = Counter(w for w in text.split() if re.fullmatch(r"[a-z]{6}", w))
            top3 = [w for w, _ in words.most_common(3)]
            assert top3 == s.outputs


@pytest.mark.parametrize("task", ["niah_single_1", "niah_single_2", "niah_multikey_2"])
def test_needle_depth(gen, task):
    for depth in (0, 25, 50, 75, 100):
        (s,) = gen.generate(task, 2048, 1, depth=depth)
        assert s.meta["depths"] == [depth]
        (measured,) = s.meta["token_depths"]
        assert abs(measured - depth) <= 5, (task, depth, measured)


def test_needle_depth_independent_check(gen, hf_tokenizer):
    """Recount: tokens before the needle / tokens of the context, from the prompt itself."""
    tok = as_tokenizer(hf_tokenizer)
    (s,) = gen.generate("niah_single_2", 3000, 1, depth=30)
    first, rest = s.input.split("\n", 1)
    ctx = rest.rsplit("\nWhat ", 1)[0]
    at = ctx.index(f"is: {s.outputs[0]}.")
    frac = len(tok.encode(ctx[:at])) / len(tok.encode(ctx))
    assert abs(100 * frac - 30) <= 5


def test_deterministic_and_seeded(hf_tokenizer):
    a = ruler.RulerGenerator(hf_tokenizer, seed=1).generate("niah_multikey_1", 1024, 2)
    b = ruler.RulerGenerator(hf_tokenizer, seed=1).generate("niah_multikey_1", 1024, 2)
    c = ruler.RulerGenerator(hf_tokenizer, seed=2).generate("niah_multikey_1", 1024, 2)
    assert [x.to_dict() for x in a] == [x.to_dict() for x in b]
    assert a[0].input != c[0].input and a[0].input != a[1].input


def test_scoring(gen):
    (s,) = gen.generate("niah_multivalue", 1024, 1)
    perfect = " " + ", ".join(s.outputs) + "."
    assert ruler.score_prediction(perfect, s.outputs) == 1.0
    assert ruler.score_prediction(s.outputs[0], s.outputs) == 0.25
    rows = ruler.score_results([
        {"task": "vt", "target_length": 1024, "outputs": ["AAAAA", "BBBBB"], "pred": "AAAAA BBBBB"},
        {"task": "vt", "target_length": 1024, "outputs": ["AAAAA", "BBBBB"], "pred": "aaaaa"},
        {"task": "fwe", "target_length": 1024, "outputs": ["x"], "pred": "nothing"},
    ])
    by = {r["task"]: r for r in rows}
    assert by["vt"]["score"] == pytest.approx(75.0) and by["vt"]["n"] == 2
    assert by["fwe"]["score"] == 0.0
    assert by["average"]["score"] == pytest.approx(37.5)


def test_too_short_length_is_an_error(gen):
    with pytest.raises(ValueError):
        gen.generate("vt", 100, 1)


def test_niah_grid_and_heatmap(hf_tokenizer, tmp_path):
    samples = niah.grid_samples(hf_tokenizer, [512, 1024], depths=[0, 50, 100], samples_per_cell=2)
    assert len(samples) == 2 * 3 * 2
    recs = []
    for i, s in enumerate(samples):
        d = s.to_dict()
        d["pred"] = " ".join(s.outputs) if i % 2 == 0 else "no idea"
        recs.append(d)
    rows = niah.score_grid(recs)
    assert len(rows) == 6 and all(r["score"] == 0.5 and r["n"] == 2 for r in rows)
    png = niah.plot_heatmap(rows, str(tmp_path / "grid.png"), title="test")
    data = open(png, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


def test_parse_length():
    assert [parse_length(x) for x in ("4k", "4K", " 1.5k", "3000")] == [4096, 4096, 1536, 3000]
    with pytest.raises(ValueError):
        parse_length("four")


def test_chat_template_tokens_is_the_template_around_an_empty_turn(smollm2_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    wrapped = tok.apply_chat_template([{"role": "user", "content": "hello there"}], tokenize=False,
                                      add_generation_prompt=True)
    body = len(tok.encode("hello there", add_special_tokens=False))
    n = chat_template_tokens(tok)
    assert n > 0 and n == len(tok.encode(wrapped, add_special_tokens=False)) - body

"""RULER-style synthetic tasks, generated locally at any length with the model's tokenizer.

Follows NVIDIA RULER (``scripts/data/synthetic``: niah.py, variable_tracking.py,
common_words_extraction.py, freq_words_extraction.py, constants.py, synthetic.yaml): the same
templates, answer prefixes, task configurations, tokens to generate, and scoring (``string_match_all``
after ``postprocess_pred``; a sample's score is the fraction of its reference strings found in the
prediction, the task score its mean x 100).

Differences from RULER, on purpose:
- keys are ``adjective-noun`` pairs from a built-in list (RULER uses the ``wonderwords`` lists) and the
  common-words pool is the essays' own vocabulary (RULER: wonderwords + an English word list);
- every sample starts its essay haystack at a random word offset (RULER always starts at the first
  essay), so samples differ in their haystack as well as their needles;
- ``depth`` may be fixed (the needle grid) and is then matched on the *character* fraction of the
  context at a sentence boundary; each sample records the measured token depth of every needle;
- ``corpus``: the essay-haystack tasks can draw their haystack from Python's standard-library
  sources instead (``"code"``: whole lines, needles between lines), or from either per sample
  (``"mixed"``), so that a method is not tuned to one kind of text;
- ``vary_needles``: each niah sample takes one of ``NEEDLE_PHRASINGS`` (RULER's wording is the first)
  for its needles, question and answer prefix; the answers (the values) are scored as RULER does.

Length convention (RULER's ``max_seq_length``): tokens(input + answer_prefix) + tokens_to_generate
+ model_template_tokens <= length, as close to it as the haystack granularity allows.

The prompt sent to a model is ``input`` (chat: as the user message) followed by ``answer_prefix``
(completion: appended to the text; chat: as a partial assistant message to continue).
"""

from __future__ import annotations

import random
import string
import uuid
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

from . import haystack as hs
from .metrics import mean_ci95, ruler_postprocess, string_match_all
from .tokenization import TokenizerLike, as_tokenizer

TEMPLATES = {
    "niah": (
        "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize "
        "it. I will quiz you about the {type_needle_v} afterwards.\n{context}\nWhat are all the special "
        "magic {type_needle_v} for {query} mentioned in the provided text?",
        " The special magic {type_needle_v} for {query} mentioned in the provided text are",
    ),
    "variable_tracking": (
        "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
        "{context}\nQuestion: Find all variables that are assigned the value {query} in the text above.",
        " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables "
        "are assigned the value {query}, they are: ",
    ),
    "common_words_extraction": (
        "Below is a numbered list of words. In these words, some appear more often than others. Memorize "
        "the ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the "
        "above list?",
        " Answer: The top 10 words that appear most often in the list are:",
    ),
    "freq_words_extraction": (
        "Read the following coded text and track the frequency of each coded word. Find the three most "
        "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please "
        "ignore the dots '....'. What are the three most frequently appeared words in the above coded text?",
        " Answer: According to the coded text above, the three most frequently appeared words are:",
    ),
}
TOKENS_TO_GENERATE = {"niah": 128, "variable_tracking": 30, "common_words_extraction": 120,
                      "freq_words_extraction": 50}

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
# Other wordings of the same task (vary_needles): needle, then the template's intro and question and
# the answer prefix, each as (several answers, one answer). {v}: "numbers"/"words"/"uuids", {v1}: singular.
NEEDLE_PHRASINGS = [
    None,  # RULER's own: TEMPLATES["niah"] and NEEDLE
    {"needle": "The secret {v1} assigned to {key} is {value}.",
     "template": ("Secret {v} assigned to certain names are hidden in the text below. Read it carefully; "
                  "you will be asked for them afterwards.\n{context}\nList every secret {v1} assigned to "
                  "{query} in the text above.",
                  "A secret {v1} assigned to a name is hidden in the text below. Read it carefully; you "
                  "will be asked for it afterwards.\n{context}\nWhich secret {v1} is assigned to {query} "
                  "in the text above?"),
     "prefix": (" The secret {v} assigned to {query} are", " The secret {v1} assigned to {query} is")},
    {"needle": "Remember this: the access {v1} of {key} is {value}.",
     "template": ("The following document contains access {v} for several names. Keep them in mind.\n"
                  "{context}\nQuestion: what are the access {v} of {query}?",
                  "The following document contains an access {v1} for a name. Keep it in mind.\n"
                  "{context}\nQuestion: what is the access {v1} of {query}?"),
     "prefix": (" Answer: the access {v} of {query} are", " Answer: the access {v1} of {query} is")},
    {"needle": "Note for later: {key} goes with the {v1} {value}.",
     "template": ("Read the notes below. Some of them pair a name with a {v1}.\n{context}\n"
                  "Which {v} go with {query} according to the notes?",
                  "Read the notes below. One of them pairs a name with a {v1}.\n{context}\n"
                  "Which {v1} goes with {query} according to the notes?"),
     "prefix": (" According to the notes, the {v} that go with {query} are",
                " According to the notes, the {v1} that goes with {query} is")},
]
CORPORA = ("essay", "code", "mixed")
DEPTHS = [int(round(100 * i / 39)) for i in range(40)]  # np.round(np.linspace(0, 100, 40))


def _niah(hay, k, v, nk=1, nv=1, nq=1):
    return {"kind": "niah", "type_haystack": hay, "type_needle_k": k, "type_needle_v": v,
            "num_needle_k": nk, "num_needle_v": nv, "num_needle_q": nq}


# RULER's synthetic.yaml (without the qa tasks, which need SQuAD / HotpotQA)
TASKS: dict[str, dict[str, Any]] = {
    "niah_single_1": _niah("noise", "words", "numbers"),
    "niah_single_2": _niah("essay", "words", "numbers"),
    "niah_single_3": _niah("essay", "words", "uuids"),
    "niah_multikey_1": _niah("essay", "words", "numbers", nk=4),
    "niah_multikey_2": _niah("needle", "words", "numbers"),
    "niah_multikey_3": _niah("needle", "uuids", "uuids"),
    "niah_multivalue": _niah("essay", "words", "numbers", nv=4),
    "niah_multiquery": _niah("essay", "words", "numbers", nq=4),
    "vt": {"kind": "variable_tracking", "num_chains": 1, "num_hops": 4},
    "cwe": {"kind": "common_words_extraction", "freq_cw": 30, "freq_ucw": 3, "num_cw": 10},
    "fwe": {"kind": "freq_words_extraction", "alpha": 2.0},
}

_ADJS = ("able acid angry automatic awake bad bent bitter black blue boiling bright broken brown "
         "calm cheap chief clean clear cold common complex cool cruel curved dark dear deep "
         "delicate dirty dry early elastic electric equal false fat feeble female fertile "
         "fixed flat foolish free frequent full future general good gray great green hanging "
         "happy hard healthy high hollow ill important kind last late left level light long "
         "loose loud low male married material medical military mixed narrow natural necessary "
         "new normal old open opposite parallel past physical political poor possible present "
         "private probable public quick quiet ready red regular responsible right rough round "
         "sad safe same second secret separate serious sharp short shut simple slow small smooth "
         "soft solid special sticky stiff straight strange strong sudden sweet tall thick thin "
         "tight tired true violent waiting warm wet white wide wise wrong yellow young").split()
_NOUNS = ("account acorn actor airport angle animal answer ant apple arch arm army art aunt baby "
          "badge bag ball band banjo basin basket bath bean bear bed bee bell berry bird blade "
          "board boat bone book boot bottle box boy brain brake branch brick bridge brush bucket "
          "bulb button cake camera canvas card carpet cart cat chain chalk cheese cherry chest "
          "chicken chin church circle clock cloud coat collar comb copper cord cow crate crayon "
          "cup curtain cushion desk diamond dinner dog door drain drawer dress drum duck eagle "
          "ear egg engine eye face farm feather fence finger fish flag floor flower fly foot fork "
          "fowl frame garden girl glove goat grain grape guitar hammer hand harbor hat heart horn "
          "horse hose house island jewel kettle key kite knee knife knot lamp leaf leg library "
          "lizard lock map mask match meadow monkey moon mouth muscle nail needle nest net nose "
          "nut oven owl parcel pen pencil piano picture pig pin pipe plane plate plough pocket "
          "pot potato prison pump rail rat receipt ring river rod roof root sail school scissors "
          "screw seed sheep shelf ship shirt shoe skate skirt snake sock spade sponge spoon spring "
          "square stamp star station stem stick stocking stomach store street sun table tail "
          "thread throat thumb ticket toe tongue tooth town train tray tree trousers turtle "
          "umbrella valley violin wall watch wheel whip whistle window wing wire worm").split()
KEY_WORDS = sorted({f"{a}-{n}" for a in _ADJS for n in _NOUNS})


@dataclass
class Sample:
    id: str
    task: str
    input: str
    answer_prefix: str
    outputs: list[str]
    length: int  # tokens of input + answer_prefix (the prompt), without the chat template
    max_tokens: int  # tokens to generate
    target_length: int  # the requested max_seq_length
    meta: dict = field(default_factory=dict)

    @property
    def prompt(self) -> str:
        return self.input + self.answer_prefix

    def to_dict(self) -> dict:
        return asdict(self)


def score_prediction(pred: str, outputs: Sequence[str]) -> float:
    """RULER's per-sample score for niah/vt/cwe/fwe, in [0, 1]."""
    return string_match_all(ruler_postprocess(pred), outputs)


def score_task(preds: Sequence[str], outputs: Sequence[Sequence[str]]) -> dict:
    """Task score x 100 (RULER's scale) with a 95% half-width."""
    per = [score_prediction(p, o) for p, o in zip(preds, outputs)]
    m, hw, n = mean_ci95(per)
    return {"score": 100 * m, "ci95": 100 * hw, "n": n}


class RulerGenerator:
    """Generates RULER-style samples for one tokenizer.

    ``haystack_path``: where the Paul Graham essays are (see ``haystack.find_essays``); needed for the
    essay-haystack tasks and for cwe's word pool. ``model_template_tokens``: tokens the chat template
    will add, subtracted from the length budget. ``corpus`` (``CORPORA``) and ``vary_needles``: see
    the module docstring; the defaults reproduce RULER's text (and the sample ids of earlier runs).
    """

    def __init__(self, tokenizer: Any, haystack_path: str | None = None, seed: int = 42,
                 model_template_tokens: int = 0, corpus: str = "essay", vary_needles: bool = False):
        if corpus not in CORPORA:
            raise ValueError(f"corpus must be one of {CORPORA}, got {corpus!r}")
        self.tok: TokenizerLike = as_tokenizer(tokenizer)
        self.haystack_path = haystack_path
        self.seed = seed
        self.model_template_tokens = model_template_tokens
        self.corpus = corpus
        self.vary_needles = vary_needles
        self._essay_words: list[str] | None = None
        self._vocab: list[str] | None = None
        self._code_lines: list[str] | None = None
        self._ntok_cache: dict[str, int] = {}

    # ----------------------------------------------------------------- helpers
    def ntok(self, text: str) -> int:
        """Token count, remembered for the last few texts (a fit's best text is counted again)."""
        n = self._ntok_cache.get(text)
        if n is None:
            n = len(self.tok.encode(text))
            if len(self._ntok_cache) >= 8:
                self._ntok_cache.pop(next(iter(self._ntok_cache)))
            self._ntok_cache[text] = n
        return n

    @property
    def essay_words(self) -> list[str]:
        if self._essay_words is None:
            self._essay_words = hs.essay_words(self.haystack_path)
        return self._essay_words

    @property
    def code_lines(self) -> list[str]:
        """Non-blank lines of the standard library's sources (the code haystack)."""
        if self._code_lines is None:
            self._code_lines = [ln for ln in hs.code_corpus().split("\n") if ln.strip()]
        return self._code_lines

    @property
    def vocab(self) -> list[str]:
        if self._vocab is None:
            self._vocab = sorted(hs.vocabulary(self.haystack_path, min_len=3))
        return self._vocab

    def _fit(self, build: Callable[[int], tuple[str, Any]], budget: int, lo: int, probe: int) -> int:
        """Largest n >= lo with ntok(build(n)[0]) <= budget (build is deterministic, ntok grows with n).

        A bracketing secant search: tokens are close to linear in n, so the interpolated guess is
        usually within a unit or two and a fit takes ~5 tokenizations instead of a bisection's ~15
        (what makes 32K-token suites cheap to generate). The bracket shrinks every step, and a step
        that shrinks it by less than half is followed by a bisection, so it always ends."""
        def t(n: int) -> int:
            return self.ntok(build(n)[0])

        t_lo = t(lo)
        if t_lo > budget:
            raise ValueError(f"length budget {budget} tokens is too small for this task")
        probe = max(probe, 2 * lo)
        t_p = t(probe)
        # tokens per unit; at least a quarter of the probe's average, so a flat start (the ICL
        # example's fixed text) cannot send the first guess to an enormous n
        slope = max((t_p - t_lo) / (probe - lo), 0.25 * t_p / probe)
        ok, t_ok = lo, t_lo  # largest n known to fit
        if t_p <= budget:
            ok, t_ok = probe, t_p
        bad, t_bad = (probe, t_p) if t_p > budget else (None, None)  # smallest n known not to fit
        while bad is None:  # extrapolate (with a margin) until an n that does not fit is found
            n = ok + max(1, int((budget - t_ok) / slope * 1.02) + 1)
            tn = t(n)
            if tn <= budget:
                slope = max((tn - t_ok) / (n - ok), 1e-3)
                ok, t_ok = n, tn
            else:
                bad, t_bad = n, tn
        bisect = False
        while bad - ok > 1:
            if bisect:
                n = (ok + bad) // 2
            else:
                n = ok + int((budget - t_ok) * (bad - ok) / max(t_bad - t_ok, 1))
                n = min(max(n, ok + 1), bad - 1)
            width = bad - ok
            if t(n) <= budget:
                ok, t_ok = n, t(n)
            else:
                bad, t_bad = n, t(n)
            bisect = (bad - ok) > width // 2 and not bisect
        return ok

    def _random_value(self, rng: random.Random, kind: str) -> str:
        if kind == "numbers":
            return str(rng.randint(10**6, 10**7 - 1))
        if kind == "words":
            return rng.choice(KEY_WORDS)
        if kind == "uuids":
            return str(uuid.UUID(int=rng.getrandbits(128), version=4))
        raise ValueError(f"unknown needle type {kind!r}")

    def _essay_slice(self, offset: int, n: int) -> str:
        w = self.essay_words
        if offset + n <= len(w):
            return " ".join(w[offset:offset + n])
        reps = (offset + n) // len(w) + 1
        return " ".join((w * reps)[offset:offset + n])

    # ----------------------------------------------------------------- public API
    def generate(self, task: str, length: int, num_samples: int, depth: float | None = None,
                 tokens_to_generate: int | None = None) -> list[Sample]:
        """``num_samples`` samples of ``task`` at ``length`` (RULER's max_seq_length).

        ``depth`` (percent, 0-100) fixes the needle depth of single-needle niah tasks (the needle
        grid); default: RULER's random depths.
        """
        if task not in TASKS:
            raise KeyError(f"unknown RULER task {task!r}; known: {sorted(TASKS)}")
        cfg = TASKS[task]
        kind = cfg["kind"]
        gen = TOKENS_TO_GENERATE[kind] if tokens_to_generate is None else tokens_to_generate
        budget = length - gen - self.model_template_tokens
        out = []
        for i in range(num_samples):
            sseed = zlib.crc32(f"{self.seed}|{task}|{length}|{i}|{depth}".encode())
            fn = {"niah": self._niah, "variable_tracking": self._vt,
                  "common_words_extraction": self._cwe, "freq_words_extraction": self._fwe}[kind]
            s = fn(task, cfg, sseed, budget, length, depth)
            s.id = (f"{task}-{length}-{i}" + ("" if depth is None else f"-d{depth:g}") + f"-s{self.seed}"
                    + ("" if self.corpus == "essay" else f"-c{self.corpus}") + ("-pv" if self.vary_needles else ""))
            s.max_tokens = gen
            s.target_length = length
            out.append(s)
        return out

    # ----------------------------------------------------------------- niah
    def _niah(self, task, cfg, sseed, budget, length, depth) -> Sample:
        nk = max(cfg["num_needle_k"], cfg["num_needle_q"])
        nv, nq = cfg["num_needle_v"], cfg["num_needle_q"]
        hay, tk, tv = cfg["type_haystack"], cfg["type_needle_k"], cfg["type_needle_v"]
        rng0 = random.Random(sseed)
        # drawn from their own stream so that the default options keep RULER's samples unchanged
        rng_opt = random.Random(sseed ^ 0x5EED)
        phrasing = NEEDLE_PHRASINGS[rng_opt.randrange(len(NEEDLE_PHRASINGS))] if self.vary_needles else None
        corpus = self.corpus if self.corpus != "mixed" else rng_opt.choice(("essay", "code"))
        needle_t = NEEDLE if phrasing is None else phrasing["needle"].replace("{v1}", tv[:-1])
        keys, values, needles = [], [], []
        while len(keys) < nk:
            k = self._random_value(rng0, tk)
            if k not in keys:
                keys.append(k)
        for k in keys:
            vals = [self._random_value(rng0, tv) for _ in range(nv)]
            values.append(vals)
            needles += [needle_t.format(type_needle_v=tv, key=k, value=v) for v in vals]
        rng0.shuffle(needles)
        qidx = rng0.sample(range(nk), nq)
        queries = [keys[i] for i in qidx]
        answers = [a for i in qidx for a in values[i]]
        query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
        if depth is not None:
            depths = [float(depth)] * len(needles)
        else:
            depths = sorted(float(d) for d in rng0.sample(DEPTHS, len(needles)))
        units = self.code_lines if (hay == "essay" and corpus == "code") else self.essay_words
        offset = rng0.randrange(len(units)) if hay == "essay" else 0
        hay_seed = rng0.getrandbits(32)

        single = nq * nv == 1
        if phrasing is None:
            template, prefix = TEMPLATES["niah"]
            tvs = tv
            if single:  # RULER's singular wording, applied to template + answer prefix
                def sing(t):
                    return t.replace("Some", "A").replace("are all", "is").replace("are", "is").replace(
                        "answers", "answer")
                template, prefix, tvs = sing(template), sing(prefix), tv[:-1]
            answer_prefix = prefix.format(type_needle_v=tvs, query=query)
        else:
            template = phrasing["template"][single].replace("{v1}", tv[:-1]).replace("{v}", tv)
            answer_prefix = phrasing["prefix"][single].format(v=tv, v1=tv[:-1], query=query)
            tvs = tv

        def segments(n: int) -> tuple[list[str], str]:
            if corpus == "code":
                lines = self.code_lines
                return [lines[(offset + j) % len(lines)] for j in range(n)], "\n"
            return hs.split_sentences(self._essay_slice(offset, n)), " "

        def context_for(n: int) -> str:
            if hay == "essay":
                sents, sep = segments(n)
                cum, tot = [0], 0
                for s_ in sents:
                    tot += len(s_) + 1
                    cum.append(tot)
                pos = [min(range(len(cum)), key=lambda j: abs(cum[j] / max(tot, 1) - d / 100))
                       for d in depths]
                parts, last = [], 0
                for p, nd in zip(pos, needles):
                    parts.append(sep.join(sents[last:p]))
                    parts.append(nd)
                    last = p
                parts.append(sep.join(sents[last:]))
                return sep.join(x for x in parts if x)
            r = random.Random(hay_seed)
            if hay == "noise":
                sents = [NOISE] * n
            else:  # "needle": a haystack of distractor needles with other keys
                sents = []
                while len(sents) < n:
                    k = self._random_value(r, tk)
                    if k not in keys:
                        sents.append(needle_t.format(type_needle_v=tv, key=k, value=self._random_value(r, tv)))
            # insert from the deepest position down so earlier indexes stay valid
            idx = [min(n, int(round(n * d / 100))) for d in depths]
            for p, nd in sorted(zip(idx, needles), key=lambda x: -x[0]):
                sents.insert(p, nd)
            return "\n".join(sents)

        def build(n: int):
            ctx = context_for(n)
            inp = template.format(type_needle_v=tvs, context=ctx, query=query)
            return inp + answer_prefix, (inp, ctx)

        probe = (25 if corpus == "code" else 500) if hay == "essay" else 25
        n = self._fit(build, budget, 1, probe)
        prompt, (inp, ctx) = build(n)
        # measured token depth of each needle within the context
        ctx_tokens = self.ntok(ctx)
        measured = []
        for nd in needles:
            at = ctx.index(nd)
            measured.append(round(100 * self.ntok(ctx[:at]) / max(ctx_tokens, 1), 2))
        return Sample(id="", task=task, input=inp, answer_prefix=answer_prefix, outputs=answers,
                      length=self.ntok(prompt), max_tokens=0, target_length=length,
                      meta={"depths": depths, "token_depths": measured, "haystack_units": n,
                            "context_tokens": ctx_tokens, "keys": queries,
                            "corpus": corpus if hay == "essay" else hay,
                            "phrasing": 0 if phrasing is None else NEEDLE_PHRASINGS.index(phrasing)})

    # ----------------------------------------------------------------- variable tracking
    def _vt_text(self, rng: random.Random, n: int, num_chains: int, num_hops: int, icl: bool):
        k = 3 if icl else 5
        nvars = (num_hops + 1) * num_chains
        vars_all: list[str] = []
        while len(vars_all) < nvars:
            v = "".join(rng.choices(string.ascii_uppercase, k=k))
            if v not in vars_all:
                vars_all.append(v)
        chains, var_groups = [], []
        for c in range(num_chains):
            vs = vars_all[c * (num_hops + 1):(c + 1) * (num_hops + 1)]
            var_groups.append(vs)
            val = "12345" if icl else str(rng.randint(10000, 99998))
            chain = [f"VAR {vs[0]} = {val}"] + [f"VAR {vs[j + 1]} = VAR {vs[j]} " for j in range(num_hops)]
            chains.append(chain)
        value = chains[0][0].split("=")[-1].strip()
        sents = [NOISE] * n
        for chain in chains:
            positions = sorted(rng.sample(range(len(sents)), len(chain)))
            for j, p in enumerate(positions):
                sents.insert(p + j, chain[j])
        context = "\n".join(sents).replace(". \n", ".\n")
        template, prefix = TEMPLATES["variable_tracking"]
        inp = template.format(context=context, query=value, num_v=num_hops + 1)
        ap = prefix.format(query=value, num_v=num_hops + 1)
        return inp, ap, var_groups[0]

    def _vt(self, task, cfg, sseed, budget, length, depth) -> Sample:
        nc, nh = cfg["num_chains"], cfg["num_hops"]
        icl_seed = random.Random(sseed).getrandbits(32)

        # one-shot example as RULER: 3-letter variables, value 12345, fit to 500 tokens, then
        # randomized (new variable names and value)
        def build_icl(n):
            inp, ap, vs = self._vt_text(random.Random(icl_seed), n, nc, nh, icl=True)
            return inp + ap + " " + " ".join(vs) + "\n", vs
        icl_text, icl_vars = build_icl(self._fit(build_icl, 500, nh + 1, 5))
        r = random.Random(icl_seed + 1)
        for v in icl_vars:
            icl_text = icl_text.replace(v, "".join(r.choices(string.ascii_uppercase, k=len(v))))
        icl_text = icl_text.replace("12345", str(r.randint(10000, 99998)))
        icl_tokens = self.ntok(icl_text)

        def build(n):
            inp, ap, vs = self._vt_text(random.Random(sseed), n, nc, nh, icl=False)
            inp = icl_text + inp
            return inp + ap, (inp, ap, vs)

        n = self._fit(build, budget, nh + 1, 25)
        prompt, (inp, ap, vs) = build(n)
        return Sample(id="", task=task, input=inp, answer_prefix=ap, outputs=vs,
                      length=self.ntok(prompt), max_tokens=0, target_length=length,
                      meta={"haystack_units": n, "icl_tokens": icl_tokens})

    # ----------------------------------------------------------------- common words
    def _cwe(self, task, cfg, sseed, budget, length, depth) -> Sample:
        num_cw = cfg["num_cw"]
        if length < 4096:
            ex_args, main_rep = (20, 3, 1), (6, 1)
        else:
            ex_args, main_rep = (40, 10, 3), (cfg["freq_cw"], cfg["freq_ucw"])
        pool = self.vocab
        template, prefix = TEMPLATES["common_words_extraction"]

        def example(rng, num_words, crep, urep):
            words = rng.sample(pool, min(num_words, len(pool)))
            common, uncommon = words[:num_cw], words[num_cw:]
            lst = common * crep + uncommon * urep
            rng.shuffle(lst)
            return " ".join(f"{i + 1}. {w}" for i, w in enumerate(lst)), common

        def build(n):
            rng = random.Random(sseed)
            ex_ctx, ex_ans = example(rng, *ex_args)
            shot = (template.format(context=ex_ctx) + prefix + " "
                    + " ".join(f"{i + 1}. {w}" for i, w in enumerate(ex_ans)))
            ctx, ans = example(rng, n, *main_rep)
            inp = shot + "\n" + template.format(context=ctx)
            return inp + prefix, (inp, ans)

        n = self._fit(build, budget, num_cw + 1, 200)
        if n > len(pool):
            raise ValueError(f"cwe at {length} tokens needs {n} distinct words, the pool has {len(pool)}")
        prompt, (inp, ans) = build(n)
        return Sample(id="", task=task, input=inp, answer_prefix=prefix, outputs=ans,
                      length=self.ntok(prompt), max_tokens=0, target_length=length,
                      meta={"num_words": n})

    # ----------------------------------------------------------------- frequent words
    def _fwe(self, task, cfg, sseed, budget, length, depth) -> Sample:
        alpha = cfg["alpha"]
        vocab_size = max(budget // 50, 10)
        rng = random.Random(sseed)
        vocab: set[str] = set()
        while len(vocab) < vocab_size:
            vocab.add("".join(rng.choices(string.ascii_lowercase, k=6)))
        vocab_l = sorted(vocab)
        rng.shuffle(vocab_l)
        vocab_l[0] = "..."  # the top-ranked word is noise
        zeta = sum(k ** -alpha for k in range(1, 100_000)) + 1 / ((alpha - 1) * 100_000 ** (alpha - 1))
        template, prefix = TEMPLATES["freq_words_extraction"]
        shuffle_seed = rng.getrandbits(32)

        def build(n):
            words = []
            for k, w in enumerate(vocab_l, 1):
                words += [w] * int(n * k ** -alpha / zeta)
            random.Random(shuffle_seed).shuffle(words)
            inp = template.format(context=" ".join(words))
            return inp + prefix, inp

        n = self._fit(build, budget, 50, max(budget // 6, 60))
        prompt, inp = build(n)
        return Sample(id="", task=task, input=inp, answer_prefix=prefix, outputs=vocab_l[1:4],
                      length=self.ntok(prompt), max_tokens=0, target_length=length,
                      meta={"num_words": n, "vocab_size": vocab_size})


def generate_suite(tokenizer: Any, lengths: Sequence[int], num_samples: int,
                   tasks: Sequence[str] | None = None, haystack_path: str | None = None,
                   seed: int = 42, model_template_tokens: int = 0) -> list[Sample]:
    g = RulerGenerator(tokenizer, haystack_path, seed, model_template_tokens)
    out = []
    for L in lengths:
        for t in tasks or TASKS:
            out += g.generate(t, L, num_samples)
    return out


def score_results(results: Sequence[dict]) -> list[dict]:
    """Rows per (task, target_length) from result records ({"task", "target_length", "outputs",
    "pred"}), plus an "average" row per length (mean of task scores, as RULER reports)."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["task"], r["target_length"]), []).append(r)
    rows = []
    for (task, L), rs in sorted(groups.items(), key=lambda x: (x[0][1], x[0][0])):
        s = score_task([r["pred"] for r in rs], [r["outputs"] for r in rs])
        rows.append({"suite": "ruler", "task": task, "context": L, **s})
    for L in sorted({r["context"] for r in rows}):
        sc = [r["score"] for r in rows if r["context"] == L]
        rows.append({"suite": "ruler", "task": "average", "context": L,
                     "score": sum(sc) / len(sc), "ci95": float("nan"),
                     "n": sum(r["n"] for r in rows if r["context"] == L and r["task"] != "average")})
    return rows


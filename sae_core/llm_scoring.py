"""Explaining a latent with an LLM and scoring the explanation (SAEBench / Eleuther autointerp).

* explanation: the LLM reads the latent's top contexts, the tokens where it fires marked
  ``<<like this>>``, and names what it detects in a short phrase;
* detection: the scorer sees the explanation and one held-out context at a time (activating
  ones and non-activating ones, unmarked) and says whether the latent fires in it;
* fuzzing: the scorer sees a held-out activating context with marked tokens — the tokens
  where the latent fires, or (for a seeded half of the contexts) as many other tokens — and
  says whether the marks are right;
* refinement (SAGE): the explainer proposes test sentences, reads the latent's activations on
  them and revises its explanation, for a bounded number of rounds.

A judgement counts as "yes" when P(yes) ≥ 0.5 (or its text says yes); a latent's detection
and fuzzing scores are the balanced accuracy of those calls and, when every call has P(yes),
the AUROC of P(yes). Every call is returned as a :class:`Call`, so a run can be audited and
re-scored from its transcript.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from sae_core.llm import JUDGE_TOKENS, LLM, TURN, Answer, judge_all

MARK_OPEN, MARK_CLOSE = "<<", ">>"
MAX_EXPLANATION_CHARS = 200
NO_EXPLANATION = "(no explanation)"


@dataclass(frozen=True)
class Snippet:
    """A context window: the tokenizer's pieces and the latent's code at each."""

    pieces: tuple[str, ...]
    activations: tuple[float, ...]

    def firing(self) -> set[int]:
        return {i for i, a in enumerate(self.activations) if a > 0}


@dataclass(frozen=True)
class Call:
    """One LLM call: what for (step, item), the prompt, the answer and, for a judgement, the truth."""

    step: str                 # explain, propose, revise, detect or fuzz
    item: int                 # index within the step (refinement: the round)
    kind: str                 # generate or judge
    max_new_tokens: int
    prompt: str
    answer: str
    p_yes: float | None = None
    truth: bool | None = None

    @property
    def says_yes(self) -> bool:
        return Answer(self.answer, self.p_yes).says_yes


def render(pieces: Sequence[str], marked: set[int] = frozenset()) -> str:
    """Text of tokenizer pieces, ``marked`` ones wrapped in <<>>: BPE pieces (Ġ / ▁ for a space)
    are joined as they are, WordPiece pieces with spaces except ``##`` continuations."""
    bpe = any(p.startswith(("Ġ", "▁", "Ċ")) for p in pieces)
    out = []
    for i, piece in enumerate(pieces):
        if bpe:
            text = piece.replace("Ġ", " ").replace("▁", " ").replace("Ċ", "\n")
            space, text = (" ", text[1:]) if text.startswith(" ") else ("", text)
        else:
            space, text = ("", piece[2:]) if piece.startswith("##") else (" " if out else "", piece)
        out.append(space + (f"{MARK_OPEN}{text}{MARK_CLOSE}" if i in marked else text))
    return "".join(out).strip()


#: a worked example shown before the question (one user turn and its answer): small chat models answer
#: with a short phrase after it instead of restating the snippets (SmolLM2-135M: 'politics' for a latent
#: on democrat/protesters/delegates, where the bare question gave 'despite')
EXAMPLE_SNIPPETS = ("shares in the <<bank>> rose", "the <<market>> fell after the <<bank>> said", "<<investors>> sold <<stocks>>")
EXAMPLE_ANSWER = "finance and markets"


def _explanation_question(lines: str) -> str:
    return (f"Here are text snippets. In each, some words are wrapped in {MARK_OPEN} and {MARK_CLOSE}.\n\n{lines}\n\n"
            "Name the topic or kind of word that the wrapped words share, in at most five words.")


def explanation_prompt(snippets: Sequence[Snippet]) -> str:
    """The explainer's prompt: the worked example (two chat turns), then the latent's top contexts."""
    example = "\n".join(f"{i}. {text}" for i, text in enumerate(EXAMPLE_SNIPPETS, start=1))
    lines = "\n".join(f"{i}. {render(s.pieces, s.firing())}" for i, s in enumerate(snippets, start=1))
    return TURN.join([_explanation_question(example), EXAMPLE_ANSWER, _explanation_question(lines)])


def parse_explanation(text: str) -> str:
    """The first non-empty line of an answer, without list marks, quotes or a lead-in ('The neuron detects',
    'The topic ... is'); capped at MAX_EXPLANATION_CHARS."""
    for line in text.splitlines():
        line = re.sub(r"^(\s*[-*\d.]+\s+)|(\*\*)", "", line).strip()
        line = re.sub(r"^(the )?neuron (detects|fires on)[: ]\s*", "", line, flags=re.I)
        line = re.sub(r"^the (topic|kind|wrapped words)[^\"':]*?(\bis\b|\bare\b|:)\s*", "", line, flags=re.I)
        line = re.sub(r"\b(\w+)(?: and \1\b)+", r"\1", line.strip().strip("\"'.").strip())  # 'politics and politics and ...'
        if line:
            return line[:MAX_EXPLANATION_CHARS]
    return NO_EXPLANATION


def detection_prompt(explanation: str, snippet: Snippet) -> str:
    return (f"A neuron in a language model detects: {explanation}\n\nText: {render(snippet.pieces)}\n\n"
            "Does the neuron fire anywhere in this text? Answer Yes or No.")


def fuzzing_prompt(explanation: str, snippet: Snippet, marked: set[int]) -> str:
    return (f"A neuron in a language model detects: {explanation}\n\nIn the text below some words are wrapped in "
            f"{MARK_OPEN} and {MARK_CLOSE}.\n\nText: {render(snippet.pieces, marked)}\n\n"
            "Does the neuron fire on the wrapped words? Answer Yes or No.")


def explain(llm: LLM, snippets: Sequence[Snippet], max_new_tokens: int) -> tuple[str, list[Call]]:
    prompt = explanation_prompt(snippets)
    answer = llm.generate(prompt, max_new_tokens)
    return parse_explanation(answer.text), [Call("explain", 0, "generate", max_new_tokens, prompt, answer.text)]


def _judge(llm: LLM, step: str, items: list[tuple[int, str, bool]]) -> list[Call]:
    """Judge (item, prompt, truth) triples (batched where the backend can)."""
    answers = judge_all(llm, [prompt for _, prompt, _ in items])
    return [Call(step, i, "judge", JUDGE_TOKENS, prompt, a.text, a.p_yes, truth) for (i, prompt, truth), a in zip(items, answers)]


def detect(llm: LLM, explanation: str, positives: Sequence[Snippet], negatives: Sequence[Snippet],
           rng: np.random.Generator) -> list[Call]:
    """Judge each held-out context alone, in a seeded order; truth: whether it activates."""
    items = [(s, True) for s in positives] + [(s, False) for s in negatives]
    order = rng.permutation(len(items))
    return _judge(llm, "detect", [(n, detection_prompt(explanation, items[i][0]), items[i][1]) for n, i in enumerate(order)])


def fuzz_marks(snippet: Snippet, wrong: bool, rng: np.random.Generator) -> set[int]:
    """The tokens marked in a fuzzing item: where the latent fires, or (wrong) as many tokens
    drawn from those where it does not (all of them when there are fewer)."""
    firing = snippet.firing()
    if not wrong:
        return firing
    quiet = [i for i in range(len(snippet.pieces)) if i not in firing]
    return {int(i) for i in rng.choice(quiet, min(len(firing), len(quiet)), replace=False)} if quiet else set()


def fuzz(llm: LLM, explanation: str, snippets: Sequence[Snippet], rng: np.random.Generator) -> list[Call]:
    """Judge each activating context with marks; a seeded half (rounded down) carries wrong marks."""
    wrong = np.zeros(len(snippets), dtype=bool)
    wrong[rng.permutation(len(snippets))[: len(snippets) // 2]] = True
    items = []
    for i, (snippet, bad) in enumerate(zip(snippets, wrong)):
        marks = fuzz_marks(snippet, bool(bad), rng)
        if bad and (not marks or marks == snippet.firing()):
            continue  # no token is quiet: no wrong marking exists
        items.append((i, fuzzing_prompt(explanation, snippet, marks), not bad))
    return _judge(llm, "fuzz", items)


def balanced_accuracy(truth: Sequence[bool], predicted: Sequence[bool]) -> float:
    """Mean over the classes present of the fraction predicted right (TPR + TNR) / 2."""
    t, p = np.asarray(truth, dtype=bool), np.asarray(predicted, dtype=bool)
    if t.size == 0:
        raise ValueError("balanced_accuracy needs at least one item")
    return float(np.mean([(p[t == c] == c).mean() for c in (True, False) if (t == c).any()]))


def auroc(truth: Sequence[bool], scores: Sequence[float]) -> float | None:
    """P(score of a random positive > score of a random negative), ties counting 1/2; None
    without both classes (the Mann-Whitney U / (n₊ n₋))."""
    t, s = np.asarray(truth, dtype=bool), np.asarray(scores, dtype=float)
    pos, neg = s[t], s[~t]
    if pos.size == 0 or neg.size == 0:
        return None
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins / (pos.size * neg.size))


def scores(calls: Sequence[Call]) -> tuple[float | None, float | None]:
    """(balanced accuracy, AUROC of P(yes) or None) of judgement calls; (None, None) without any."""
    if not calls:
        return None, None
    truth = [c.truth for c in calls]
    accuracy = balanced_accuracy(truth, [c.says_yes for c in calls])
    if any(c.p_yes is None for c in calls):
        return accuracy, None
    return accuracy, auroc(truth, [c.p_yes for c in calls])


# --------------------------------------------------------------------------- refinement
def propose_prompt(explanation: str, n: int) -> str:
    return (f"A neuron in a language model is thought to detect: {explanation}\n\nWrite {n} short, varied sentences on which "
            "this neuron should fire, to test the idea. One sentence per line, nothing else.")


def parse_sentences(text: str, n: int) -> list[str]:
    lines = [re.sub(r"^\s*([-*]|\d+[.)])\s*", "", line).strip().strip("\"") for line in text.splitlines()]
    return [line for line in lines if line][:n]


def revise_prompt(explanation: str, tested: Sequence[tuple[str, Snippet]]) -> str:
    lines = "\n".join(f"{i}. {render(s.pieces, s.firing())} (strongest activation {max(s.activations, default=0.0):.2f})"
                      for i, (_, s) in enumerate(tested, start=1))
    return (f"A neuron in a language model was thought to detect: {explanation}\n\nOn test sentences it fired as follows "
            f"(words where it fires are wrapped in {MARK_OPEN} and {MARK_CLOSE}; none wrapped: it did not fire):\n\n{lines}\n\n"
            "Given this evidence, what does the neuron detect? Answer with one short phrase.")


def refine(llm: LLM, explanation: str, read: Callable[[list[str]], list[Snippet]], rounds: int, n_inputs: int,
           max_new_tokens: int) -> tuple[str, list[Call]]:
    """Up to ``rounds`` SAGE rounds: propose ``n_inputs`` sentences, ``read`` the latent's codes on
    them (one Snippet per sentence), revise. Stops early when no sentence can be parsed."""
    calls = []
    for r in range(rounds):
        prompt = propose_prompt(explanation, n_inputs)
        answer = llm.generate(prompt, max_new_tokens * n_inputs)
        calls.append(Call("propose", r, "generate", max_new_tokens * n_inputs, prompt, answer.text))
        sentences = parse_sentences(answer.text, n_inputs)
        if not sentences:
            break
        prompt = revise_prompt(explanation, list(zip(sentences, read(sentences))))
        answer = llm.generate(prompt, max_new_tokens)
        calls.append(Call("revise", r, "generate", max_new_tokens, prompt, answer.text))
        explanation = parse_explanation(answer.text)
    return explanation, calls

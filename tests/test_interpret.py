"""Latent interpretation (issue 21): the latent-contexts table, explanation scoring, the LLM
backends and the interpret stage.

Scoring is tested with a scorer that applies a known rule exactly (a deterministic judge, not
a mock of an LLM): told the true rule it scores 1, told a random one ~0.5. The stage runs on
contexts of a real smoke run with a transcript recorded from the real SmolLM2-135M-Instruct
(tests/record_interpret_transcript.py says how), replayed by the `recorded` backend.
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import numpy as np
import pytest

from sae_core.llm import Answer, MissingRecording, OpenAICompatibleLLM, RecordedLLM, p_yes_from_logprobs, prompt_key
from sae_core.llm_scoring import (Snippet, auroc, balanced_accuracy, detect, fuzz, parse_explanation, render, scores)

DATA = Path(__file__).resolve().parent / "data"
WORDS = [f"w{i}" for i in range(10)]


# ------------------------------------------------------------------- a rule-applying judge
class RuleJudge:
    """Judges by the rule an explanation states, 'the word X': detection — X is in the text;
    fuzzing — the marked words are exactly the text's X's. P(yes) is 1 or 0."""

    name = "rule"

    def generate(self, prompt: str, max_new_tokens: int) -> Answer:
        raise AssertionError("the rule judge only judges")

    def judge(self, prompt: str) -> Answer:
        word = re.search(r"detects: the word (\S+)\n", prompt).group(1)
        text = re.search(r"Text: (.*)\n\n", prompt).group(1)
        marked = re.findall(r"<<(\S+?)>>", text)
        plain = re.sub(r"<<|>>", "", text).split()
        if "wrapped" in prompt:
            yes = bool(marked) and sorted(marked) == [word] * plain.count(word)
        else:
            yes = word in plain
        return Answer("Yes" if yes else "No", float(yes))


def _snippet(words: list[str], fires_on: str) -> Snippet:
    return Snippet(tuple(words), tuple(1.0 if w == fires_on else 0.0 for w in words))


def _latent_items(rng: np.random.Generator, n: int = 5) -> tuple[str, list[Snippet], list[Snippet]]:
    """A latent firing on one word: n texts with it (positives), n without (negatives)."""
    word = str(rng.choice(WORDS))
    others = [w for w in WORDS if w != word]
    positives = [_snippet(list(rng.choice(others, 5)) + [word] + list(rng.choice(others, 2)), word) for _ in range(n)]
    negatives = [_snippet(list(rng.choice(others, 5)) + ["pad"] + list(rng.choice(others, 2)), word) for _ in range(n)]  # same length
    return word, positives, negatives


def test_detection_of_the_true_rule_scores_one_and_of_a_random_rule_about_half():
    rng = np.random.default_rng(0)
    true_scores, random_scores = [], []
    for _ in range(200):
        word, positives, negatives = _latent_items(rng)
        true_scores.append(scores(detect(RuleJudge(), f"the word {word}", positives, negatives, rng)))
        wrong = str(rng.choice([w for w in WORDS if w != word]))
        random_scores.append(scores(detect(RuleJudge(), f"the word {wrong}", positives, negatives, rng)))
    assert all(acc == 1.0 and auc == 1.0 for acc, auc in true_scores)
    accuracy = np.array([acc for acc, _ in random_scores])
    assert abs(accuracy.mean() - 0.5) < 0.04 and accuracy.std() > 0.05  # chance, and not a constant
    assert abs(np.mean([auc for _, auc in random_scores]) - 0.5) < 0.04


def test_fuzzing_with_the_true_rule_scores_one_and_half_the_marks_are_wrong():
    rng = np.random.default_rng(1)
    word, positives, _ = _latent_items(rng, n=6)
    calls = fuzz(RuleJudge(), f"the word {word}", positives, rng)
    assert [c.truth for c in calls].count(False) == 3 and len(calls) == 6
    assert scores(calls) == (1.0, 1.0)
    other = next(w for w in WORDS if w != word)
    assert scores(fuzz(RuleJudge(), f"the word {other}", positives, rng))[0] == 0.5  # says no to everything


def test_balanced_accuracy_auroc_and_p_yes_hand_computed():
    truth = [True, True, False, False, False]
    assert balanced_accuracy(truth, [True, False, False, False, True]) == pytest.approx((1 / 2 + 2 / 3) / 2)
    # positives 0.9 and 0.4 against negatives 0.4, 0.1, 0.6: wins 3 + (0.5 + 1) = 4.5 of 6 pairs
    assert auroc(truth, [0.9, 0.4, 0.4, 0.1, 0.6]) == pytest.approx(0.75)
    assert auroc([True, True], [0.1, 0.2]) is None
    assert balanced_accuracy([True, True], [True, False]) == 0.5
    assert p_yes_from_logprobs({"Yes": np.log(0.6), " no": np.log(0.2), "maybe": np.log(0.2)}) == pytest.approx(0.75)
    assert p_yes_from_logprobs({"maybe": 0.0}) is None
    assert Answer("yes, it does").says_yes and not Answer("Yes", p_yes=0.3).says_yes


def test_rendering_and_explanation_parsing():
    assert render(["the", "bank", "##er", "rose"], {1, 2}) == "the <<bank>><<er>> rose"
    assert render(["The", "Ġbank", "Ġrose", "."], {1}) == "The <<bank>> rose."
    assert parse_explanation('The topic or kind of word that the wrapped words share is "company names"') == "company names"
    assert parse_explanation("\n1. The neuron detects: sports words.\nmore") == "sports words"
    assert parse_explanation("  \n") == "(no explanation)"


def test_recorded_backend_replays_by_prompt_hash_and_names_a_missing_prompt():
    llm = RecordedLLM({prompt_key("judge", "known?", 1): ("No", 0.25), prompt_key("generate", "say", 8): ("hi", None)}, "t.parquet")
    assert llm.judge("known?") == Answer("No", 0.25) and llm.generate("say", 8) == Answer("hi")
    with pytest.raises(MissingRecording, match=r"judge prompt \w+ is not in the recorded transcript t.parquet: 'unknown\?'"):
        llm.judge("unknown?")
    with pytest.raises(MissingRecording):
        llm.generate("say", 9)  # another token budget is another call


class _ChatServer(BaseHTTPRequestHandler):
    """A minimal OpenAI-compatible server: answers 'Yes' with logprobs, or refuses logprobs (HTTP 400) for model 'plain'."""

    requests: list[dict] = []

    def do_POST(self):  # noqa: N802 - the http.server interface
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({**body, "auth": self.headers.get("Authorization")})
        if body["model"] == "plain" and body.get("logprobs"):
            self.send_response(400)
            self.end_headers()
            return
        choice = {"message": {"content": "Yes, it does." if body["max_tokens"] == 1 else "words about money"}}
        if body.get("logprobs"):
            choice["logprobs"] = {"content": [{"token": "Yes", "logprob": np.log(0.7),
                                               "top_logprobs": [{"token": "Yes", "logprob": np.log(0.7)}, {"token": "No", "logprob": np.log(0.1)}]}]}
        data = json.dumps({"choices": [choice]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_openai_compatible_backend_reads_logprobs_and_falls_back_to_text(monkeypatch):
    server = HTTPServer(("127.0.0.1", 0), _ChatServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("SAE_TEST_KEY", "secret")
    try:
        url = f"http://127.0.0.1:{server.server_port}/v1"
        llm = OpenAICompatibleLLM(url, "m", api_key_env="SAE_TEST_KEY")
        assert llm.generate("explain", 16) == Answer("words about money")
        assert llm.judge("fires?") == Answer("Yes, it does.", pytest.approx(0.875))
        assert OpenAICompatibleLLM(url, "plain").judge("fires?") == Answer("Yes, it does.", None)
        assert _ChatServer.requests[0]["auth"] == "Bearer secret" and _ChatServer.requests[0]["temperature"] == 0
        with pytest.raises(RuntimeError, match="cannot reach"):
            OpenAICompatibleLLM("http://127.0.0.1:9/v1", "m", timeout_s=2).generate("x", 4)
    finally:
        server.shutdown()


def _tiny_chat_model(directory: Path) -> Path:
    """A random two-layer Llama with a word-level tokenizer that knows yes/no and a chat template."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from tests.tiny_models import TEXTS

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(TEXTS + ["yes no Yes No"], trainers.WordLevelTrainer(vocab_size=300, special_tokens=["<pad>", "<unk>", "<s>", "</s>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = "{% for m in messages %}<s> {{ m['content'] }} </s>{% endfor %}<s>"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(fast), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                 intermediate_size=64, max_position_embeddings=256, bos_token_id=2, eos_token_id=3,
                                 pad_token_id=0)).save_pretrained(directory)
    fast.save_pretrained(directory)
    return directory


def test_local_llm_batched_judgements_equal_one_at_a_time(tmp_path):
    from sae_core.llm import LocalLLM

    llm = LocalLLM(str(_tiny_chat_model(tmp_path)))
    prompts = ["the bank rose", "the striker scored twice and the team won the cup", "yes", "the film won an award and the actor thanked the director"]
    batched = llm.judge_many(prompts, batch_size=3)  # a batch of 3 with left padding, then one of 1
    for prompt, answer in zip(prompts, batched):
        alone = llm.judge(prompt)
        assert answer.p_yes == pytest.approx(alone.p_yes, abs=1e-6) and answer.text == alone.text
    assert len({round(a.p_yes, 6) for a in batched}) == len(prompts)  # the prompts matter
    assert llm.generate("the bank", 4) == llm.generate("the bank", 4)  # greedy


def test_interpret_config_errors_name_the_key():
    from pydantic import ValidationError

    from tasks.config_interpret import InterpretConfig

    for bad, says in (({"methods": ["bagging", "bogus"]}, "unknown method"), ({"llm": {"backend": "openai"}}, "needs interpret.llm.base_url"),
                      ({"llm": {"backend": "recorded"}}, "needs interpret.llm.transcript"), ({"refine_rounds": 9}, "refine_rounds")):
        with pytest.raises(ValidationError, match=says):
            InterpretConfig(**bad)


def test_a_prompt_with_turns_becomes_alternating_chat_messages():
    from sae_core.llm import TURN, chat_messages
    from sae_core.llm_scoring import EXAMPLE_ANSWER, explanation_prompt

    assert chat_messages("q") == [{"role": "user", "content": "q"}]
    assert chat_messages(TURN.join(["q1", "a1", "q2"])) == [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                                                          {"role": "user", "content": "q2"}]
    turns = chat_messages(explanation_prompt([Snippet(("the", "Ġbank"), (0.0, 2.0))]))
    assert [t["role"] for t in turns] == ["user", "assistant", "user"] and turns[1]["content"] == EXAMPLE_ANSWER
    assert "1. the <<bank>>" in turns[2]["content"]
    assert parse_explanation("politics and politics and politics") == "politics"

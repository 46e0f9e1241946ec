"""Pluggable LLMs for explaining and scoring latents (the interpret stage, issue 21).

An :class:`LLM` does two things: ``generate`` (free text, greedy) and ``judge`` (a yes/no
question: the answer and, when the backend exposes token probabilities, P(yes) =
p(yes) / (p(yes) + p(no)) over the first answer token). Backends:

* :class:`LocalLLM` — a transformers chat model on this machine (default: the embedded
  SmolLM2-135M-Instruct), greedy, so deterministic on one machine and torch version;
* :class:`OpenAICompatibleLLM` — any ``/chat/completions`` endpoint by base URL and model
  name (stdlib urllib), temperature 0, logprobs when the server offers them;
* :class:`RecordedLLM` — replays answers recorded from a real run, keyed by
  :func:`prompt_key`; a prompt that was not recorded is a :class:`MissingRecording`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

YES, NO = ("yes",), ("no",)
JUDGE_TOKENS = 1  # a judgement reads the first answer token
JUDGE_BATCH = 8   # judgements per forward pass of a local model
TURN = "\n<|next turn|>\n"  # separates chat turns inside one prompt string (see chat_messages)


@dataclass(frozen=True)
class Answer:
    """What an LLM returned: its text, and P(yes) for a judgement when the backend has token probabilities."""

    text: str
    p_yes: float | None = None

    @property
    def says_yes(self) -> bool:
        """P(yes) ≥ 0.5 when known, else whether the text starts with 'yes'."""
        if self.p_yes is not None:
            return self.p_yes >= 0.5
        return self.text.strip().lower().lstrip("\"'*").startswith(YES)


class LLM(Protocol):
    name: str

    def generate(self, prompt: str, max_new_tokens: int) -> Answer: ...

    def judge(self, prompt: str) -> Answer: ...


def chat_messages(prompt: str) -> list[dict[str, str]]:
    """The chat turns of a prompt: its parts between TURN lines, user and assistant in turn
    (a few-shot example is a user turn and the assistant's answer before the real question)."""
    parts = prompt.split(TURN)
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": part} for i, part in enumerate(parts)]


def judge_all(llm: LLM, prompts: list[str]) -> list[Answer]:
    """Every prompt judged: in batches when the backend has ``judge_many``, else one by one."""
    many = getattr(llm, "judge_many", None)
    return many(prompts) if many is not None and prompts else [llm.judge(p) for p in prompts]


def prompt_key(kind: str, prompt: str, max_new_tokens: int) -> str:
    """The key of one call in a transcript: sha256 of (kind, token budget, prompt), 24 hex digits."""
    return hashlib.sha256(f"{kind}\x00{max_new_tokens}\x00{prompt}".encode()).hexdigest()[:24]


def p_yes_from_logprobs(logprobs: Mapping[str, float]) -> float | None:
    """P(yes) / (P(yes) + P(no)) from first-token log-probabilities (token text -> logprob);
    tokens count as yes/no after stripping spaces and case. None when neither appears."""
    mass = {"yes": 0.0, "no": 0.0}
    for token, logprob in logprobs.items():
        word = token.strip().lower()
        if word in mass:
            mass[word] += math.exp(logprob)
    total = mass["yes"] + mass["no"]
    return mass["yes"] / total if total > 0 else None


class LocalLLM:
    """A transformers causal chat model, greedy decoding on ``device`` (default: CPU).

    model: an embedded name (``smollm2-135m``) or a local transformers directory whose
    tokenizer has a chat template. P(yes) of a judgement is read from the logits of the first
    generated position: the summed probabilities of the one-token spellings of yes ("yes",
    "Yes", "YES", " yes", " Yes") against those of no."""

    def __init__(self, model: str = "smollm2-135m", device: str = "cpu") -> None:
        import torch
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from sae_core.models import require_safetensors, resolve_source

        transformers.utils.logging.set_verbosity_error()
        source, revision = resolve_source(model)
        if not isinstance(source, str):
            require_safetensors(source, model)
        self.name = f"local:{model}"
        self.tokenizer = AutoTokenizer.from_pretrained(source, revision=revision)
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"{model} has no chat template; interpret.llm.model needs an instruction-tuned chat model")
        self.model = AutoModelForCausalLM.from_pretrained(source, revision=revision, dtype=torch.float32,
                                                          use_safetensors=True).eval().to(device)
        self.device = device
        spellings = {w: sorted({ids[0] for form in (w, w.capitalize(), w.upper(), " " + w, " " + w.capitalize())
                                if len(ids := self.tokenizer.encode(form, add_special_tokens=False)) == 1})
                     for w in ("yes", "no")}
        if not spellings["yes"] or not spellings["no"]:
            raise ValueError(f"{model}'s vocabulary has no single 'yes'/'no' token; judgements need them")
        self._yes, self._no = spellings["yes"], spellings["no"]

    def _ids(self, prompt: str):
        text = self.tokenizer.apply_chat_template(chat_messages(prompt), tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(self.device)

    def generate(self, prompt: str, max_new_tokens: int) -> Answer:
        import torch

        ids = self._ids(prompt)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                                      pad_token_id=pad)
        return Answer(self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())

    def _answer(self, logits) -> Answer:
        import torch

        logits = logits.double()
        p_yes = float(torch.sigmoid(torch.logsumexp(logits[self._yes], 0) - torch.logsumexp(logits[self._no], 0)))
        return Answer("Yes" if p_yes >= 0.5 else "No", p_yes)

    def judge(self, prompt: str) -> Answer:
        import torch

        with torch.inference_mode():
            return self._answer(self.model(self._ids(prompt)).logits[0, -1])

    def judge_many(self, prompts: list[str], batch_size: int = JUDGE_BATCH) -> list[Answer]:
        """:meth:`judge` of each prompt, ``batch_size`` prompts per forward pass: left-padded,
        masked, positions counted from each prompt's first token (equal to one at a time up to
        float rounding, tested)."""
        import torch

        answers = []
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        for start in range(0, len(prompts), batch_size):
            ids = [self._ids(p)[0] for p in prompts[start: start + batch_size]]
            width = max(len(i) for i in ids)
            batch = torch.full((len(ids), width), pad, dtype=torch.long, device=self.device)
            mask = torch.zeros_like(batch)
            for row, i in enumerate(ids):
                batch[row, width - len(i):], mask[row, width - len(i):] = i, 1
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            with torch.inference_mode():
                logits = self.model(batch, attention_mask=mask, position_ids=positions).logits[:, -1]
            answers += [self._answer(row) for row in logits]
        return answers


class OpenAICompatibleLLM:
    """Any OpenAI-compatible ``POST {base_url}/chat/completions`` (vLLM, llama.cpp server,
    Ollama, OpenAI, ...), temperature 0. Judgements ask for the top-5 logprobs of one token
    and fall back to parsing the text when the server does not return them."""

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", timeout_s: float = 60.0) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.timeout_s, self.name = model, timeout_s, f"openai:{model}@{base_url}"
        self.api_key = os.environ.get(api_key_env)

    def _post(self, body: dict) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
            return json.loads(response.read())

    def _chat(self, prompt: str, max_tokens: int, logprobs: bool) -> dict:
        body = {"model": self.model, "messages": chat_messages(prompt), "max_tokens": max_tokens, "temperature": 0}
        if logprobs:
            body |= {"logprobs": True, "top_logprobs": 5}
        try:
            return self._post(body)
        except urllib.error.HTTPError as err:
            if logprobs and err.code in (400, 422):  # a server without logprobs: ask again without them
                return self._chat(prompt, max_tokens, logprobs=False)
            raise RuntimeError(f"{self.url} answered HTTP {err.code} ({err.reason}); check interpret.llm.base_url, model "
                               f"{self.model!r} and the API key variable") from err
        except (urllib.error.URLError, TimeoutError) as err:
            raise RuntimeError(f"cannot reach {self.url} ({err}); is the server running and interpret.llm.base_url right?") from err

    @staticmethod
    def _text(response: dict) -> str:
        try:
            return (response["choices"][0]["message"]["content"] or "").strip()
        except (KeyError, IndexError, TypeError) as err:
            raise RuntimeError(f"not a chat completion response: {str(response)[:200]}") from err

    def generate(self, prompt: str, max_new_tokens: int) -> Answer:
        return Answer(self._text(self._chat(prompt, max_new_tokens, logprobs=False)))

    def judge(self, prompt: str) -> Answer:
        response = self._chat(prompt, JUDGE_TOKENS, logprobs=True)
        try:
            first = response["choices"][0]["logprobs"]["content"][0]
            top = {t["token"]: t["logprob"] for t in first.get("top_logprobs", [])} | {first["token"]: first["logprob"]}
        except (KeyError, IndexError, TypeError):
            top = {}
        return Answer(self._text(response), p_yes_from_logprobs(top))


class MissingRecording(LookupError):
    """A prompt the recorded transcript does not hold."""


class RecordedLLM:
    """Replays recorded answers: ``answers`` maps :func:`prompt_key` to (text, P(yes) or None)."""

    def __init__(self, answers: Mapping[str, tuple[str, float | None]], source: str, recorded_by: str = "recorded") -> None:
        self.answers, self.source, self.name = dict(answers), source, f"recorded:{recorded_by}"

    def _replay(self, kind: str, prompt: str, max_new_tokens: int) -> Answer:
        key = prompt_key(kind, prompt, max_new_tokens)
        if key not in self.answers:
            raise MissingRecording(
                f"the {kind} prompt {key} is not in the recorded transcript {self.source}: {prompt[:200]!r}... — the "
                "contexts, config or prompts differ from the recorded run; record again with interpret.llm.backend local or openai")
        text, p_yes = self.answers[key]
        return Answer(text, p_yes)

    def generate(self, prompt: str, max_new_tokens: int) -> Answer:
        return self._replay("generate", prompt, max_new_tokens)

    def judge(self, prompt: str) -> Answer:
        return self._replay("judge", prompt, JUDGE_TOKENS)

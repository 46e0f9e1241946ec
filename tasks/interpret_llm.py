"""The interpret stage's plumbing around the LLM: building the configured backend (a recorded
one from a transcript Parquet), and reading a latent's activations on sentences the explainer
proposes (the SAGE-style refinement: the analysed model up to its hooked layer, then the SAE)."""

from __future__ import annotations

from pathlib import Path

import torch

from data_contracts.activations import read_manifest
from data_contracts.interpret import read_interpret
from sae_core.io import load_ensemble
from sae_core.llm import LLM, LocalLLM, OpenAICompatibleLLM, RecordedLLM
from sae_core.llm_scoring import Snippet
from tasks.common import ACTIVATIONS_DIR
from tasks.config_interpret import LLMConfig

TRANSCRIPT_KIND = "interpret_transcript"


def recorded_llm(path: str | Path) -> RecordedLLM:
    """Replay the answers of a transcript (an interpret/transcript.parquet), validated."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"interpret.llm.transcript {path} does not exist: point it at a run's interpret/transcript.parquet")
    frame = read_interpret(path, TRANSCRIPT_KIND)
    answers = {key: (answer, None if p != p else float(p)) for key, answer, p in zip(frame["prompt_key"], frame["answer"], frame["p_yes"])}
    backends = sorted(set(frame["backend"]))
    return RecordedLLM(answers, str(path), recorded_by=",".join(b.removeprefix("recorded:") for b in backends) or "empty")


def make_llm(cfg: LLMConfig) -> LLM:
    """The backend ``cfg`` names (see :class:`tasks.config_interpret.LLMConfig`)."""
    if cfg.backend == "recorded":
        return recorded_llm(cfg.transcript)
    if cfg.backend == "openai":
        return OpenAICompatibleLLM(cfg.base_url, cfg.model, cfg.api_key_env, cfg.timeout_s)
    return LocalLLM(cfg.model)


class ActivationReader:
    """A latent's codes on new text: the extraction's model (checked against the manifest's
    weights) to its layer, then the model's ensemble member; loaded on first use."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir, self.loaded, self.ensembles = Path(run_dir), None, {}

    def _model(self):
        if self.loaded is None:
            from sae_core.models import load_model

            manifest = read_manifest(self.run_dir / ACTIVATIONS_DIR)
            loaded = load_model(manifest.model, manifest.layer, trust_remote_code=manifest.trust_remote_code)
            if loaded.revision != manifest.revision:
                raise ValueError(f"{manifest.model} now has weights {loaded.revision}, but the activations were extracted from "
                                 f"{manifest.revision}; rerun extraction (--force extract) before refining explanations")
            self.loaded = loaded
        return self.loaded

    def read(self, model: str, member: int, latent: int, sentences: list[str]) -> list[Snippet]:
        """One Snippet per sentence: its tokens (specials dropped) and the latent's code at each."""
        from sae_core.models import residual_stream

        loaded = self._model()
        if model not in self.ensembles:
            self.ensembles[model] = load_ensemble(self.run_dir / model).eval()
        ensemble, out = self.ensembles[model], []
        for sentence in sentences:
            ids = loaded.tokenizer(sentence, add_special_tokens=False)["input_ids"][: 126]
            full = torch.tensor([loaded.prefix_ids + ids + loaded.suffix_ids])
            with torch.inference_mode():
                h = residual_stream(loaded, full, torch.ones_like(full))[0, len(loaded.prefix_ids): len(loaded.prefix_ids) + len(ids)]
                codes = ensemble.member_codes(h.float().cpu())[member, :, latent] if ids else torch.zeros(0)
            out.append(Snippet(tuple(loaded.tokenizer.convert_ids_to_tokens(ids)), tuple(float(c) for c in codes)))
        return out

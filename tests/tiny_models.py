"""Tiny random transformers with locally trained tokenizers.

Kinds: ``bert`` (encoder), ``llama`` (decoder), and the families of the paper's models
(SPEC §12): ``gpt_neox`` (Pythia), ``gemma2`` (Gemma 2) and ``gelu1l`` (a one-layer GELU
decoder). Built offline from configs, saved with save_pretrained, so the extraction code
loads them exactly as it loads a real model directory.
"""

from __future__ import annotations

from pathlib import Path

import torch

TEXTS = [
    "the market rose as shares in the bank gained on strong profits",
    "the striker scored twice and the team won the cup final",
    "the government announced a new policy on tax and schools",
    "the film won an award and the actor thanked the director",
    "the new phone has a faster chip and a better camera",
] * 4


def _tokenizer(kind: str):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "bert":
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    else:
        specials = ["<pad>", "<unk>", "<s>", "</s>"]
    tok = Tokenizer(models.WordLevel(unk_token=specials[1]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(TEXTS, trainers.WordLevelTrainer(vocab_size=200, special_tokens=specials))
    if kind == "bert":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>")


#: the kinds :func:`build_tiny_model` builds; the last three are the paper's model families
KINDS = ("bert", "llama", "gpt_neox", "gemma2", "gelu1l")
PAPER_FAMILIES = ("gpt_neox", "gemma2", "gelu1l")


def _decoder(kind: str, vocab: int, n_layers: int, d: int):
    """A random causal LM of one of the paper's families (special ids: pad 0, bos 2, eos 3)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM

    ids = dict(bos_token_id=2, eos_token_id=3, pad_token_id=0)
    if kind == "gpt_neox":  # Pythia: parallel attention + MLP, partial rotary embeddings
        return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=vocab, hidden_size=d, num_hidden_layers=n_layers, num_attention_heads=2,
                                                intermediate_size=4 * d, max_position_embeddings=256, rotary_pct=0.25, **ids))
    if kind == "gemma2":  # Gemma 2: sandwich norms, soft-capped logits, alternating sliding-window layers
        return Gemma2ForCausalLM(Gemma2Config(vocab_size=vocab, hidden_size=d, num_hidden_layers=n_layers, num_attention_heads=2,
                                              num_key_value_heads=1, head_dim=d // 2, intermediate_size=2 * d,
                                              max_position_embeddings=256, sliding_window=8, query_pre_attn_scalar=d // 2, **ids))
    # gelu-1l (the paper's one-layer model, a TransformerLens model with no transformers class):
    # the GPT-2 architecture with one block and the exact GELU is a fair stand-in (pre-LN
    # attention + GELU MLP, learned positions)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=d, n_layer=n_layers, n_head=2, n_inner=4 * d,
                                      activation_function="gelu", n_positions=256, **ids))


def build_tiny_model(directory: Path, kind: str = "bert", n_layers: int | None = None, d: int = 32, seed: int = 0) -> Path:
    """Save a random ``kind`` (one of :data:`KINDS`) model + tokenizer to ``directory``.

    ``n_layers``: 3 by default, 1 for ``gelu1l`` (it is a one-layer model).
    """
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    if kind not in KINDS:
        raise ValueError(f"unknown tiny model kind {kind!r}; one of {', '.join(KINDS)}")
    if n_layers is None:
        n_layers = 1 if kind == "gelu1l" else 3
    torch.manual_seed(seed)
    tok = _tokenizer(kind)
    vocab = len(tok)
    if kind == "bert":
        model = BertModel(BertConfig(vocab_size=vocab, hidden_size=d, num_hidden_layers=n_layers, num_attention_heads=2,
                                     intermediate_size=2 * d, max_position_embeddings=256, pad_token_id=0))
    elif kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=d, num_hidden_layers=n_layers, num_attention_heads=2,
                                             num_key_value_heads=2, intermediate_size=2 * d, max_position_embeddings=256,
                                             bos_token_id=2, eos_token_id=3, pad_token_id=0))
    else:
        model = _decoder(kind, vocab, n_layers, d)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def tiny_extract_section(base: Path, copies: int = 6) -> dict:
    """An extract section over a tiny random BERT (built in base/model) and TEXTS written ``copies`` times
    (base/docs.txt, each copy tagged so no two documents are the same): layer 1, 8-token windows, 60/20/20 split."""
    model = build_tiny_model(base / "model", "bert")
    (base / "docs.txt").write_text("\n".join(f"{text} (copy {i})" for i in range(copies) for text in TEXTS) + "\n")
    return {"model": str(model), "layer": 1, "context_length": 8, "corpus": [{"name": str(base / "docs.txt")}],
            "split_fractions": {"train": 0.6, "val": 0.2, "test": 0.2}}

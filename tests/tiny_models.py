"""Tiny random transformers (BERT encoder, Llama decoder) with locally trained tokenizers.

Built offline from configs, saved with save_pretrained, so the extraction code loads them
exactly as it loads a real model directory.
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


def build_tiny_model(directory: Path, kind: str = "bert", n_layers: int = 3, d: int = 32, seed: int = 0) -> Path:
    """Save a random ``kind`` ('bert' or 'llama') model + tokenizer to ``directory``."""
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tok = _tokenizer(kind)
    vocab = len(tok)
    if kind == "bert":
        model = BertModel(BertConfig(vocab_size=vocab, hidden_size=d, num_hidden_layers=n_layers, num_attention_heads=2,
                                     intermediate_size=2 * d, max_position_embeddings=256, pad_token_id=0))
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=d, num_hidden_layers=n_layers, num_attention_heads=2,
                                             num_key_value_heads=2, intermediate_size=2 * d, max_position_embeddings=256,
                                             bos_token_id=2, eos_token_id=3, pad_token_id=0))
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory

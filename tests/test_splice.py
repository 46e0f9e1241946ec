"""CE/KL splicing into a causal LM: identity and zero replacements, a hand-computed CE."""

import pytest
import torch
import torch.nn.functional as F

from sae_core.models import load_model
from sae_core.splice import ce_loss_recovered, spliced_losses, zero_replacement
from tests.tiny_models import build_tiny_model


def test_ce_loss_recovered_by_hand():
    assert ce_loss_recovered(ce_clean=2.0, ce_sae=3.0, ce_zero=6.0) == pytest.approx(0.75)
    assert ce_loss_recovered(2.0, 2.0, 6.0) == 1.0 and ce_loss_recovered(2.0, 6.0, 6.0) == 0.0
    with pytest.raises(ValueError, match="undefined"):
        ce_loss_recovered(2.0, 3.0, 2.0)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return load_model(str(build_tiny_model(tmp_path_factory.mktemp("llama"), "llama")), 1, causal_lm=True)


def test_splice_identity_is_clean_and_zero_matches_a_manual_forward(llama):
    ids = torch.tensor([[2, 10, 11, 12, 13, 14], [2, 20, 21, 22, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    splice = mask.bool() & (ids != 2)
    got = spliced_losses(llama.model, llama.block, ids, mask, splice, {"clean": None, "id": lambda h: h, "zero": zero_replacement})
    assert got["id"].ce == pytest.approx(got["clean"].ce, abs=1e-6) and got["id"].kl == pytest.approx(0.0, abs=1e-6)
    assert got["clean"].kl == 0.0 and got["zero"].kl > 0

    # the slow twin: zero the block output by hand, run the rest of the model, CE over real next tokens
    def hook(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        h = h.masked_fill(splice[..., None], 0.0)
        return (h, *output[1:]) if isinstance(output, tuple) else h

    handle = llama.block.register_forward_hook(hook)
    try:
        with torch.no_grad():
            logits = llama.model(input_ids=ids, attention_mask=mask).logits
    finally:
        handle.remove()
    valid = (mask[:, 1:] * mask[:, :-1]).bool()
    manual = F.cross_entropy(logits[:, :-1][valid], ids[:, 1:][valid])
    assert got["zero"].ce == pytest.approx(float(manual), rel=1e-5)


def test_encoder_models_are_refused_for_next_token_loss(tmp_path):
    with pytest.raises(ValueError, match="not a causal LM"):
        load_model(str(build_tiny_model(tmp_path / "bert", "bert")), 1, causal_lm=True)

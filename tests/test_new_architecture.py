"""Adding an architecture is one file in sae_core/saes/ (plus its test): nothing else to edit.

The file below is written into a copy of sae_core; a fresh interpreter that imports that
copy sees the new architecture in the registry, the configs accept it (the stage config's
``architecture`` field too), bagging trains it as one batched module, and its saved
ensemble loads back to the same outputs.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

NEW_ARCHITECTURE = '''
"""ReLU SAE with a plain L1 penalty (codes not weighted by decoder norms)."""

import torch
from torch import Tensor

from sae_core.registry import register_architecture
from sae_core.saes.base import SAE, LossContext, LossOutput, activity_kwargs, squared_error


@register_architecture("relu_plain_l1")
class PlainL1ReLUSAE(SAE):
    """c = ReLU(W_enc^T (a - b_dec) + b_enc); loss ||a - â||² + λ Σ_i c_i."""

    sparsity = "l1"

    def activation(self, pre: Tensor) -> Tensor:
        return torch.relu(pre)

    def training_loss(self, a: Tensor, ctx: LossContext) -> LossOutput:
        codes = self.encode_members(a)
        recon = self.decode_members(codes)
        mse = squared_error(a, recon)
        l1 = codes.float().sum(-1).mean(-1)
        return LossOutput(
            per_member=mse + ctx.sparsity_coefficient * l1,
            terms={"mse": mse.detach(), "sparsity": l1.detach()},
            reconstruction=recon,
            **activity_kwargs(codes),
            stats={"sparsity_current_p": l1.detach()},
        )
'''

CHECK = '''
import torch
from sae_core import SAEConfig, TrainConfig
from sae_core.io import load_ensemble, save_ensemble
from sae_core.registry import architectures, uses_k
from sae_core.synthetic import make_sparse_dictionary_data
from sae_core.training.ensembles import train_bagging
from tasks.config import TrainStageConfig

assert "relu_plain_l1" in architectures() and not uses_k("relu_plain_l1")
stage = TrainStageConfig(architecture="relu_plain_l1", k=None, n_members=2, expanded_sizes=[2])
cfg = SAEConfig(architecture="relu_plain_l1", d_in=16, d_sae=32)
data = make_sparse_dictionary_data(n_samples=2048, d=16, n_features=32, seed=0).activations
ens = train_bagging(cfg, data, TrainConfig(n_steps=30, batch_size=128, sparsity_coefficient=0.01), 2).ensemble
save_ensemble(ens, OUT)
back = load_ensemble(OUT)
with torch.no_grad():
    assert torch.equal(back(data[:64]), ens(data[:64]))
print("ok", back.member_cfg.architecture, float(((ens(data) - data) ** 2).sum(1).mean()) < float((data ** 2).sum(1).mean()))
'''


def test_one_file_adds_an_architecture(tmp_path):
    shutil.copytree(ROOT / "sae_core", tmp_path / "sae_core", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "sae_core" / "saes" / "relu_plain_l1.py").write_text(NEW_ARCHITECTURE)
    code = f"OUT = {str(tmp_path / 'saved')!r}\n" + textwrap.dedent(CHECK)
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300,
        env={"PYTHONPATH": f"{tmp_path}:{ROOT}", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok relu_plain_l1 True"


def test_the_registry_refuses_an_architecture_without_a_sparsity_kind():
    import pytest

    from sae_core.registry import register_architecture
    from sae_core.saes.base import SAE

    with pytest.raises(TypeError, match="must set sparsity"):
        @register_architecture("no_sparsity_kind")
        class Broken(SAE):  # noqa: F841
            pass

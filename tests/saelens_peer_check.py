"""Run inside ``.venv-peers`` (sae-lens installed): SAELens' side of the interop check.

    .venv-peers/bin/python tests/saelens_peer_check.py WORK_DIR

WORK_DIR/check.json lists the folders our exporter wrote: [{"folder", "inputs", "expected"}],
``inputs`` / ``expected`` safetensors files holding ``x`` [B, d] and our output ``out`` [B, d]
(and our codes ``codes`` [B, m]). For each, ``sae_lens.SAE.load_from_disk`` loads the folder
and its forward pass and codes are compared with ours (max relative error, written to
WORK_DIR/peer_results.json).

Then it saves SAELens SAEs of every inference architecture it shares with us (standard,
jumprelu, topk, gated), with random weights, to WORK_DIR/saelens_made/<arch>/ via
``SAE.save_model``, with their outputs on WORK_DIR/made_inputs.safetensors, for the
importer to read back.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sae_lens import SAE, JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
from sae_lens.saes.gated_sae import GatedSAE, GatedSAEConfig


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ over the whole batch."""
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def check_exports(work: Path) -> list[dict]:
    results = []
    for item in json.loads((work / "check.json").read_text()):
        sae = SAE.load_from_disk(item["folder"], device="cpu")
        x = load_file(item["inputs"])["x"]
        ours = load_file(item["expected"])
        with torch.no_grad():
            out, codes = sae(x), sae.encode(x)
        results.append({
            "folder": item["folder"],
            "class": type(sae).__name__,
            "architecture": sae.cfg.architecture(),
            "output_relative_error": relative_error(out, ours["out"]),
            "codes_relative_error": relative_error(codes, ours["codes"]),
        })
    return results


def make_saelens_saes(work: Path, d_in: int = 16, d_sae: int = 40) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, d_in, generator=gen)
    save_file({"x": x}, str(work / "made_inputs.safetensors"))
    made = []
    for cls, cfg in ((StandardSAE, StandardSAEConfig(d_in=d_in, d_sae=d_sae)), (JumpReLUSAE, JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae)),
                     (TopKSAE, TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=5)), (GatedSAE, GatedSAEConfig(d_in=d_in, d_sae=d_sae))):
        cfg.metadata.model_name = "peer-model"
        cfg.metadata.hook_name = "blocks.1.hook_resid_post"
        sae = cls(cfg)
        with torch.no_grad():
            for name, p in sae.named_parameters():
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
            if isinstance(sae, JumpReLUSAE):
                sae.threshold.copy_(0.2 * torch.rand(d_sae, generator=gen))
            out, codes = sae(x), sae.encode(x)
        folder = work / "saelens_made" / cfg.architecture()
        sae.save_model(folder)
        save_file({"out": out.contiguous(), "codes": codes.contiguous()}, str(folder.parent / f"{cfg.architecture()}_outputs.safetensors"))
        made.append({"folder": str(folder), "architecture": cfg.architecture()})
    return made


def main(work: str) -> int:
    work_dir = Path(work)
    results = {"checked": check_exports(work_dir), "made": make_saelens_saes(work_dir)}
    (work_dir / "peer_results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))

"""SAELens export/import and SAEBench-schema results (issue 22, SPEC §5, §13).

Fast tests run without SAELens: the folder layout and cfg.json keys, Proposition 1's fold
against a hand-computed case and against the ensemble's own forward pass, the refusals,
import errors and the import -> export round trip. The slow test runs SAELens itself
(``.venv-peers``, built by ``make bench-peers``) on the exported folders and on SAEs it saves:

    .venv/bin/python -m pytest -m slow tests/test_saelens_interop.py
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from flows.cli import main as cli
from sae_core import Ensemble, SAEConfig, build_sae, save_ensemble
from sae_core.interop import NotImportable, NotOneSAE, export_member, fold_bagging, read_saelens_folder
from tasks.config import EvaluateConfig, ImportedSAE, PipelineConfig, TrainStageConfig
from tasks.interop import SOURCE_CFG_FILE, export_model, import_saelens_models
from tasks.saebench import core_metrics, probing_metrics, write_saebench_results
from tests.synthetic_shards import write_synthetic_activations

ROOT = Path(__file__).resolve().parents[1]
PEERS_PYTHON = ROOT / ".venv-peers" / "bin" / "python"
D = 16  # width of the synthetic activations
#: the keys SAELens 6.54.12's SAEConfig.to_dict writes (StandardSAE.save_model), in its order
SAELENS_KEYS = ["d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input", "normalize_activations", "reshape_activations",
                "metadata", "architecture"]


def random_members(architecture: str, n_members: int = 3, d: int = D, m: int = 24, seed: int = 0) -> torch.nn.Module:
    """A member stack with random weights (unit-norm decoder rows, positive thresholds)."""
    gen = torch.Generator().manual_seed(seed)
    k = 4 if architecture in ("topk", "batchtopk") else None
    sae = build_sae(SAEConfig(architecture=architecture, d_in=d, d_sae=m, k=k), n_members=n_members)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=gen))
        sae.W_dec /= sae.W_dec.norm(dim=-1, keepdim=True)
        if architecture == "jumprelu":
            sae.threshold.copy_(0.3 * torch.rand(sae.threshold.shape, generator=gen))
        if architecture == "batchtopk":
            sae.threshold.copy_(0.2 + 0.2 * torch.rand(sae.threshold.shape, generator=gen))
    return sae.eval()


def saelens_forward(cfg: dict, t: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, output) of a SAELens folder's tensors, written from SAELens' inference formulas
    (saes/standard_sae.py, jumprelu_sae.py, topk_sae.py, gated_sae.py) without SAELens."""
    xc = x - t["b_dec"] * cfg["apply_b_dec_to_input"]
    arch = cfg["architecture"]
    if arch == "gated":
        gate = (xc @ t["W_enc"] + t["b_gate"]) > 0
        codes = gate * torch.relu(xc @ (t["W_enc"] * t["r_mag"].exp()) + t["b_mag"])
    else:
        pre = xc @ t["W_enc"] + t["b_enc"]
        if arch == "topk":
            values, idx = pre.topk(cfg["k"], dim=-1)
            codes = torch.zeros_like(pre).scatter(-1, idx, values.relu())
        else:
            codes = torch.relu(pre) * ((pre > t["threshold"]) if arch == "jumprelu" else 1)
    return codes, codes @ t["W_dec"] + t["b_dec"]


def read_folder(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    return json.loads((path / "cfg.json").read_text()), load_file(str(path / "sae_weights.safetensors"))


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------ Proposition 1
def test_fold_of_a_hand_computed_relu_pair():
    # member 1: W_enc = [[1], [0]], b_enc = 0.5, f = (1, 0), b_dec = (1, 0)
    # member 2: W_enc = [[0], [2]], b_enc = -1, f = (0, 1), b_dec = (0, 2);   α = (1/2, 1/2)
    sae = build_sae(SAEConfig(architecture="relu", d_in=2, d_sae=1), n_members=2)
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[[1.0], [0.0]], [[0.0], [2.0]]]))
        sae.b_enc.copy_(torch.tensor([[0.5], [-1.0]]))
        sae.W_dec.copy_(torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]]))
        sae.b_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    ens = Ensemble(sae, "bagging")
    arch, t = fold_bagging(ens)
    assert arch == "standard"
    # B = ½(1, 0) + ½(0, 2) = (0.5, 1)
    assert t["b_dec"].tolist() == [0.5, 1.0]
    # member 1: W_encᵀ(B − b_dec¹) = (1, 0)·(−0.5, 1) = −0.5 -> b_enc = ½(0.5 − 0.5) = 0; W_enc = ½(1, 0)
    # member 2: W_encᵀ(B − b_dec²) = (0, 2)·(0.5, −1) = −2  -> b_enc = ½(−1 − 2) = −1.5; W_enc = ½(0, 2)
    assert t["W_enc"].tolist() == [[0.5, 0.0], [0.0, 1.0]]
    assert t["b_enc"].tolist() == [0.0, -1.5]
    assert t["W_dec"].tolist() == [[1.0, 0.0], [0.0, 1.0]]  # the members' unit rows, unscaled
    # a = (3, 4): member 1 c = (3 − 1)·1 + 0.5 = 2.5, out (3.5, 0); member 2 c = (4 − 2)·2 − 1 = 3, out (0, 5)
    # ensemble = ½(3.5, 0) + ½(0, 5) = (1.75, 2.5); folded: x_c = (2.5, 3), π = (1.25, 3 − 1.5) = (1.25, 1.5) = ½(2.5, 3)
    a = torch.tensor([[3.0, 4.0]])
    codes, out = saelens_forward({"architecture": "standard", "apply_b_dec_to_input": True}, t, a)
    assert codes.tolist() == [[1.25, 1.5]] and out.tolist() == [[1.75, 2.5]]
    assert ens(a).tolist() == [[1.75, 2.5]]


@pytest.mark.parametrize("architecture", ["relu", "jumprelu", "batchtopk", "gated"])
def test_bagging_folded_into_one_sae_reproduces_the_ensemble(architecture):
    ens = Ensemble(random_members(architecture), "bagging")
    arch, t = fold_bagging(ens)
    x = torch.randn(200, D, generator=torch.Generator().manual_seed(1))
    codes, out = saelens_forward({"architecture": arch, "apply_b_dec_to_input": True}, t, x)
    with torch.no_grad():
        assert relative_error(out, ens(x)) < 1e-5
        assert relative_error(codes, ens.encode(x)) < 1e-5  # the concatenated view [α_1 c¹; …; α_J c^J]
        assert float((ens.encode(x) != 0).float().sum()) > 100  # the comparison is not between zeros
    assert torch.equal(t["W_dec"], ens.W_dec.detach())  # decoder rows kept unit norm: α went into the encoder


@pytest.mark.parametrize(("architecture", "method", "why"), [
    ("topk", "bagging", "each member keeps its own k largest latents"),
    ("relu", "boosting", "encodes the residual"),
    ("batchtopk", "boosting", "encodes the residual"),
])
def test_what_one_sae_cannot_represent_is_refused_saying_why(architecture, method, why):
    with pytest.raises(NotOneSAE, match=why):
        fold_bagging(Ensemble(random_members(architecture), method))


# ------------------------------------------------------------------ a run directory
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """Synthetic activations (d = 16) and saved models: ReLU bagging, TopK bagging, BatchTopK boosting, a single TopK SAE."""
    root = tmp_path_factory.mktemp("interop") / "run"
    write_synthetic_activations(root / "activations", {"train": 512, "test": 512}, d=D, n_features=48, rows_per_shard=512)
    models = {"bagging": Ensemble(random_members("relu"), "bagging"),
              "boosting": Ensemble(random_members("batchtopk", seed=2), "boosting"),
              "single": Ensemble(random_members("topk", n_members=1, seed=3), "single")}
    for name, ens in models.items():
        save_ensemble(ens, root / "models" / name / "run=0")
    save_ensemble(Ensemble(random_members("topk", seed=4), "bagging"), root / "models" / "bagging" / "run=1")
    return root


def test_export_writes_saelens_folders_with_saelens_keys(run_dir, tmp_path):
    result = export_model(run_dir, "bagging", 0, tmp_path / "out")
    assert set(result.folders) == {"ensemble", "member_00", "member_01", "member_02"} and result.not_one_sae is None
    for folder in result.folders:
        assert sorted(p.name for p in (tmp_path / "out" / folder).iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    cfg, tensors = read_folder(tmp_path / "out" / "member_01")
    assert list(cfg) == SAELENS_KEYS
    assert cfg["architecture"] == "standard" and (cfg["d_in"], cfg["d_sae"]) == (D, 24) and cfg["normalize_activations"] == "none"
    assert cfg["metadata"]["sae_lens_version"] == "6.54.12" and cfg["metadata"]["hook_name"] == "blocks.0.hook_resid_post"
    assert cfg["metadata"]["sae_ensembles"] == {"model": "bagging", "run": 0, "method": "bagging", "member": 1, "n_members": 3,
                                                "alpha": pytest.approx(1 / 3)}
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {"W_enc": (D, 24), "b_enc": (24,), "W_dec": (24, D), "b_dec": (D,)}
    one, _ = read_folder(tmp_path / "out" / "ensemble")
    assert one["d_sae"] == 3 * 24 and one["architecture"] == "standard"
    listing = json.loads((tmp_path / "out" / "export.json").read_text())
    assert listing["folders"].keys() == result.folders.keys() and listing["saelens_architecture"] == "standard"


@pytest.mark.parametrize("architecture", ["relu", "jumprelu", "batchtopk", "topk", "gated"])
def test_an_exported_member_computes_what_ours_does(architecture, tmp_path):
    members = random_members(architecture)
    export_member(members, 2, tmp_path / "m2")
    cfg, tensors = read_folder(tmp_path / "m2")
    assert cfg["architecture"] == {"relu": "standard", "batchtopk": "jumprelu"}.get(architecture, architecture)
    x = torch.randn(100, D, generator=torch.Generator().manual_seed(5))
    member = members.member(2)
    with torch.no_grad():
        codes, out = saelens_forward(cfg, tensors, x)
        assert torch.allclose(out, member(x), rtol=1e-5, atol=1e-6) and torch.allclose(codes, member.encode(x), rtol=1e-5, atol=1e-6)
        imported = read_saelens_folder(tmp_path / "m2").sae  # batchtopk comes back as a JumpReLU SAE, with the same codes
        assert torch.equal(imported(x), member(x))


def test_export_of_topk_and_boosting_ensembles_gives_members_and_says_why(run_dir, tmp_path, capsys):
    assert cli(["export", str(run_dir), "--method", "bagging", "--run", "1", "--out", str(tmp_path / "topk")]) == 0
    out = capsys.readouterr().out
    assert "not exported as one SAE: an ensemble of TopK members is not one SAELens SAE" in out
    assert sorted(p.name for p in (tmp_path / "topk").iterdir()) == ["export.json", "member_00", "member_01", "member_02"]
    assert cli(["export", str(run_dir), "--method", "boosting", "--one-sae", "--out", str(tmp_path / "boost")]) == 2
    err = capsys.readouterr().err
    assert "boosting run 0 cannot be exported as one SAELens SAE" in err and "encodes the residual" in err
    assert not (tmp_path / "boost" / "ensemble").exists()
    # one member, into OUT itself; an out-of-range member names the range
    assert cli(["export", str(run_dir), "--method", "single", "--member", "0", "--out", str(tmp_path / "one")]) == 0
    assert read_folder(tmp_path / "one")[0]["k"] == 4
    assert cli(["export", str(run_dir), "--method", "single", "--member", "3", "--out", str(tmp_path / "x")]) == 2
    assert "holds 1 members (0..0)" in capsys.readouterr().err


# ------------------------------------------------------------------ import
def test_import_rejects_a_folder_of_another_width_naming_both(run_dir, tmp_path):
    from data_contracts.activations import read_manifest

    export_member(random_members("relu", d=8), 0, tmp_path / "narrow")
    with pytest.raises(ValueError, match=r"reads d_in=8 activations, but the extraction \(synthetic, layer 0\) records d=16"):
        import_saelens_models([ImportedSAE(path=str(tmp_path / "narrow"))], tmp_path / "run", read_manifest(run_dir / "activations"))
    with pytest.raises(ValueError, match="layer 3 was asked for, but the activations were extracted at layer 0"):
        import_saelens_models([ImportedSAE(path=str(tmp_path / "narrow"), layer=3)], tmp_path / "run", read_manifest(run_dir / "activations"))


def test_import_refuses_what_saelens_computes_and_we_cannot(tmp_path):
    export_member(random_members("relu"), 0, tmp_path / "ln")
    cfg = json.loads((tmp_path / "ln" / "cfg.json").read_text())
    (tmp_path / "ln" / "cfg.json").write_text(json.dumps({**cfg, "normalize_activations": "layer_norm"}))
    with pytest.raises(NotImportable, match="normalize_activations='layer_norm' rescales every token"):
        read_saelens_folder(tmp_path / "ln")
    (tmp_path / "ln" / "cfg.json").write_text(json.dumps({**cfg, "architecture": "matching_pursuit"}))
    with pytest.raises(NotImportable, match="'matching_pursuit' has no counterpart here"):
        read_saelens_folder(tmp_path / "ln")


def test_topk_with_decoder_norm_rescaling_imports_with_the_norms_folded(tmp_path):
    members = random_members("topk")
    with torch.no_grad():
        members.W_dec.mul_(torch.linspace(0.5, 2.0, 24)[None, :, None])  # rows of norm 0.5 .. 2
    export_member(members, 0, tmp_path / "t")
    cfg, tensors = read_folder(tmp_path / "t")
    cfg["rescale_acts_by_decoder_norm"] = True
    (tmp_path / "t" / "cfg.json").write_text(json.dumps(cfg))
    x = torch.randn(50, D, generator=torch.Generator().manual_seed(2))
    # SAELens: codes = TopK(π · ‖f‖), output = (codes / ‖f‖) W_dec + b_dec
    norms = tensors["W_dec"].norm(dim=-1)
    pre = ((x - tensors["b_dec"]) @ tensors["W_enc"] + tensors["b_enc"]) * norms
    values, idx = pre.topk(4, dim=-1)
    codes = torch.zeros_like(pre).scatter(-1, idx, values.relu())
    expected = (codes / norms) @ tensors["W_dec"] + tensors["b_dec"]
    folder = read_saelens_folder(tmp_path / "t")
    with torch.no_grad():
        assert torch.allclose(folder.sae(x), expected, rtol=1e-5, atol=1e-5)
        assert torch.allclose(folder.sae.encode(x), codes, rtol=1e-5, atol=1e-5)
    assert torch.allclose(folder.sae.W_dec[0].norm(dim=-1), torch.ones(24)) and "folded the decoder norms" in folder.notes[0]


def test_import_then_export_reproduces_the_folder_bit_for_bit(run_dir, tmp_path):
    """Our exporter's folders (float32 and bfloat16) -> the train stage's import -> export: the same bytes."""
    from data_contracts.activations import read_manifest

    hook = {"hook_name": "blocks.0.hook_resid_post"}
    export_member(random_members("jumprelu"), 1, tmp_path / "a", metadata=hook)
    export_member(random_members("jumprelu", seed=7), 0, tmp_path / "b", metadata=hook)
    cfg, tensors = read_folder(tmp_path / "b")  # b stored in bfloat16, as some SAELens releases are
    save_file({n: t.to(torch.bfloat16) for n, t in tensors.items()}, str(tmp_path / "b" / "sae_weights.safetensors"))
    (tmp_path / "b" / "cfg.json").write_text(json.dumps({**cfg, "dtype": "bfloat16"}))
    entries = [ImportedSAE(path=str(tmp_path / p), role="bagging", hook_name="blocks.0.hook_resid_post") for p in ("a", "b")]
    run = tmp_path / "run"
    manifest = read_manifest(run_dir / "activations")
    written, notes = import_saelens_models(entries, run, manifest)
    assert written == ["models/imported_bagging/run=0"] and "cast ['torch.bfloat16'] to float32" in notes[0]
    assert import_saelens_models(entries, run, manifest)[0] == []  # unchanged folders: reused
    assert (run / "models/imported_bagging/run=0/member_01" / SOURCE_CFG_FILE).is_file()
    for j, name in enumerate(("a", "b")):
        export_model(run, "imported_bagging", 0, tmp_path / f"again_{name}", member=j)
        for file in ("cfg.json", "sae_weights.safetensors"):
            assert (tmp_path / f"again_{name}" / file).read_bytes() == (tmp_path / name / file).read_bytes(), (name, file)
    with pytest.raises(ValueError, match=r"names hook 'blocks.0.hook_resid_post', not the 'blocks.5.hook_resid_post' asked for"):
        import_saelens_models([ImportedSAE(path=str(tmp_path / "a"), hook_name="blocks.5.hook_resid_post")], run, manifest)


def test_imported_saes_go_through_the_train_and_evaluate_stages(run_dir, tmp_path):
    """A single imported SAE and an imported bagging pair, evaluated like trained models; then SAEBench JSON."""
    import shutil

    from data_contracts.labelled import write_table
    from data_contracts.metrics import read_intrinsic
    from sae_core.config import TrainConfig
    from tasks.evaluate import run_evaluation
    from tasks.train import run_training

    run = tmp_path / "run"
    shutil.copytree(run_dir / "activations", run / "activations")
    for name, seed in (("s", 0), ("m0", 1), ("m1", 2)):
        export_member(random_members("relu", n_members=1, seed=seed), 0, tmp_path / name)
    train = TrainStageConfig(methods=[], recipe=TrainConfig(n_steps=1), imported=[
        ImportedSAE(path=str(tmp_path / "s")), ImportedSAE(path=str(tmp_path / "m0"), role="bagging"),
        ImportedSAE(path=str(tmp_path / "m1"), role="bagging", layer=0)])
    result = run_training(train, run, progress=False)
    assert sorted(result.written) == ["models/imported/run=0", "models/imported_bagging/run=0"]
    evaluate = EvaluateConfig(ce_loss=False, top_contexts=0, latents_per_member=0)
    run_evaluation(evaluate, run, progress=False)
    frame = read_intrinsic(run / "metrics" / "intrinsic.parquet")
    points = sorted(set(zip(frame["method"], frame["n_members"])))
    assert points == [("imported", 1), ("imported_bagging", 1), ("imported_bagging", 2)]
    # the imported single SAE's mse is the folder's own reconstruction error on the test split
    from data_contracts.activations import load_split

    x = torch.as_tensor(load_split(run / "activations", "test"))
    with torch.no_grad():
        mse = float(read_saelens_folder(tmp_path / "s").sae(x).sub(x).pow(2).sum(-1).mean())
    value = frame[(frame["method"] == "imported") & (frame["metric"] == "mse")]["value"].item()
    assert value == pytest.approx(mse, rel=1e-5)

    probing = pd.DataFrame([{"method": m, "n_members": j, "run": 0, "dataset": "bbc", "class": c, "k": k, "accuracy": acc}
                            for m, j in (("imported_bagging", 2), ("raw", 0)) for c in ("tech", "sport")
                            for k, acc in ((1, 0.6 if c == "tech" else 0.8), (2, 0.9), (D, 1.0))])
    write_table(probing, run / "downstream" / "probing.parquet", "probing_results")
    written = write_saebench_results(PipelineConfig(name="t", evaluate=evaluate), run)
    assert "report/saebench/core/sae_ensembles_t_imported_bagging_J2_run0_eval_results.json" in written
    core = json.loads((run / "report/saebench/core/sae_ensembles_t_imported_J1_run0_eval_results.json").read_text())
    assert core["eval_type_id"] == "core" and core["sae_lens_id"] == "imported_J1_run0"
    assert core["eval_result_metrics"]["reconstruction_quality"]["mse"] == pytest.approx(mse / D, rel=1e-5)
    assert core["sae_cfg_dict"]["architecture"] == "standard" and core["sae_cfg_dict"]["d_sae"] == 24
    bagged = json.loads((run / "report/saebench/core/sae_ensembles_t_imported_bagging_J2_run0_eval_results.json").read_text())
    assert bagged["sae_cfg_dict"]["d_sae"] == 48 and bagged["sae_cfg_dict"]["n_members"] == 2
    sp = json.loads((run / "report/saebench/sparse_probing/sae_ensembles_t_imported_bagging_J2_run0_eval_results.json").read_text())
    # k = 1: mean over the classes (0.6 + 0.8) / 2 = 0.7; k = 2: 0.9; raw k = d = 16 is the dense LLM probe
    assert sp["eval_result_metrics"]["sae"]["sae_top_1_test_accuracy"] == pytest.approx(0.7)
    assert sp["eval_result_metrics"]["llm"]["llm_test_accuracy"] == pytest.approx(1.0)
    assert sp["eval_result_details"][0]["dataset_name"] == "bbc"


# ------------------------------------------------------------------ SAEBench mappings
def test_core_metrics_map_our_definitions_onto_saebench_ones():
    values = {"mse": 8.0, "explained_variance_total": 0.9, "l0": 12.0, "dead_fraction": 0.25, "shrinkage_gamma": 0.95,
              "ce_loss_recovered": 0.8, "ce_loss_sae": 3.5, "ce_loss_clean": 3.0, "ce_loss_zero": 5.5, "kl_divergence": 0.1}
    m = core_metrics(values, d=4, tokens=1000)
    assert m["reconstruction_quality"] == {"explained_variance": 0.9, "mse": 2.0, "cossim": None}  # 8 / d = 8 / 4
    assert m["sparsity"] == {"l0": 12.0, "l1": None}
    assert m["misc_metrics"]["frac_alive"] == 0.75  # 1 − 0.25
    assert m["shrinkage"]["relative_reconstruction_bias"] == 0.95
    assert m["model_performance_preservation"] == {"ce_loss_score": 0.8, "ce_loss_with_ablation": 5.5, "ce_loss_with_sae": 3.5,
                                                   "ce_loss_without_sae": 3.0}
    assert m["token_stats"]["total_tokens_eval_reconstruction"] == 1000
    assert core_metrics({"mse": 1.0}, d=1, tokens=None)["model_performance_preservation"]["ce_loss_score"] is None


def test_probing_metrics_average_classes_then_datasets():
    rows = pd.DataFrame([("bbc", "a", 1, 0.6), ("bbc", "b", 1, 0.8), ("tweets", "pos", 1, 0.5), ("bbc", "a", 3, 0.9)],
                        columns=["dataset", "class", "k", "accuracy"])
    raw = pd.DataFrame([("bbc", "a", 1, 0.7), ("bbc", "a", 8, 0.95)], columns=["dataset", "class", "k", "accuracy"])
    metrics, details, extra = probing_metrics(rows, raw, d=8)
    # bbc k=1: (0.6 + 0.8) / 2 = 0.7; tweets: 0.5; mean over datasets (0.7 + 0.5) / 2 = 0.6
    assert metrics["sae"]["sae_top_1_test_accuracy"] == pytest.approx(0.6)
    assert metrics["sae"]["sae_top_2_test_accuracy"] is None and metrics["llm"]["llm_test_accuracy"] == pytest.approx(0.95)
    assert [d["dataset_name"] for d in details] == ["bbc", "tweets"] and details[1]["llm_top_1_test_accuracy"] is None
    assert extra == {"bbc": {"sae_top_3_test_accuracy": 0.9}}  # k = 3 is not one of SAEBench's fields


# ------------------------------------------------------------------ SAELens itself
@pytest.mark.slow
@pytest.mark.skipif(not PEERS_PYTHON.exists(), reason=".venv-peers (sae-lens 6.54.12) is missing: build it with `make bench-peers`")
def test_saelens_loads_our_folders_and_we_load_and_reexport_its_own(run_dir, tmp_path):
    """Members trained on the run's train split (40 steps, every architecture) and their bagging
    ensembles folded into one SAE: SAELens reproduces our codes and output on the test split."""
    from data_contracts.activations import load_split
    from sae_core import train_bagging
    from sae_core.config import TrainConfig
    from sae_core.interop import export_bagging_as_one_sae

    train = torch.as_tensor(load_split(run_dir / "activations", "train"))
    x = torch.as_tensor(load_split(run_dir / "activations", "test"))
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    checks = []

    def expect(folder: Path, codes: torch.Tensor, out: torch.Tensor) -> None:
        assert float((codes != 0).float().sum(-1).mean()) >= 1  # trained codes, not zeros
        save_file({"codes": codes.contiguous(), "out": out.contiguous()}, str(folder.parent / f"{folder.name}_expected.safetensors"))
        checks.append({"folder": str(folder), "inputs": str(tmp_path / "x.safetensors"),
                       "expected": str(folder.parent / f"{folder.name}_expected.safetensors")})

    for arch in ("relu", "jumprelu", "batchtopk", "topk", "gated"):
        cfg = SAEConfig(architecture=arch, d_in=D, d_sae=32, k=4 if arch in ("topk", "batchtopk") else None)
        ens = train_bagging(cfg, train, TrainConfig(n_steps=40, batch_size=64, lr=3e-3, sparsity_coefficient=1e-3), 3).ensemble.eval()
        with torch.no_grad():
            export_member(ens.members, 1, tmp_path / f"member_{arch}")
            expect(tmp_path / f"member_{arch}", ens.member(1).encode(x), ens.member(1)(x))
            if arch != "topk":
                export_bagging_as_one_sae(ens, tmp_path / f"ensemble_{arch}")
                expect(tmp_path / f"ensemble_{arch}", ens.encode(x), ens(x))
    (tmp_path / "check.json").write_text(json.dumps(checks))
    proc = subprocess.run([str(PEERS_PYTHON), str(ROOT / "tests" / "saelens_peer_check.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "peer_results.json").read_text())
    for r in results["checked"]:
        print(f"{Path(r['folder']).name:<20} {r['class']:<12} output rel. error {r['output_relative_error']:.2e}, "
              f"codes {r['codes_relative_error']:.2e}")
        assert r["output_relative_error"] < 1e-5 and r["codes_relative_error"] < 1e-5, r
    assert {r["class"] for r in results["checked"]} == {"StandardSAE", "JumpReLUSAE", "TopKSAE", "GatedSAE"}
    # SAELens' own saved SAEs: imported here they compute what SAELens computed, and export back to the same bytes
    made_x = load_file(str(tmp_path / "made_inputs.safetensors"))["x"]
    for made in results["made"]:
        folder = Path(made["folder"])
        theirs = load_file(str(folder.parent / f"{made['architecture']}_outputs.safetensors"))
        imported = read_saelens_folder(folder)
        with torch.no_grad():
            assert relative_error(imported.sae(made_x), theirs["out"]) < 1e-5, made
            assert relative_error(imported.sae.encode(made_x), theirs["codes"]) < 1e-5, made
        export_member(imported.sae, 0, tmp_path / "back" / made["architecture"], source_cfg=imported.cfg)
        for file in ("cfg.json", "sae_weights.safetensors"):
            assert (tmp_path / "back" / made["architecture"] / file).read_bytes() == (folder / file).read_bytes(), (made, file)

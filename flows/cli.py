"""The ``sae-ensembles`` command line.

Subcommands so far:
  extract     extract validated activation shards for the config's ``extract`` section
  synthetic   train every architecture on a synthetic sparse dictionary and report how
              well each recovers it (an end-to-end check of sae_core on this machine).

The other pipeline stages (run, train, evaluate, downstream, report) arrive with the
Prefect flows.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path


def _synthetic(args: argparse.Namespace) -> int:
    from sae_core.io import atomic_directory, save_sae
    from sae_core.synthetic import SYNTHETIC_RECIPES, make_sparse_dictionary_data, synthetic_recovery

    archs = args.arch or list(SYNTHETIC_RECIPES)
    unknown = sorted(set(archs) - set(SYNTHETIC_RECIPES))
    if unknown:
        print(f"error: unknown architecture(s) {unknown}; choose from {sorted(SYNTHETIC_RECIPES)}", file=sys.stderr)
        return 2
    out = Path(args.out)
    data = make_sparse_dictionary_data(n_samples=40_960, seed=args.seed)
    reports = []
    print(f"{'architecture':<12} {'recovery':>9} {'random':>7} {'EV':>6} {'L0':>6} {'steps':>6} {'seconds':>8}")
    for arch in archs:
        report, sae = synthetic_recovery(arch, n_steps=args.steps, seed=args.seed, data=data)
        save_sae(sae, out / arch)
        reports.append(asdict(report))
        print(
            f"{arch:<12} {report.recovery:>9.3f} {report.random_recovery:>7.3f} {report.explained_variance:>6.3f} "
            f"{report.l0:>6.2f} {report.n_steps:>6d} {report.seconds:>8.1f}",
            flush=True,
        )
    with atomic_directory(out / "summary") as tmp:
        (tmp / "recovery.json").write_text(json.dumps(reports, indent=2) + "\n")
    print(f"\nSAEs saved under {out}/<architecture>/ (sae.safetensors + cfg.json); table in {out}/summary/recovery.json")
    return 0


def load_config_section(path: str, section: str) -> dict:
    """The ``section`` mapping of a YAML config file; errors name the file and the problem."""
    import yaml

    file = Path(path)
    if not file.is_file():
        raise SystemExit(f"error: config file {file} does not exist")
    try:
        raw = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as err:
        raise SystemExit(f"error: {file} is not valid YAML: {err}")
    if not isinstance(raw, dict):
        raise SystemExit(f"error: {file} must hold a mapping of sections, got {type(raw).__name__}")
    known = {"name", "extract", "train", "evaluate", "downstream", "report"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise SystemExit(f"error: {file} has unknown section(s) {unknown}; known: {sorted(known)}")
    return raw.get(section) or {}


def _extract(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from data_contracts import ContractViolation
    from tasks.config import ExtractConfig
    from tasks.extract import run_extraction

    try:
        cfg = ExtractConfig(**load_config_section(args.config, "extract"))
    except ValidationError as err:
        print(f"error: section 'extract' of {args.config} is invalid:\n{err}", file=sys.stderr)
        return 2
    out = Path(args.out or Path("runs") / Path(args.config).stem)
    try:
        report = run_extraction(cfg, out)
    except (ContractViolation, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    m = report.manifest
    verb = "extracted" if report.did_work else "already up to date:"
    print(f"{verb} {m.model} layer {m.layer} (d={m.d}): " + ", ".join(f"{k} {v} tokens" for k, v in m.tokens_per_split.items()))
    print(f"activations in {out / 'activations'} ({len(m.shards)} shards, {len(report.shards_written)} written), documents in {out / 'documents.parquet'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sae-ensembles", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    syn = sub.add_parser("synthetic", help="recover a known sparse dictionary with every architecture")
    syn.add_argument("--out", default="runs/synthetic", help="output directory (default: runs/synthetic)")
    syn.add_argument("--steps", type=int, default=1200, help="training steps per SAE (default: 1200)")
    syn.add_argument("--seed", type=int, default=0, help="seed of the data and the SAEs (default: 0)")
    syn.add_argument("--arch", action="append", help="architecture to train (repeatable; default: all)")
    syn.set_defaults(handler=_synthetic)
    ext = sub.add_parser("extract", help="extract activation shards (the config's extract section)")
    ext.add_argument("--config", default="configs/default.yaml", help="YAML config (default: configs/default.yaml)")
    ext.add_argument("--out", help="run directory (default: runs/<config name>)")
    ext.set_defaults(handler=_extract)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    raise SystemExit(main())

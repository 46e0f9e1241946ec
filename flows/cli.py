"""The ``sae-ensembles`` command line.

Subcommands so far:
  synthetic   train every architecture on a synthetic sparse dictionary and report how
              well each recovers it (an end-to-end check of sae_core on this machine).

The pipeline stages (run, extract, train, evaluate, downstream, report) arrive with the
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sae-ensembles", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    syn = sub.add_parser("synthetic", help="recover a known sparse dictionary with every architecture")
    syn.add_argument("--out", default="runs/synthetic", help="output directory (default: runs/synthetic)")
    syn.add_argument("--steps", type=int, default=1200, help="training steps per SAE (default: 1200)")
    syn.add_argument("--seed", type=int, default=0, help="seed of the data and the SAEs (default: 0)")
    syn.add_argument("--arch", action="append", help="architecture to train (repeatable; default: all)")
    syn.set_defaults(handler=_synthetic)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    raise SystemExit(main())

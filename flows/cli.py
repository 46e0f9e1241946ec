"""The ``sae-ensembles`` command line.

Subcommands:
  run         the whole pipeline as a Prefect flow (finished stages come from the cache)
  extract, train, evaluate, downstream, interpret, report
              one stage as a Prefect flow; it reads the earlier stages' artifacts
  synthetic   train every architecture on a synthetic sparse dictionary and report how
              well each recovers it (an end-to-end check of sae_core on this machine).
  export      write a trained model as SAELens folders (cfg.json + sae_weights.safetensors)
  sweep       a grid or population of train settings (configs/sweep-smoke.yaml), with the L0 guide

Every stage command takes --config FILE (YAML, default configs/default.yaml), --out DIR
(default runs/<config name>/) and --force STAGE. Without PREFECT_API_URL the flows run
against a temporary local Prefect server; with it, against that server.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flows.storage import is_remote


def _synthetic(args: argparse.Namespace) -> int:
    from flows.synthetic import SUMMARY_DIR, SUMMARY_FILE, SYNTHETIC_ARCHITECTURES, synthetic_flow, unknown_architectures

    archs = args.arch or list(SYNTHETIC_ARCHITECTURES)
    unknown = unknown_architectures(archs)
    if unknown:
        print(f"error: unknown architecture(s) {unknown}; choose from {sorted(SYNTHETIC_ARCHITECTURES)}", file=sys.stderr)
        return 2
    reports = synthetic_flow(out=args.out, architectures=archs, steps=args.steps, seed=args.seed)
    print(f"{'architecture':<12} {'recovery':>9} {'random':>7} {'EV':>6} {'L0':>6} {'steps':>6} {'seconds':>8}")
    for r in reports:
        print(
            f"{r['architecture']:<12} {r['recovery']:>9.3f} {r['random_recovery']:>7.3f} {r['explained_variance']:>6.3f} "
            f"{r['l0']:>6.2f} {r['n_steps']:>6d} {r['seconds']:>8.1f}"
        )
    out = Path(args.out)
    print(f"\nSAEs saved under {out}/<architecture>/ (sae.safetensors + cfg.json); table in {out / SUMMARY_DIR / SUMMARY_FILE}")
    return 0


STAGE_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, RuntimeError, OSError)


def _export(args: argparse.Namespace) -> int:
    from flows.interop import export_run_model

    try:
        result = export_run_model(args.run_dir, args.method, args.run, args.out, member=args.member, one_sae_only=args.one_sae,
                                  fmt=args.format)
    except STAGE_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for folder, what in result.folders.items():
        print(f"{Path(args.out) / folder}: {what}")
    if result.not_one_sae:
        print(f"not exported as one SAE: {result.not_one_sae}")
    print(f"load with: sae_lens.SAE.load_from_disk('{Path(args.out) / next(iter(result.folders))}')")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from flows.configs import ConfigError
    from flows.sweep import load_sweep_config, sweep_flow

    try:
        sweep = load_sweep_config(args.config)
    except ConfigError as err:
        print(str(err), file=sys.stderr)
        return 2

    try:
        summary = sweep_flow(config=sweep, run_dir=args.out)
    except STAGE_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    out = Path(args.out or Path("runs") / sweep.pipeline().name) / "sweep"
    print(f"chosen: {summary['values']} by {summary['why']}")
    print(f"results: {out / 'results.parquet'}; best config: {out / 'best.yaml'}; report: {out / 'report.html'}")
    return 0


def _load(args: argparse.Namespace):
    """(config, run_dir) from --config/--out, or None after printing the config error."""
    from flows.configs import ConfigError, load_pipeline_config

    try:
        cfg = load_pipeline_config(args.config)
    except ConfigError as err:
        print(str(err), file=sys.stderr)
        return None
    out = args.out or str(Path("runs") / cfg.name)
    return cfg, (out if is_remote(out) else Path(out))


def _report_path(run_dir, cfg) -> str:
    """Where report.html is: in the run directory, or for one on object storage its URL and the local mirror's copy."""
    if not is_remote(run_dir):
        return str(Path(run_dir).resolve() / "report" / "report.html")
    from flows.stages import open_store

    return f"{run_dir}/report/report.html (local copy: {open_store(run_dir, cfg.orchestration).local / 'report' / 'report.html'})"


def _print_extract(outcome, run_dir: Path) -> None:
    """The extract command's two lines (what it did and where the activations are)."""
    from flows.stages import extraction_lines

    for line in extraction_lines(outcome, run_dir):
        print(line)


def _print_outcomes(outcomes: dict, run_dir: Path) -> None:
    print(f"{'stage':<11} {'status':<7} {'seconds':>8}  detail")
    for stage, o in outcomes.items():
        status = "cached" if o.cached else "ran"
        print(f"{stage:<11} {status:<7} {o.seconds:>8.1f}  {o.reason or o.cache_key}")


def _stage_command(args: argparse.Namespace) -> int:
    from flows.stages import STAGE_FLOWS, stage_section

    loaded = _load(args)
    if loaded is None:
        return 2
    cfg, run_dir = loaded
    stage = args.command
    if args.force not in (None, stage):
        print(f"error: `sae-ensembles {stage} --force` recomputes {stage} only; to recompute {args.force} and every "
              f"stage after it use `sae-ensembles run --force {args.force}`", file=sys.stderr)
        return 2
    try:
        extra = {} if stage == "report" else {"orchestration": cfg.orchestration}
        outcome = STAGE_FLOWS[stage](config=stage_section(cfg, stage), run_dir=str(run_dir), force=args.force == stage, **extra)
    except STAGE_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if stage == "extract":
        if is_remote(run_dir):
            from flows.stages import open_store

            run_dir = open_store(run_dir, cfg.orchestration).local
        _print_extract(outcome, run_dir)
    else:
        _print_outcomes({stage: outcome}, run_dir)
        if stage == "report":
            print(f"report: {_report_path(run_dir, cfg)}")
    return 0


def _run(args: argparse.Namespace) -> int:
    from flows.stages import pipeline_flow

    loaded = _load(args)
    if loaded is None:
        return 2
    cfg, run_dir = loaded
    try:
        outcomes = pipeline_flow(config=cfg, run_dir=str(run_dir), force=args.force)
    except STAGE_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    _print_outcomes(outcomes, run_dir)
    print(f"report: {_report_path(run_dir, cfg)} (and report.md beside it)")
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
    exp = sub.add_parser("export", help="write a trained model as SAELens folders",
                         description="Write models/<METHOD>/run=<R>/ of RUN_DIR as SAELens folders (SAE.load_from_disk reads "
                         "them): every member as OUT/member_<jj>/, and a bagging ensemble of ReLU, JumpReLU, BatchTopK or gated "
                         "members also as one SAE, OUT/ensemble/ (Proposition 1). TopK and boosting ensembles: members only.")
    exp.add_argument("run_dir", metavar="RUN_DIR", help="the run directory (runs/<name>)")
    exp.add_argument("--method", required=True, help="model directory under models/: bagging, boosting, single, expanded_J<J>, imported, ...")
    exp.add_argument("--run", type=int, default=0, help="run r (default: 0)")
    exp.add_argument("--member", type=int, help="export only member J, to OUT itself")
    exp.add_argument("--one-sae", action="store_true", help="export only the ensemble as one SAE (OUT/ensemble/); refused, "
                     "saying why, for TopK members and boosting")
    exp.add_argument("--format", default="saelens", choices=["saelens"], help="output format (default: saelens)")
    exp.add_argument("--out", required=True, help="output directory")
    exp.set_defaults(handler=_export)
    swp = sub.add_parser("sweep", help="train and score a grid or population of train settings; pick k with the L0 guide",
                         description="Extract with the base config's extract section (cached), train one SAE per grid point and "
                         "seed (or a population), score each on the validation split, write OUT/sweep/ (results.parquet, "
                         "best.yaml, report.md/html).")
    swp.add_argument("--config", required=True, help="sweep YAML (e.g. configs/sweep-smoke.yaml)")
    swp.add_argument("--out", help="run directory (default: runs/<base config name>)")
    swp.set_defaults(handler=_sweep)
    from flows.stages import STAGES

    helps = {
        "run": "run the whole pipeline (finished stages come from the cache)",
        "extract": "extract activation shards (the config's extract section)",
        "train": "train single, expanded, bagging and boosting SAEs",
        "evaluate": "compute the intrinsic metrics and their figures",
        "downstream": "sparse probing and spurious correlation removal",
        "interpret": "explain sampled latents with an LLM, score the explanations, run the latent analyses",
        "report": "write report/report.md and report/report.html",
    }
    for name, text in helps.items():
        cmd = sub.add_parser(name, help=text, description=text)
        cmd.add_argument("--config", default="configs/default.yaml", help="YAML config (default: configs/default.yaml)")
        cmd.add_argument("--out", help="run directory (default: runs/<config name>)")
        if name == "run":
            cmd.add_argument("--force", choices=STAGES, metavar="STAGE",
                             help=f"recompute STAGE and every stage after it ({', '.join(STAGES)})")
            cmd.set_defaults(handler=_run)
        else:
            cmd.add_argument("--force", nargs="?", const=name, choices=STAGES, metavar="STAGE",
                             help=f"recompute {name} even if its cached result is valid")
            cmd.set_defaults(handler=_stage_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    raise SystemExit(main())

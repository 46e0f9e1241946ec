"""End-to-end time of the default pipeline (`make run`'s work), from a fresh run directory.

Runs ``sae-ensembles run --config configs/default.yaml`` in a subprocess (a temporary
Prefect server starts, as in `make run`), into an empty directory, and records the wall
time and each stage's seconds from the CLI's stage table. The install step of a fresh
clone (~1.5 min) is not included. Takes ~5-8 minutes on this machine.

    python benchmarks/bench_pipeline.py [--config configs/default.yaml] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGE_LINE = re.compile(r"^(extract|train|evaluate|downstream|report)\s+(ran|cached)\s+([0-9.]+)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    parser.add_argument("--keep", help="run into this directory (must not exist) and keep it")
    parser.add_argument("--json", default=str(ROOT / "runs" / "bench" / "pipeline.json"))
    args = parser.parse_args()
    tmp = None
    if args.keep:
        out = Path(args.keep)
        if out.exists():
            raise SystemExit(f"error: {out} exists; the benchmark times a fresh run, choose a new directory")
    else:
        tmp = tempfile.mkdtemp(prefix="bench-pipeline-")
        out = Path(tmp) / "run"
    env = {**os.environ, "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "60", "HF_HUB_OFFLINE": "1"}
    cli = Path(sys.executable).parent / "sae-ensembles"
    start = time.perf_counter()
    proc = subprocess.run([str(cli), "run", "--config", args.config, "--out", str(out)], env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    try:
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
            raise SystemExit(f"error: the pipeline failed (exit {proc.returncode}); output above")
        stages = {m.group(1): float(m.group(3)) for line in proc.stdout.splitlines() if (m := STAGE_LINE.match(line))}
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    result = {"config": args.config, "wall_seconds": wall, "stage_seconds": stages}
    print(f"default pipeline ({Path(args.config).name}), fresh run directory: {wall:.0f} s wall "
          f"({wall / 60:.1f} min); " + ", ".join(f"{s} {v:.0f} s" for s, v in stages.items()))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

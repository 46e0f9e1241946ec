"""Against a real ``prefect server``: the smoke pipeline, its flow runs and artifacts through the
API, ``prefect deploy --all`` with the shipped prefect.yaml, a worker running a deployment,
and a headless-Chromium screenshot of a flow-run page (saved to runs/ui-check/).

Slow (about 2-4 minutes on 2 cores): ``make ui-check`` or ``pytest -m slow tests/test_prefect_server.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SCREENSHOTS = ROOT / "runs" / "ui-check"
STAGES = ["extract", "train", "evaluate", "downstream", "interpret", "report"]

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api(url: str, path: str, body: dict | None = None):
    req = urllib.request.Request(
        f"{url}{path}", data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"}, method="GET" if body is None else "POST",
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def _stop(proc: subprocess.Popen, name: str) -> None:
    """SIGINT, and again: a Prefect worker ignores the first signal while it has nothing to do."""
    for sig in (signal.SIGINT, signal.SIGINT, signal.SIGKILL):
        if proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
           "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api"}
    env.pop("PREFECT_API_URL", None)
    log = open(home / "server.log", "w")
    proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            if _api(url, "/health") is True:
                break
        except OSError:
            time.sleep(1)
    else:
        _stop(proc, "server")
        pytest.fail(f"prefect server did not answer on {url} within 90 s; log: {(home / 'server.log').read_text()[-2000:]}")
    client_env = {**env, "PREFECT_API_URL": url}
    yield url, client_env
    _stop(proc, "server")


def test_smoke_pipeline_against_a_server_then_deploy_worker_and_screenshot(server, tmp_path):
    url, env = server
    run_dir = tmp_path / "smoke"
    t0 = time.time()
    proc = subprocess.run([str(BIN / "sae-ensembles"), "run", "--config", "configs/smoke.yaml", "--out", str(run_dir)],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first_s = time.time() - t0
    assert str(run_dir / "report" / "report.html") in proc.stdout
    print(f"\nsmoke pipeline against the server: {first_s:.1f} s\n{proc.stdout}")

    # the flow runs, through the API
    runs = _api(url, "/flow_runs/filter", {"limit": 50})
    by_name = {r["name"]: r for r in runs}
    names = ["pipeline-smoke"] + [f"{s}-smoke" for s in STAGES]
    assert set(names) <= set(by_name), sorted(by_name)
    assert all(by_name[n]["state_type"] == "COMPLETED" for n in names)

    # their artifacts: a summary per stage, tables, the training progress at 100 %
    arts = _api(url, "/artifacts/filter", {"limit": 200})
    keys = {a["key"] for a in arts if a.get("key")}
    assert {f"smoke-{s}-summary" for s in STAGES} <= keys, sorted(keys)
    assert "smoke-train-progress" in keys
    progress = [a for a in arts if a.get("key") == "smoke-train-progress"]
    assert progress and float(progress[0]["data"]) == 100.0
    evaluate_run = by_name["evaluate-smoke"]["id"]
    evaluate_arts = [a for a in arts if a.get("flow_run_id") == evaluate_run]
    assert {"markdown", "table"} <= {a["type"] for a in evaluate_arts}

    # prefect deploy --all with the shipped prefect.yaml, a worker, a triggered deployment
    subprocess.run([str(BIN / "prefect"), "work-pool", "create", "sae-ensembles", "--type", "process"],
                   capture_output=True, text=True, cwd=ROOT, env=env, timeout=120, check=True)
    deploy = subprocess.run([str(BIN / "prefect"), "--no-prompt", "deploy", "--all"],
                            capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]
    deployments = {d["name"]: d for d in _api(url, "/deployments/filter", {"limit": 50})}
    assert set(STAGES + ["pipeline"]) <= set(deployments)
    schedules = deployments["pipeline"].get("schedules") or []
    assert any((s.get("schedule") or {}).get("cron") == "0 3 * * *" for s in schedules)

    worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "sae-ensembles"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT, env=env)
    try:
        t0 = time.time()
        trigger = subprocess.run(
            [str(BIN / "prefect"), "deployment", "run", "report/report", "--param", "config_file=configs/smoke.yaml",
             "--param", f"run_dir={run_dir}", "--watch", "--watch-timeout", "400"],
            capture_output=True, text=True, cwd=ROOT, env=env, timeout=450,
        )
        assert trigger.returncode == 0 and "Completed" in trigger.stdout, trigger.stdout[-3000:] + trigger.stderr[-2000:]
        print(f"report deployment through the worker: {time.time() - t0:.1f} s")
    finally:
        _stop(worker, "worker")

    # screenshots: the pipeline run (its subflows), the evaluate summary artifact (tables, figures)
    # and the pipeline deployment's run form (the pydantic config rendered as a form)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium for the screenshot (apt-get install -y chromium)")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    ui = url.removesuffix("/api")
    summary_id = next(a["id"] for a in evaluate_arts if a.get("key") == "smoke-evaluate-summary")
    for name, page, height in [("pipeline-run", f"{ui}/runs/flow-run/{by_name['pipeline-smoke']['id']}", 1200),
                               ("evaluate-summary-artifact", f"{ui}/artifacts/artifact/{summary_id}", 3200),
                               ("pipeline-run-form", f"{ui}/deployments/deployment/{deployments['pipeline']['id']}/run", 1600)]:
        shot = SCREENSHOTS / f"{name}.png"
        shot.unlink(missing_ok=True)
        subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / ('chromium-' + name)}", f"--window-size=1400,{height}",
             "--virtual-time-budget=20000", "--hide-scrollbars", f"--screenshot={shot}", page],
            capture_output=True, text=True, timeout=180,
        )
        assert shot.is_file() and shot.stat().st_size > 20_000, f"no screenshot of {page}"
        print(f"screenshot: {shot}")

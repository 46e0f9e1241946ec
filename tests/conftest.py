"""Test-wide environment: offline hubs, no telemetry, caches in a temp dir (set before imports)."""

import os
import tempfile

_TMP = tempfile.mkdtemp(prefix="sae-ensembles-tests-")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "60")
os.environ.setdefault("PREFECT_HOME", os.path.join(_TMP, "prefect"))
os.environ.setdefault("HF_HOME", os.path.join(_TMP, "hf"))
# the converted SmolLM2 is worth keeping between runs; everything else is per session
os.environ.setdefault("SAE_ENSEMBLES_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "sae-ensembles"))


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def prefect_harness():
    """A throw-away Prefect API (SQLite in a temp dir) for the flow tests; ~7 s once per session.

    Task results are not under PREFECT_HOME: the flows persist them in the run directory.
    """
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield

import subprocess
import sys


def test_import_runs_nothing_and_exposes_api():
    import nncompress

    assert "fit" in nncompress.__all__
    assert callable(nncompress.fit)


def test_cli_models_lists_registry():
    res = subprocess.run(
        [sys.executable, "-m", "nncompress.cli", "models", "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "lenet-300-100" in res.stdout and "266610" in res.stdout


def test_hypothesis_profile_is_loaded():
    import os

    from hypothesis import settings

    name = os.environ.get("HYPOTHESIS_PROFILE", "ci")
    assert settings.get_current_profile_name() == name
    if name == "ci":
        assert settings.default.deadline is None  # Hypothesis's own default is 200 ms

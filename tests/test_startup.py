"""The command line's start-up environment (lorakit.startup): a short OpenMP spin and tcmalloc,
set by one re-exec that happens before torch is imported."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lorakit.startup import WAIT_POLICY, find_tcmalloc, startup_env, tcmalloc_loaded


def test_startup_env_sets_a_short_openmp_spin_unless_the_user_chose_one():
    no_tcmalloc = {"LORAKIT_NO_TCMALLOC": "1"}
    assert startup_env(no_tcmalloc) == WAIT_POLICY
    assert startup_env({**no_tcmalloc, "OMP_NUM_THREADS": "3"}) == WAIT_POLICY  # threads: theirs
    for user in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "300000"}):
        assert startup_env({**no_tcmalloc, **user}) == {}  # the user's setting wins
    assert startup_env({**no_tcmalloc, "LORAKIT_NO_WAIT_POLICY": "1"}) == {}


@pytest.mark.skipif(
    find_tcmalloc() is None or tcmalloc_loaded(), reason="tcmalloc not installed, or loaded"
)
def test_startup_env_prepends_tcmalloc_to_the_users_preload():
    lib = find_tcmalloc()
    assert startup_env({"LD_PRELOAD": "/x.so"})["LD_PRELOAD"] == f"{lib}:/x.so"
    assert "LD_PRELOAD" not in startup_env({"LORAKIT_NO_TCMALLOC": "1"})


def openmp_spin_count(stderr: str) -> str:
    """The spin count libgomp used, from the last OMP_DISPLAY_ENV=VERBOSE block (the re-exec's)."""
    return [line.split("'")[1] for line in stderr.splitlines() if "GOMP_SPINCOUNT =" in line][-1]


def test_reexec_reaches_openmp_once_and_the_users_choice_wins(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(
        "import sys\nfrom lorakit.startup import reexec_for_speed, tcmalloc_loaded\n"
        "reexec_for_speed()\nimport torch\nprint('loaded', tcmalloc_loaded(), sys.argv[1:])\n"
    )
    drop = (
        "LD_PRELOAD",
        "LORAKIT_NO_TCMALLOC",
        "LORAKIT_NO_WAIT_POLICY",
        "OMP_WAIT_POLICY",
        "GOMP_SPINCOUNT",
        "LORAKIT_REEXEC",
    )
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(PYTHONPATH=os.pathsep.join(p for p in sys.path if p), OMP_DISPLAY_ENV="VERBOSE")
    out = subprocess.run(
        [sys.executable, str(script), "x"], env=env, capture_output=True, text=True
    )
    assert out.stdout.strip() == f"loaded {find_tcmalloc() is not None} ['x']", out.stderr
    assert openmp_spin_count(out.stderr) == WAIT_POLICY["GOMP_SPINCOUNT"]
    env.update(LORAKIT_NO_TCMALLOC="1", OMP_WAIT_POLICY="ACTIVE")
    out = subprocess.run(
        [sys.executable, str(script), "x"], env=env, capture_output=True, text=True
    )
    assert out.stdout.strip() == "loaded False ['x']", out.stderr
    assert openmp_spin_count(out.stderr) == "30000000000"  # libgomp's ACTIVE, not ours


def test_the_reexec_decision_imports_nothing_heavy():
    probe = (
        "import os\nos.environ['LORAKIT_REEXEC'] = '1'\n"
        "from lorakit.startup import reexec_for_speed\nreexec_for_speed()\n"
        "import sys\nprint(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'numpy'}))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert out.stdout.strip() == "[]", out.stderr

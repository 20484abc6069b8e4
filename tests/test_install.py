"""install.sh's choice of torch build: the CPU wheel index on a Linux machine with no NVIDIA GPU
and no package source of its own in pip's configuration; the CUDA build where a GPU is; the
configured source (a mirror, a wheel folder) wherever pip names one."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

INSTALL = Path(__file__).parents[1] / "install.sh"
NONE = ""  # `pip config list` on a machine without a pip configuration prints nothing
MIRROR = "global.index-url='https://mirror.example/simple'"
WHEELS = ":env:.find-links='/opt/wheels'\nglobal.cert='/etc/ssl/certs/ca.crt'"
EXTRA = "global.extra-index-url='file:///opt/pypi/simple'"


def choice(config: str, gpu: str, system: str, override: str | None = None) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k != "LORAKIT_TORCH"}
    env["PYTHON"] = "false"  # were the script run rather than sourced, it would stop at once
    if override is not None:
        env["LORAKIT_TORCH"] = override
    done = subprocess.run(
        ["bash", "-c", 'source "$1" && torch_choice "$2" "$3" "$4"', "bash", INSTALL]
        + [config, gpu, system],
        capture_output=True,
        text=True,
        env=env,
    )
    return done.returncode, (done.stdout + done.stderr).strip()


@pytest.mark.parametrize(
    ("config", "gpu", "system", "expected"),
    [
        (NONE, "no", "Linux", "cpu"),  # the case that pulled in several GB of CUDA packages
        (NONE, "yes", "Linux", "cuda"),
        (NONE, "no", "Darwin", "pip"),  # PyPI's macOS torch is the CPU build
        (MIRROR, "no", "Linux", "pip"),
        (WHEELS, "no", "Linux", "pip"),
        (EXTRA, "yes", "Linux", "pip"),
        ("global.cert='/etc/ssl/certs/ca.crt'", "no", "Linux", "cpu"),  # not a package source
    ],
)
def test_torch_build_follows_the_gpu_and_pips_configuration(config, gpu, system, expected):
    assert choice(config, gpu, system) == (0, expected)


def test_the_choice_can_be_overridden_and_a_bad_override_is_named():
    assert choice(MIRROR, "no", "Linux", override="cpu") == (0, "cpu")
    assert choice(NONE, "no", "Linux", override="cuda") == (0, "cuda")
    assert choice(NONE, "no", "Linux", override="auto") == (0, "cpu")
    code, text = choice(NONE, "no", "Linux", override="gpu")
    assert code == 2 and "LORAKIT_TORCH=gpu; expected cpu, cuda, pip or auto" in text


def test_install_sh_installs_the_chosen_build():
    script = INSTALL.read_text()
    # the CPU build is pinned with its local version, from the CPU index, added to pip's own
    assert 'torch="torch==2.13.0+cpu"' in script
    assert 'index=(--extra-index-url "$cpu_index")' in script
    assert 'install ${index[@]+"${index[@]}"} "$torch" -e' in script
    assert "https://download.pytorch.org/whl/cpu" in script


def test_the_settings_read_are_pips_own_listing(tmp_path):
    """What torch_choice is given: pip's configuration as pip lists it (a source named in the
    environment included), so a configured mirror or wheel folder is seen."""
    import sys

    env = {**os.environ, "PIP_FIND_LINKS": str(tmp_path / "wheels"), "PYTHON": "false"}
    done = subprocess.run(
        ["bash", "-c", 'source "$1" && pip_settings "$2"', "bash", INSTALL, sys.executable],
        capture_output=True,
        text=True,
        env=env,
    )
    assert f"find-links='{tmp_path / 'wheels'}'" in done.stdout, done.stdout + done.stderr

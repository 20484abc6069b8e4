"""Staging directories (and so saved adapters, merged models, the converted built-in model) get
the user's umask, not mkdtemp's 0700; the files inside stay readable as the umask allows."""

from __future__ import annotations

import os
import stat

import pytest

from conftest import make_tiny_llama
from lorakit import LoraConfig, get_peft_model
from lorakit.files import staging_dir


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    try:
        yield
    finally:
        os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_staging_dir_uses_the_umask(tmp_path, umask_027):
    first, second = staging_dir(tmp_path, ".x-"), staging_dir(tmp_path, ".x-")
    assert first != second and first.name.startswith(".x-") and not any(first.iterdir())
    assert mode(first) == 0o750  # 0o777 & ~0o027


def test_a_saved_adapter_is_as_readable_as_the_umask_says(tmp_path):
    old = os.umask(0o022)
    try:
        lora = get_peft_model(make_tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
        lora.chat_template = "{{ messages }}"
        lora.save_pretrained(tmp_path / "adapter")
    finally:
        os.umask(old)
    assert mode(tmp_path / "adapter") == 0o755
    for path in (tmp_path / "adapter").iterdir():
        assert mode(path) == 0o644, path.name


def test_apply_umask_reads_the_umask_without_changing_it(tmp_path, umask_027):
    from lorakit.files import apply_umask, current_umask

    (tmp_path / "sub").mkdir()
    private = tmp_path / "sub" / "weights.bin"
    private.write_bytes(b"x")
    private.chmod(0o600)  # as safetensors writes its files
    assert current_umask() == 0o027 and current_umask() == 0o027
    apply_umask(tmp_path)
    assert mode(private) == 0o640

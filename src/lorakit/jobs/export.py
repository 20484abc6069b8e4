"""`lorakit export`: a base model with its adapters merged (verified as `lorakit merge` verifies)
as one GGUF file for llama.cpp, Ollama and LM Studio; or, with `adapter_only`, the adapter as a
GGUF LoRA file with its scales folded in (`jobs.export_lora`); with `ollama`, also a folder with
the GGUF files and a Modelfile (`models.ollama`).

Everything that can be refused (architecture, tokenizer, output path, adapter kind) is refused
before the weights are converted; files appear under their final names only when complete.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from lorakit.errors import AdapterError, ConfigError
from lorakit.files import apply_umask, atomic_dir
from lorakit.jobs.export_lora import folded_error, lora_tensors, write_lora_metadata
from lorakit.jobs.merge import PROMPTS, TOLERANCE, encode_prompts, logits_of, merge_model
from lorakit.lora.model import LoraModel
from lorakit.models import chat_template_of, load_model, load_tokenizer
from lorakit.models.gguf_arch import arch_of, model_tensors, write_hparams
from lorakit.models.gguf_vocab import vocab_fields, write_vocab
from lorakit.models.gguf_write import check_dtype, file_type, write_file
from lorakit.models.ollama import modelfile

BASE_FILE = "base.gguf"  # the base's name in an Ollama folder beside an adapter file


@dataclass
class ExportReport:
    """What `export_gguf` wrote and measured."""

    output: Path
    size: int
    dtype: str
    arch: str
    tensors: int
    adapter_only: bool = False
    merges: list[tuple[str, float]] = field(default_factory=list)  # (adapter, max |diff|)
    tolerance: float = TOLERANCE
    folded_error: float | None = None
    ollama_dir: Path | None = None
    ollama_note: str | None = None

    def lines(self) -> list[str]:
        """A human summary, one fact per line."""
        out = [
            f"merged {name}: merged vs unmerged logits max |diff| = {diff:.3g} (fp32, "
            f"tolerance {self.tolerance:g})"
            for name, diff in self.merges
        ]
        if self.folded_error is not None:
            out.append(
                f"LoRA file: each module's scale folded into B, max |scale B A - delta| = "
                f"{self.folded_error:.3g}; llama.cpp applies it with scale 1 (adapter.lora.alpha 0)"
            )
        kind = "GGUF LoRA adapter" if self.adapter_only else "GGUF model"
        out.append(
            f"wrote {self.output} ({kind}, llama.cpp architecture {self.arch}, {self.dtype}, "
            f"{self.tensors} tensors, {self.size / 2**20:.1f} MiB)"
        )
        if self.ollama_dir:
            out.append(f"wrote {self.ollama_dir}/Modelfile: ollama create NAME -f Modelfile")
        if self.ollama_note:
            out.append(f"Modelfile has no TEMPLATE: {self.ollama_note}")
        return out


def check_gguf_output(out: Path, overwrite: bool, sources: Sequence[str | Path]) -> None:
    """Refuse, before any work, an OUT that is a folder, a file without `overwrite`, or one of
    the inputs."""
    if out.is_dir():
        raise ConfigError(f"OUT {out} is a folder; give the path of the .gguf file to write")
    if out.exists() and not overwrite:
        raise ConfigError(f"OUT {out} exists; pass --overwrite or choose another path")
    for source in sources:
        if Path(source).exists() and Path(source).resolve() == out.resolve():
            raise ConfigError(f"OUT {out} is an input of the export; choose another path")
    out.parent.mkdir(parents=True, exist_ok=True)


def _model_metadata(config: Any, fields: Any, template: str | None, dtype: str, name: str):
    def add(writer: Any) -> None:
        import gguf

        writer.add_type("model")
        writer.add_name(name)
        writer.add_file_type(int(file_type(dtype)))
        if dtype == "q8_0":
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_hparams(writer, config)
        write_vocab(writer, fields, template)

    return add


def write_model(
    model: nn.Module,
    out: Path,
    tokenizer: Any,
    template: str | None,
    dtype: str,
    name: str,
    progress: bool = True,
) -> tuple[int, int]:
    """Write a (merged) Hugging Face model as a GGUF file; (size in bytes, tensors)."""
    config = model.config
    arch = arch_of(config)
    fields = vocab_fields(tokenizer, int(config.vocab_size))
    tensors = model_tensors(config, model.state_dict())
    meta = _model_metadata(config, fields, template, dtype, name)
    return write_file(out, arch.gguf_name, meta, tensors, dtype, progress=progress), len(tensors)


def _merge_verified(
    model: nn.Module, adapter: str | Path, tokenizer: Any, prompts: list[str], tolerance: float
) -> tuple[nn.Module, str | None, float]:
    """Attach, check, merge: (merged model, the adapter's chat template, max |diff|)."""
    lora = LoraModel.from_pretrained(model, adapter)
    template = lora.chat_template or chat_template_of(tokenizer)
    batch = encode_prompts(tokenizer, prompts, template)
    unmerged = logits_of(lora, batch)
    merged = merge_model(lora)
    diff = float((logits_of(merged, batch) - unmerged).abs().max())
    if not diff <= tolerance:
        raise AdapterError(
            f"{adapter}: merged and unmerged logits differ by {diff:.3g} > tolerance "
            f"{tolerance:g}; nothing was written (pass --tolerance to accept it)"
        )
    return merged, lora.chat_template, diff


def export_gguf(
    base: str,
    out: str | Path,
    adapters: Sequence[str | Path] = (),
    *,
    dtype: str = "f32",
    adapter_only: bool = False,
    ollama: str | Path | None = None,
    device: str = "cpu",
    tolerance: float | None = None,
    overwrite: bool = False,
    prompts: list[str] | None = None,
    progress: bool = True,
) -> ExportReport:
    """Export `base` (+ `adapters`, merged in order) to the GGUF file `out`; or, with
    `adapter_only`, the one adapter as a GGUF LoRA file for `base`. With `ollama`, also a folder
    with the file(s) and a Modelfile."""
    out = Path(out)
    check_dtype(dtype)
    check_gguf_output(out, overwrite, [base, *adapters])
    if adapter_only and len(adapters) != 1:
        raise ConfigError(
            f"--adapter-only writes one adapter's LoRA file; got {len(adapters)} --adapter "
            "options (give exactly one)"
        )
    staging = OllamaFolder(ollama, overwrite)
    tokenizer = load_tokenizer(base)
    model = load_model(base, dtype="float32", device=device)
    arch = arch_of(model.config)
    vocab_fields(tokenizer, int(model.config.vocab_size))  # refuse an unsupported tokenizer now
    name = Path(str(base)).name
    with staging as folder:
        if adapter_only:
            model, report = _export_adapter(model, adapters[0], out, dtype, arch.gguf_name, base)
            template = report.pop("template") or chat_template_of(tokenizer)
            if folder is not None:
                write_model(model, folder / BASE_FILE, tokenizer, template, dtype, name, progress)
        else:
            model, report, template = _export_merged(
                model, adapters, out, tokenizer, dtype, name, tolerance, prompts, progress
            )
        result = ExportReport(out, dtype=dtype, arch=arch.gguf_name, **report)
        if folder is not None:
            result.ollama_dir = Path(ollama)
            result.ollama_note = _fill_ollama(folder, out, adapter_only, template, tokenizer)
    return result


def _export_merged(model, adapters, out, tokenizer, dtype, name, tolerance, prompts, progress):
    template, merges = None, []
    bound = TOLERANCE if tolerance is None else tolerance
    for adapter in adapters:
        model, adapter_template, diff = _merge_verified(
            model, adapter, tokenizer, prompts or PROMPTS, bound
        )
        template = adapter_template or template
        merges.append((str(adapter), diff))
    template = template or chat_template_of(tokenizer)
    size, count = write_model(model, out, tokenizer, template, dtype, name, progress)
    return model, {"size": size, "tensors": count, "merges": merges, "tolerance": bound}, template


def _export_adapter(model, adapter, out, dtype, arch_name, base) -> tuple[nn.Module, dict]:
    lora = LoraModel.from_pretrained(model, adapter)
    tensors = lora_tensors(lora)  # refuses what a LoRA file cannot hold, with every reason
    error = folded_error(lora)
    size = write_file(
        out, arch_name, lambda w: write_lora_metadata(w, base), tensors, dtype, progress=False
    )
    template = lora.chat_template
    report = {
        "size": size,
        "tensors": len(tensors),
        "adapter_only": True,
        "folded_error": error,
        "template": template,
    }
    return lora.unload(), report  # the base alone, written next for an Ollama folder


class OllamaFolder:
    """A staging folder swapped into place at the end (`files.atomic_dir`), or None."""

    def __init__(self, folder: str | Path | None, overwrite: bool) -> None:
        self.folder = Path(folder) if folder is not None else None
        if self.folder is not None and self.folder.exists():
            if not self.folder.is_dir():
                raise ConfigError(f"--ollama {folder} exists and is not a folder")
            if any(self.folder.iterdir()) and not overwrite:
                raise ConfigError(f"--ollama {folder} is not empty; pass --overwrite")
        self._context = atomic_dir(self.folder) if self.folder is not None else None

    def __enter__(self) -> Path | None:
        return self._context.__enter__() if self._context else None

    def __exit__(self, *exc: Any) -> Any:
        return self._context.__exit__(*exc) if self._context else None


def _fill_ollama(folder: Path, out: Path, adapter_only: bool, template, tokenizer) -> str | None:
    try:
        os.link(out, folder / out.name)
    except OSError:
        shutil.copyfile(out, folder / out.name)
    model_file, adapter_file = (BASE_FILE, out.name) if adapter_only else (out.name, None)
    text, reason = modelfile(model_file, adapter_file, template, tokenizer)
    (folder / "Modelfile").write_text(text)
    apply_umask(folder)
    if reason:
        print(f"lorakit: Modelfile without TEMPLATE: {reason}", file=sys.stderr)
    return reason

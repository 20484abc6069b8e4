"""The served model: one base, the adapters loaded into it, and where adapters may come from.

A request holds its adapter (`ModelHost.acquire`, a `Lease`) from the moment it is accepted
until its last token. Unloading an adapter stops new requests for it at once; its weights stay
until the last request holding it has ended, and only then is its name free to load again.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit.errors import AdapterError, ConfigError
from lorakit.lora.adapters import read_chat_template
from lorakit.lora.rows import BASE as BASE_ROW
from lorakit.lora.rows import PackedAdapters
from lorakit.ops import PrepackedLinears
from lorakit.serve.lean import LlamaDecode

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-]{0,63}")


@dataclass(frozen=True)
class AdapterEntry:
    """An adapter being served."""

    name: str
    path: Path
    chat_template: str | None
    created: int


class Lease:
    """A request's hold on an adapter: the weights stay loaded until `release()` (idempotent)."""

    def __init__(self, host: ModelHost, entry: AdapterEntry) -> None:
        self.host, self.entry = host, entry
        self._held = True

    @property
    def name(self) -> str:
        """The adapter's name."""
        return self.entry.name

    def release(self) -> None:
        """End the hold; the last release of an unloaded adapter frees its weights."""
        if self._held:
            self._held = False
            self.host._release(self.entry.name)


class ModelHost:
    """The base model and its adapters; `lock` serialises compute with loading and unloading.

    `adapters` lists the adapters new requests may use; an unloaded one whose requests are
    still running is off that list but keeps its weights (`leaving`) until they end.
    """

    def __init__(
        self,
        base: torch.nn.Module,
        base_name: str,
        chat_template: str | None = None,
        packed: bool = True,
        prepack: bool = True,
    ) -> None:
        self.base, self.base_name, self.chat_template = base, base_name, chat_template
        self.lora = None  # a lorakit LoraModel once the first adapter is loaded
        self.adapters: dict[str, AdapterEntry] = {}
        self.lock = threading.RLock()
        self._loaded: dict[str, AdapterEntry] = {}  # every adapter whose weights are in the model
        self._holds: dict[str, int] = {}  # requests holding each loaded adapter
        self._leaving: dict[str, threading.Event] = {}  # unloaded, set once the weights are gone
        self._holds_lock = threading.RLock()  # taken after `lock` when both are needed
        self.created = int(time.time())
        self.packed = packed  # False: always the core's grouped rows (see lorakit.lora.rows)
        # the base's plain fp32 CPU linear layers, prepacked for decode steps (lorakit.ops)
        linears = [m for m in base.modules() if type(m) is torch.nn.Linear] if prepack else []
        self.prepacked = PrepackedLinears(linears)
        self._packed: PackedAdapters | None = None
        self.fuse = True  # False: decode steps without fused groups (benchmarks compare)
        self.lean = True  # False: decode steps through the model's own forward (lean.py)
        self._lean: tuple[torch.nn.Module, LlamaDecode | None] | None = None
        self._fused = None  # lorakit.lora.fused.FusedDecode over the packed adapters
        self._version = 0  # bumped by every load and unload
        self._packed_version = -1
        self._uniform = (-1, False)  # (version, one_adapter_per_batch) as last computed

    @property
    def device(self) -> torch.device:
        """Where the model's weights live."""
        return next(self.base.parameters()).device

    @property
    def forward_model(self) -> torch.nn.Module:
        """The Hugging Face model to call (with LoRA layers inside once adapters are loaded)."""
        return self.base if self.lora is None else self.lora.get_base_model()

    @property
    def lean_decode(self) -> LlamaDecode | None:
        """The lean decode step for the model as it is now, where one applies (`lean.py`)."""
        model = self.forward_model
        if not self.lean:
            return None
        if self._lean is None or self._lean[0] is not model:
            self._lean = (model, LlamaDecode.for_model(model))
        return self._lean[1]

    @contextlib.contextmanager
    def decode(self, rows: list[str]) -> Iterator[None]:
        """Context for a decode step: per-row adapters, prepacked linear layers on CPU and,
        with packed adapters on a prepacking host, the layers that read one input fused
        (`lorakit.lora.fused`; its first step learns the groups)."""
        fuse = self.fuse and bool(self.prepacked.linears)
        with self.prepacked.active(), self.rows(rows, fuse=fuse):
            yield
        fused = self._fused
        if fuse and fused is not None and fused.learn():  # the groups compute those bases now
            self.prepacked.drop(fused.grouped_bases())

    def rows(self, rows: list[str], fuse: bool = False):
        """Context in which batch row i uses adapter rows[i] (BASE_ROW for none)."""
        if self.lora is None:
            if any(name != BASE_ROW for name in rows):
                raise LookupError("no adapters are loaded")
            return contextlib.nullcontext()
        if self.packed and self._packed_version != self._version:
            self._packed = self.lora.pack_adapters(list(self._loaded))
            self.prepacked.restore()  # the new groups are learned with every base prepacked
            self._fused = self.lora.fuse_for_decoding(self._packed)
            self._packed_version = self._version
        if not self.packed:
            return self.lora.mixed_adapters(rows)
        return self.lora.mixed_adapters(rows, self._packed, self._fused if fuse else None)

    @property
    def one_adapter_per_batch(self) -> bool:
        """True when a loaded adapter adapts parameters (a mixture of experts' fused experts,
        `lora.params`): a block there runs once per adapter present in a batch, so the engine
        groups requests by adapter to run each block once per step."""
        if self.lora is None:
            return False
        if self._uniform[0] != self._version:
            from lorakit.lora.params import LoraParams

            found = any(isinstance(m, LoraParams) for m in self.lora.modules())
            self._uniform = (self._version, found)
        return self._uniform[1]

    def template_for(self, adapter: str | None) -> str | None:
        """The adapter's own chat template if it ships one, else the base model's."""
        entry = self._loaded.get(adapter) if adapter else None
        if entry is not None and entry.chat_template:
            return entry.chat_template
        return self.chat_template

    def acquire(self, name: str) -> Lease:
        """Hold a listed adapter for one request; LookupError naming it when it is not listed."""
        with self._holds_lock:
            entry = self.adapters.get(name)
            if entry is None:
                if name in self._leaving:
                    raise LookupError(f"adapter `{name}` is being unloaded")
                raise LookupError(f"no adapter named `{name}` is loaded")
            self._holds[name] = self._holds.get(name, 0) + 1
            return Lease(self, entry)

    def holds(self, name: str) -> int:
        """How many requests hold this adapter now."""
        with self._holds_lock:
            return self._holds.get(name, 0)

    def leaving(self, name: str) -> bool:
        """True while an unloaded adapter waits for its last requests to end."""
        with self._holds_lock:
            return name in self._leaving

    def load(self, name: str, path: str | Path) -> AdapterEntry:
        """Load an adapter (the core checks it against the base first) and list it.

        On any failure the adapter is not listed and the model is left as it was.
        """
        check_adapter_name(name, self.base_name)
        path = Path(path)
        with self.lock:
            self._check_free(name)
            template = read_chat_template(path)
            if self.lora is None:
                from lorakit.lora.model import LoraModel

                self.lora = LoraModel.from_pretrained(self.base, path, adapter_name=name)
            else:
                try:
                    self.lora.load_adapter(path, name)
                except Exception:
                    with contextlib.suppress(Exception):
                        self.lora.delete_adapter(name)
                    raise
            entry = AdapterEntry(name, path, template, int(time.time()))
            with self._holds_lock:
                self._loaded[name] = self.adapters[name] = entry
            self._version += 1
            return entry

    def _check_free(self, name: str) -> None:
        with self._holds_lock:
            if name in self.adapters:
                raise AdapterError(f"an adapter named `{name}` is already loaded; unload it first")
            if name in self._leaving:
                raise AdapterError(
                    f"adapter `{name}` is being unloaded: {self._holds.get(name, 0)} requests "
                    "still use it; load the name again once its unload has finished"
                )

    def unload(self, name: str) -> threading.Event:
        """Stop listing an adapter at once; its weights go when the last request holding it
        ends. Returns an event set once they are gone. KeyError when it is not listed."""
        with self._holds_lock:
            if name not in self.adapters:
                raise KeyError(name)
            del self.adapters[name]
            gone = self._leaving[name] = threading.Event()
            unused = not self._holds.get(name)
        if unused:
            self._drop(name)
        return gone

    def _release(self, name: str) -> None:
        with self._holds_lock:
            self._holds[name] -= 1
            last = self._holds[name] == 0 and name in self._leaving
        if last:
            self._drop(name)

    def _drop(self, name: str) -> None:
        """Remove an unloaded adapter's weights once nothing holds it."""
        with self.lock, self._holds_lock:  # `lock`: never while a step computes with them
            if self._holds.get(name) or name not in self._leaving:
                return
            del self._loaded[name]
            self._holds.pop(name, None)
            self._version += 1
            try:
                if self.lora is not None:
                    self.lora.delete_adapter(name)
            finally:
                self._leaving.pop(name).set()


def check_adapter_name(name: str, base_name: str) -> None:
    """Adapter names are 1-64 of [A-Za-z0-9._-], start alphanumeric, and differ from the base's."""
    if not _NAME.fullmatch(name or ""):
        raise ConfigError(
            f"adapter name {name!r} is not allowed: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    if name == base_name:
        raise ConfigError(f"adapter name {name!r} is the base model's name; choose another")


def resolve_under_root(root: str | Path, requested: str) -> Path:
    """The adapter folder `requested` names under `root`; refuses anything that could leave it.

    Refused: empty names, absolute paths, `..`, backslashes, drive letters, `~`, '%' (encoded
    tricks), control characters, and any path (or file inside it) whose real location, after
    following symlinks, is outside the root.
    """
    if not requested or len(requested) > 512:
        raise AdapterError("lora_path must be a non-empty relative path under the adapters root")
    bad = ("\\", "%", "~", ":")
    parts = requested.split("/")
    if (
        requested.startswith("/")
        or any(ch in requested for ch in bad)
        or any(ord(ch) < 32 for ch in requested)
        or any(part == ".." for part in parts)
    ):
        raise AdapterError(
            f"lora_path {requested!r} is not allowed: give a plain relative path under the "
            "adapters root (no '..', absolute paths, '~', '%', ':' or backslashes)"
        )
    real_root = os.path.realpath(root)
    target = os.path.realpath(os.path.join(real_root, requested))
    if not _inside(real_root, target):
        raise AdapterError(f"lora_path {requested!r} leaves the adapters root")
    if not os.path.isdir(target):
        raise FileNotFoundError(f"no adapter folder {requested!r} under the adapters root")
    for entry in os.scandir(target):
        if not _inside(real_root, os.path.realpath(entry.path)):
            raise AdapterError(f"lora_path {requested!r}: {entry.name} links outside the root")
    return Path(target)


def _inside(root: str, path: str) -> bool:
    return os.path.commonpath([root, path]) == root

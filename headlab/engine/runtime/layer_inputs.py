"""Every layer's input for one prompt under one mask, reached with SDPA attention and kept per session.

An attention map of layer l needs layer l's input hidden states (its Q and K follow from them),
and those depend only on layers 0..l-1. Running those layers with eager attention, as the
shared model is loaded, materialises H x T x T probabilities per layer that nobody looks at
(minutes at 4,096 tokens). So the forward runs through an *SDPA view* of the model:

`sdpa_view(handle)` builds, per call, a stand-in for `handle.model` in which only the modules
on the way from the root to each attention module are new objects: shallow copies that share
their parameters, buffers, every other submodule and their hook dictionaries with the
originals, and whose attention modules (and the model that builds the attention masks) read
a private copy of the config that says "sdpa". Why this is safe for a model every browser
session shares: nothing of the shared model is written (the originals keep their modules,
config and weights; `config._attn_implementation` of the copy is set on the copy's own
field, not through the property, which would reach into shared sub-configs); each call gets
its own view; hooks, the only state the view shares that anyone writes, are registered through
`headlab.engine.core.hooks.temporary_hooks` and `headlab.engine.core.gates.apply` on the *original* modules and
fire on the view too (same dictionaries), each only in the thread that registered it. Setting
the shared config to "sdpa" for the duration of a call, the obvious alternative, would take
the probabilities away from a concurrent session's eager forward.

One forward of the view records, for every layer, its input [1, T, d] and the attention mask
its attention module was given (None when SDPA applies the plain causal / full rule itself),
and stops before the last layer runs (no output of it is needed). A `PromptLayers` entry
fills layer by layer: a caller waits only for the layer it needs.

`LayerInputCache` keeps the entries of recent (model, prompt ids, mask digest) triples, least
recently used first out, at most `max_bytes` of hidden states once every fill has finished
(an entry being filled is never dropped). A new entry is filled by a background thread, so
the first map of layer 2 returns after two layers while the rest of the forward carries on
(an headlab.engine.core.jobs.Job: failures are logged and kept on the entry for its waiters),
and a later switch to any layer costs one layer's Q.K. A cache follows its reader's current
prompt: asking for a new prompt stops the unfinished fills of other prompts at their next
layer (on a 2-core CPU they would halve the new prompt's speed) and forgets them.
Thread-safe; one cache per browser session, so its memory goes with the session.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import threading
import weakref
from collections import OrderedDict
from typing import Any, Callable

import torch
from torch import nn

from headlab.engine.core import gates
from headlab.engine.core.handle import ModelHandle
from headlab.engine.core.hooks import temporary_hooks
from headlab.engine.core.jobs import Job
from headlab.engine.core.mask import PruneMask
from headlab.engine.core.progress import Progress

__all__ = ["DEFAULT_MAX_BYTES", "PromptLayers", "LayerInputCache", "sdpa_view", "record_prompt_layers",
           "prompt_layers_bytes"]

DEFAULT_MAX_BYTES = 2**30  # per cache (one per browser session): 3.7 SmolLM2 prompts of 4,096 tokens (270 MiB each)


class _Stop(Exception):
    """Raised once the last needed layer's input is recorded: running on is wasted work."""


def _shallow(module: nn.Module) -> nn.Module:
    """A new module object with the same attributes (parameters, buffers, hook dicts shared) and its own child table."""
    view = object.__new__(type(module))
    view.__dict__.update(module.__dict__)
    view.__dict__["_modules"] = dict(module._modules)
    return view


def _sdpa_config(config: Any) -> Any:
    view = copy.copy(config)
    if "_attn_implementation_internal" in vars(view):
        vars(view)["_attn_implementation_internal"] = "sdpa"  # the copy's own field; the setter recurses into shared sub-configs
    return view


def _attention_modules(handle: ModelHandle) -> dict[int, nn.Module]:
    """layer -> its attention module, for layers whose attention was not physically removed."""
    adapter = handle.adapter
    return {i: adapter.attention(i) for i in range(len(adapter.layers())) if not adapter.is_subblock_removed(i, "attn")}


def sdpa_view(handle: ModelHandle) -> nn.Module:
    """A per-call stand-in for `handle.model` whose attention runs SDPA; it shares every weight and hook (see module doc)."""
    model = handle.model
    targets = {id(m) for m in _attention_modules(handle).values()}
    views: dict[int, nn.Module] = {id(model): _shallow(model)}
    for path, module in model.named_modules():
        if id(module) not in targets:
            continue
        parent, parent_view = model, views[id(model)]
        for part in path.split("."):
            child = parent._modules[part]
            if id(child) not in views:
                views[id(child)] = _shallow(child)
                parent_view._modules[part] = views[id(child)]
            parent, parent_view = child, views[id(child)]
    configs: dict[int, Any] = {}
    for view in views.values():
        config = view.__dict__.get("config")
        if config is not None and hasattr(config, "_attn_implementation"):
            view.__dict__["config"] = configs.setdefault(id(config), _sdpa_config(config))
    return views[id(model)]


_SIGNATURES: dict[type, inspect.Signature] = {}


def _attention_mask_arg(module: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The `attention_mask` an attention module was called with, positional or keyword."""
    if "attention_mask" in kwargs:
        return kwargs["attention_mask"]
    sig = _SIGNATURES.get(type(module))
    if sig is None:
        sig = _SIGNATURES[type(module)] = inspect.signature(module.forward)
    try:
        return sig.bind_partial(*args, **kwargs).arguments.get("attention_mask")
    except TypeError:
        return None


def prompt_layers_bytes(handle: ModelHandle, n_tokens: int) -> int:
    """Bytes of every layer's input for one prompt of `n_tokens` tokens."""
    g = handle.geometry
    return g.n_layers * n_tokens * g.hidden * torch.finfo(handle.dtype).bits // 8


class PromptLayers:
    """Input hidden states [1, T, d] and attention mask of every layer for one prompt under one mask, filled in order."""

    def __init__(self, handle: ModelHandle, ids: torch.Tensor, mask: PruneMask | None) -> None:
        self.ids = ids  # (1, T)
        self.mask = mask
        self.n_layers = handle.geometry.n_layers
        self.expected_bytes = prompt_layers_bytes(handle, ids.shape[1])
        self._model = weakref.ref(handle.model)
        self._hidden: list[torch.Tensor] = []
        self._masks: list[torch.Tensor | None] = []
        self._error: BaseException | None = None
        self._finished = False
        self._cancelled = False
        self._cond = threading.Condition()
        self.job: Job | None = None  # the background fill, when a LayerInputCache started one

    def is_for(self, model: nn.Module) -> bool:
        return self._model() is model

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def failed(self) -> bool:
        return self._error is not None

    @property
    def n_ready(self) -> int:
        return len(self._hidden)

    def tensors(self) -> list[torch.Tensor]:
        with self._cond:
            return list(self._hidden) + [m for m in self._masks if m is not None]

    def _add(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> None:
        with self._cond:
            self._hidden.append(hidden)
            self._masks.append(attention_mask)
            self._cond.notify_all()

    def cancel(self) -> None:
        """Ask the fill to stop at its next layer (waiters for later layers get an error)."""
        self._cancelled = True
        if self.job is not None:
            self.job.cancel()

    def _finish(self, error: BaseException | None = None) -> None:
        with self._cond:
            self._error, self._finished = error, True
            self._cond.notify_all()

    def layer(self, layer: int, progress: Progress | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(input hidden states [1, T, d], attention mask or None) of `layer`, waiting until the fill reaches it."""
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"layer {layer} does not exist: this model has layers 0..{self.n_layers - 1}")
        reported = -1
        with self._cond:
            while len(self._hidden) <= layer and not self._finished:
                if progress and len(self._hidden) != reported:
                    reported = len(self._hidden)
                    progress(reported, layer + 1)
                self._cond.wait(timeout=0.1)
            if len(self._hidden) > layer:
                if progress:
                    progress(layer + 1, layer + 1)
                return self._hidden[layer], self._masks[layer]
        if self._error is not None:
            raise self._error
        raise RuntimeError(f"the forward stopped before layer {layer}")

    def wait(self) -> None:
        """Block until the fill has finished (raising its error, if any)."""
        with self._cond:
            while not self._finished:
                self._cond.wait(timeout=0.1)
        if self._error is not None:
            raise self._error


@torch.no_grad()
def record_prompt_layers(handle: ModelHandle, entry: PromptLayers, last: int | None = None) -> None:
    """Fill `entry` with the inputs of layers 0..last (default: all) from one forward of the SDPA view, under its mask."""
    adapter = handle.adapter
    last = entry.n_layers - 1 if last is None else last
    attention = _attention_modules(handle)
    pending: list[torch.Tensor] = []

    def commit(layer: int, mask: torch.Tensor | None) -> None:
        entry._add(pending.pop(), mask)
        if layer == last or entry._cancelled:
            raise _Stop

    def on_layer(layer: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            pending.append((args[0] if args else kwargs["hidden_states"]).detach())
            if layer not in attention:
                commit(layer, None)

        return hook

    def on_attention(layer: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            mask = _attention_mask_arg(module, args, kwargs)
            commit(layer, mask.detach() if isinstance(mask, torch.Tensor) else None)

        return hook

    try:
        view = sdpa_view(handle)
        ids = entry.ids.to(handle.device)
        # use_cache=False: no KV cache is built for a forward that is never continued.
        extra = {"use_cache": False} if handle.geometry.causal else {}
        with temporary_hooks() as hooks, gates.apply(handle, entry.mask):
            for layer in range(last + 1):
                # Registered on the original modules: the view shares their hook dictionaries.
                hooks.pre(adapter.layers()[layer], on_layer(layer), with_kwargs=True)
                if layer in attention:
                    hooks.pre(attention[layer], on_attention(layer), with_kwargs=True)
            try:
                view(input_ids=ids, attention_mask=torch.ones_like(ids), **extra)
            except _Stop:
                pass
    except BaseException as error:
        entry._finish(error)
        raise
    stopped = entry._cancelled and entry.n_ready <= last
    entry._finish(RuntimeError("the fill was stopped: another prompt was asked for") if stopped else None)


def _ids_digest(ids: torch.Tensor) -> str:
    return hashlib.sha1(ids.detach().cpu().to(torch.int64).numpy().tobytes()).hexdigest()[:16]


def _mask_key(handle: ModelHandle, mask: PruneMask | None) -> tuple[str, PruneMask | None]:
    """(digest, mask to run): a mask that keeps everything runs as the dense model."""
    if mask is None or mask == PruneMask.dense(handle.geometry):
        return "dense", None
    return mask.digest(), mask


class LayerInputCache:
    """Layer inputs of recent (model, prompt ids, mask) triples, at most `max_bytes` of them (LRU), filled in the background."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[int, str, str], PromptLayers] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes of hidden states held (each storage counted once)."""
        with self._lock:
            return self._bytes()

    def _bytes(self) -> int:
        seen: dict[int, int] = {}
        for entry in self._entries.values():
            for t in entry.tensors():
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return sum(seen.values())

    def prompt_layers(self, handle: ModelHandle, ids: torch.Tensor, mask: PruneMask | None) -> PromptLayers:
        """The entry of `ids` [1, T] under `mask` (None = dense); a new one starts filling in a background thread."""
        digest, run_mask = _mask_key(handle, mask)
        key = (id(handle.model), _ids_digest(ids), digest)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.is_for(handle.model) and not entry.failed:
                self._entries.move_to_end(key)
                return entry
            for other_key, other in list(self._entries.items()):
                if other_key[1] != key[1] and not other.finished:
                    other.cancel()
                    del self._entries[other_key]
            entry = PromptLayers(handle, ids.detach().cpu(), run_mask)
            self._entries[key] = entry
            self._entries.move_to_end(key)
            self._evict(keep=key)
        entry.job = Job(lambda job: record_prompt_layers(handle, entry), name="layer-inputs").start()
        return entry

    def wait(self) -> None:
        """Block until every entry has finished filling (errors stay with their entries)."""
        with self._lock:
            entries = list(self._entries.values())
        for entry in entries:
            with entry._cond:
                while not entry.finished:
                    entry._cond.wait(timeout=0.1)

    def clear(self) -> None:
        """Forget every entry (fills in progress finish, then their memory goes)."""
        with self._lock:
            self._entries.clear()

    def _evict(self, keep: tuple[int, str, str]) -> None:
        """Drop least-recently-used finished entries (never `keep`) while the expected total exceeds max_bytes."""
        def expected() -> int:
            pending = sum(e.expected_bytes * (e.n_layers - e.n_ready) // max(1, e.n_layers)
                          for e in self._entries.values() if not e.finished)
            return self._bytes() + pending

        while expected() > self.max_bytes:
            victim = next((k for k, e in self._entries.items() if k != keep and (e.finished or e.failed)), None)
            if victim is None:
                return
            del self._entries[victim]

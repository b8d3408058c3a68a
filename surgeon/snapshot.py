"""Last-good copies of a model and its optimizers, for undoing a bad stretch of training.

A :class:`Snapshot` copies every parameter and buffer of a module, every tensor in
its optimizers' state and their param-group settings into buffers that are
allocated on the first capture and reused after that. ``location="cpu"`` keeps
them in host memory (pinned when the source is on CUDA, so the copy does not
block the host); ``"device"`` keeps them beside the source (fast, costs device
memory). :meth:`Snapshot.restore` copies back *in place*, so optimizers keep
referring to the same parameter tensors; ``extra`` tensors (GradScaler's scale) travel along.
:meth:`Snapshot.repair_buffers` puts back only the NaN/inf entries of the module's buffers.

Memory: one extra copy of the weights, the buffers and the optimizer state (for
Adam about three times the weights) per snapshot; :attr:`Snapshot.nbytes` says
exactly. Parameters are read with ``module.parameters()`` (local shards under
FSDP), never with ``state_dict()``, which may gather across ranks.
"""

import copy
import weakref
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.parameter import is_lazy
from torch.optim import Optimizer

SnapshotLocation = Literal["cpu", "device"]
SNAPSHOT_LOCATIONS: tuple[str, ...] = ("cpu", "device")


_IMMUTABLE = (float, int, bool, str, type(None))


@dataclass
class _SavedOptimizer:
    groups: list[dict[str, Any]] = field(default_factory=list)
    """Each param group's settings, without ``params``."""
    states: list[dict[str, Any] | None] = field(default_factory=list)
    """Per parameter, in param-group order: its state (``None``: it had none yet), a tensor
    entry as a :class:`_Slot` into the snapshot's flat list of copies."""


class _Slot(NamedTuple):
    """Where a tensor's copy sits in the snapshot's flat list of buffers (a named tuple: one is
    made per optimizer-state tensor per capture, and a tuple is the cheapest to make)."""

    position: int


class Snapshot:
    """One copy of a module's weights and its optimizers' state, taken and restored in place.

    Every tensor is copied by one ``torch._foreach_copy_`` into buffers kept from the last
    capture while the layout (shapes, dtypes, devices, in order) is unchanged: a capture costs
    one pass over the tensors, not a Python call per tensor.
    """

    def __init__(self, location: SnapshotLocation = "cpu") -> None:
        if location not in SNAPSHOT_LOCATIONS:
            raise ValueError(
                f"snapshot location must be one of {SNAPSHOT_LOCATIONS}, got {location!r}"
            )
        self.location = location
        self.step: int | None = None
        """The step at whose start the copy was taken (``None``: empty)."""
        self._buffers: list[Tensor] = []
        self._layout: list[tuple[torch.Size, torch.dtype, torch.device]] = []
        """Of the sources the buffers were made for: reused while it matches."""
        self._nbytes = 0  # of the buffers, counted when they are made
        self._on_cuda = False  # some source is on CUDA: the copy is waited for before a restore
        self._module_count = 0
        self._param_count = 0
        self._extra: list[weakref.ref[Tensor]] = []  # the extra tensors copied, in order
        self._optimizers: list[_SavedOptimizer] = []
        self._copied: torch.cuda.Event | None = None

    @property
    def nbytes(self) -> int:
        """Memory the copy holds, in bytes."""
        return self._nbytes

    @torch.no_grad()
    def capture(
        self,
        module: nn.Module,
        optimizers: list[Optimizer],
        step: int,
        extra: Sequence[Tensor] = (),
    ) -> bool:
        """Copy ``module``'s parameters and buffers, ``extra`` and ``optimizers``' state, reusing
        buffers. ``False`` (nothing copied) while a lazy module has not materialized its tensors
        yet."""
        sources, param_count = _module_tensors(module)
        if any(is_lazy(t) for t in sources):
            return False
        self._module_count, self._param_count = len(sources), param_count
        sources += extra
        self._extra = [weakref.ref(t) for t in extra]
        self._optimizers = [_save_optimizer(opt, sources) for opt in optimizers]
        layout = [(t.shape, t.dtype, t.device) for t in sources]
        if layout != self._layout:
            self._buffers = [self._new_buffer(t) for t in sources]
            self._layout = layout
            self._nbytes = sum(b.numel() * b.element_size() for b in self._buffers)
            self._on_cuda = any(device.type == "cuda" for _, _, device in layout)
        if sources:
            torch._foreach_copy_(self._buffers, sources, non_blocking=True)
        if self._on_cuda:
            self._copied = torch.cuda.Event()
            self._copied.record()
        self.step = step
        return True

    @torch.no_grad()
    def restore(
        self,
        module: nn.Module,
        optimizers: list[Optimizer],
        keep_settings_of: Collection[Optimizer] = (),
        extra: Sequence[Tensor] = (),
    ) -> None:
        """Put the copied values back into the same module, ``extra`` tensors (each that was
        captured: one made since, e.g. GradScaler's scale at its first step, stays as it is)
        and optimizers; the param-group settings (LR, momentum, ...) of ``keep_settings_of``
        stay as they are (an LR scheduler that is not rolled back owns them)."""
        if self.step is None:
            raise ValueError("restore() of an empty snapshot: capture() first")
        tensors, _ = _module_tensors(module)
        if len(tensors) != self._module_count or len(optimizers) != len(self._optimizers):
            raise ValueError("restore() into a module or optimizers other than the captured ones")
        if self._copied is not None:
            self._copied.synchronize()  # rare (a rollback): the host copy must be complete
        buffers = self._buffers[: self._module_count]
        captured = {id(t): i for i, ref in enumerate(self._extra) if (t := ref()) is not None}
        for live in extra:
            index = captured.get(id(live))  # (a captured tensor still alive: ids are unique)
            if index is not None:
                tensors.append(live)
                buffers.append(self._buffers[self._module_count + index])
        for live, buffer in zip(tensors, buffers, strict=True):
            live.copy_(buffer, non_blocking=True)
        for optimizer, saved_opt in zip(optimizers, self._optimizers, strict=True):
            if not any(optimizer is kept for kept in keep_settings_of):
                for group, settings in zip(optimizer.param_groups, saved_opt.groups, strict=True):
                    saved = copy.deepcopy(settings)
                    lr = group.get("lr")
                    if isinstance(lr, Tensor) and isinstance(saved.get("lr"), Tensor):
                        lr.copy_(saved.pop("lr"))  # the same tensor: compiled steps read it
                    group.update(saved)
            params = [p for group in optimizer.param_groups for p in group["params"]]
            for param, state in zip(params, saved_opt.states, strict=True):
                if state is None:
                    optimizer.state.pop(param, None)
                    continue
                live_state = optimizer.state.get(param, {})
                optimizer.state[param] = {
                    key: self._put_back(live_state.get(key), value) for key, value in state.items()
                }

    @torch.no_grad()
    def repair_buffers(self, module: nn.Module) -> int:
        """Replace the NaN/inf entries of ``module``'s floating-point buffers with the copied
        values (a rare path: reads on the host); returns how many buffers had any."""
        if self.step is None:
            raise ValueError("repair_buffers() of an empty snapshot: capture() first")
        buffers = list(module.buffers())
        if self._param_count + len(buffers) != self._module_count:
            raise ValueError("repair_buffers() into a module other than the captured one")
        if self._copied is not None:
            self._copied.synchronize()
        saved = self._buffers[self._param_count : self._module_count]
        repaired = 0
        for live, copy_ in zip(buffers, saved, strict=True):
            if not live.is_floating_point():
                continue
            bad = ~torch.isfinite(live)
            if bool(bad.any()):
                live.copy_(torch.where(bad, copy_.to(live.device), live))
                repaired += 1
        return repaired

    # ------------------------------------------------------------------ internals
    def _new_buffer(self, source: Tensor) -> Tensor:
        if self.location == "device" or source.device.type == "cpu":
            return torch.empty_like(source, memory_format=torch.contiguous_format)
        pin = source.device.type == "cuda"
        return torch.empty(source.shape, dtype=source.dtype, pin_memory=pin)

    def _put_back(self, live: Any, saved: Any) -> Any:
        """The restored value of one optimizer-state entry: copied into the live tensor when it
        has the same shape, dtype and device, else a fresh tensor on the source's device."""
        if not isinstance(saved, _Slot):
            return copy.deepcopy(saved)
        buffer = self._buffers[saved.position]
        shape, dtype, device = self._layout[saved.position]
        if (
            isinstance(live, Tensor)
            and live.shape == shape
            and live.dtype == dtype
            and live.device == device
        ):
            return live.copy_(buffer, non_blocking=True)
        return buffer.to(device, copy=True)


def _module_tensors(module: nn.Module) -> tuple[list[Tensor], int]:
    """The module's parameters, then its buffers (the order a snapshot keeps them in), and how
    many of them are parameters: one walk of the modules for both."""
    params = list(module.parameters())
    return [*params, *module.buffers()], len(params)


def _settings(group: dict[str, Any]) -> dict[str, Any]:
    """A param group's settings without ``params``: numbers, strings and tuples of them as they
    are (immutable), anything else deep-copied."""
    settings = {k: v for k, v in group.items() if k != "params"}
    for key, value in settings.items():
        if not isinstance(value, _IMMUTABLE) and not (
            type(value) is tuple and all(isinstance(v, _IMMUTABLE) for v in value)
        ):
            settings[key] = copy.deepcopy(value)
    return settings


def _save_optimizer(optimizer: Optimizer, sources: list[Tensor]) -> _SavedOptimizer:
    """``optimizer``'s settings and state, its tensors appended to ``sources`` (as slots; the
    caller copies them under ``no_grad``)."""
    saved = _SavedOptimizer()
    for group in optimizer.param_groups:
        saved.groups.append(_settings(group))
        for param in group["params"]:
            state = optimizer.state.get(param)
            if not state:
                saved.states.append(None)
                continue
            entry: dict[str, Any] = {}
            for key, value in state.items():
                if isinstance(value, Tensor):
                    entry[key] = _Slot(len(sources))
                    sources.append(value)
                else:
                    entry[key] = copy.deepcopy(value)
            saved.states.append(entry)
    return saved

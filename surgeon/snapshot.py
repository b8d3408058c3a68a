"""Last-good copies of a model and its optimizers, for undoing a bad stretch of training.

A :class:`Snapshot` copies every parameter and buffer of a module, every tensor in
its optimizers' state and their param-group settings into buffers that are
allocated on the first capture and reused after that. ``location="cpu"`` keeps
them in host memory (pinned when the source is on CUDA, so the copy does not
block the host); ``"device"`` keeps them beside the source (fast, costs device
memory). :meth:`Snapshot.restore` copies back *in place*, so optimizers keep
referring to the same parameter tensors.

Memory: one extra copy of the weights, the buffers and the optimizer state (for
Adam about three times the weights) per snapshot; :attr:`Snapshot.nbytes` says
exactly. Parameters are read with ``module.parameters()`` (local shards under
FSDP), never with ``state_dict()``, which may gather across ranks.
"""

import copy
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

SnapshotLocation = Literal["cpu", "device"]
SNAPSHOT_LOCATIONS: tuple[str, ...] = ("cpu", "device")


@dataclass
class _SavedTensor:
    """A tensor's copy (``buffer``) and the device its source lived on."""

    buffer: Tensor
    device: torch.device


@dataclass
class _SavedOptimizer:
    groups: list[dict[str, Any]] = field(default_factory=list)
    """Each param group's settings, without ``params``."""
    states: list[dict[str, Any] | None] = field(default_factory=list)
    """Per parameter, in param-group order: its state (``None``: it had none yet)."""


class Snapshot:
    """One copy of a module's weights and its optimizers' state, taken and restored in place."""

    def __init__(self, location: SnapshotLocation = "cpu") -> None:
        if location not in SNAPSHOT_LOCATIONS:
            raise ValueError(
                f"snapshot location must be one of {SNAPSHOT_LOCATIONS}, got {location!r}"
            )
        self.location = location
        self.step: int | None = None
        """The step at whose start the copy was taken (``None``: empty)."""
        self._module: list[_SavedTensor] = []
        self._optimizers: list[_SavedOptimizer] = []
        self._spare: dict[tuple[Any, ...], list[Tensor]] = {}
        self._copied: torch.cuda.Event | None = None

    @property
    def nbytes(self) -> int:
        """Memory the copy holds, in bytes."""
        return sum(s.buffer.numel() * s.buffer.element_size() for s in self._saved_tensors())

    @torch.no_grad()
    def capture(self, module: nn.Module, optimizers: list[Optimizer], step: int) -> None:
        """Copy ``module``'s parameters and buffers and ``optimizers``' state, reusing buffers."""
        self._recycle()
        self._module = [self._save(t) for t in _module_tensors(module)]
        self._optimizers = [self._save_optimizer(opt) for opt in optimizers]
        if any(saved.device.type == "cuda" for saved in self._module):
            self._copied = torch.cuda.Event()
            self._copied.record()
        self.step = step

    @torch.no_grad()
    def restore(self, module: nn.Module, optimizers: list[Optimizer]) -> None:
        """Put the copied values back into the same module and optimizers."""
        if self.step is None:
            raise ValueError("restore() of an empty snapshot: capture() first")
        tensors = _module_tensors(module)
        if len(tensors) != len(self._module) or len(optimizers) != len(self._optimizers):
            raise ValueError("restore() into a module or optimizers other than the captured ones")
        if self._copied is not None:
            self._copied.synchronize()  # rare (a rollback): the host copy must be complete
        for live, saved in zip(tensors, self._module, strict=True):
            live.copy_(saved.buffer, non_blocking=True)
        for optimizer, saved_opt in zip(optimizers, self._optimizers, strict=True):
            for group, settings in zip(optimizer.param_groups, saved_opt.groups, strict=True):
                group.update(copy.deepcopy(settings))
            params = [p for group in optimizer.param_groups for p in group["params"]]
            for param, state in zip(params, saved_opt.states, strict=True):
                if state is None:
                    optimizer.state.pop(param, None)
                    continue
                live_state = optimizer.state.get(param, {})
                optimizer.state[param] = {
                    key: _put_back(live_state.get(key), value) for key, value in state.items()
                }

    # ------------------------------------------------------------------ internals
    def _save(self, source: Tensor) -> _SavedTensor:
        source = source.detach()
        key = (source.shape, source.dtype, source.device)
        spares = self._spare.get(key)
        if spares:
            buffer = spares.pop()
        elif self.location == "device" or source.device.type == "cpu":
            buffer = torch.empty_like(source, memory_format=torch.contiguous_format)
        else:
            pin = source.device.type == "cuda"
            buffer = torch.empty(source.shape, dtype=source.dtype, pin_memory=pin)
        buffer.copy_(source, non_blocking=True)
        return _SavedTensor(buffer, source.device)

    def _save_optimizer(self, optimizer: Optimizer) -> _SavedOptimizer:
        saved = _SavedOptimizer()
        for group in optimizer.param_groups:
            saved.groups.append({k: copy.deepcopy(v) for k, v in group.items() if k != "params"})
            for param in group["params"]:
                state = optimizer.state.get(param)
                saved.states.append(
                    None
                    if not state
                    else {
                        k: self._save(v) if isinstance(v, Tensor) else copy.deepcopy(v)
                        for k, v in state.items()
                    }
                )
        return saved

    def _saved_tensors(self) -> list[_SavedTensor]:
        """Every tensor copy the snapshot holds: module tensors, then optimizer state."""
        saved = list(self._module)
        for opt in self._optimizers:
            for state in opt.states:
                saved += [v for v in (state or {}).values() if isinstance(v, _SavedTensor)]
        return saved

    def _recycle(self) -> None:
        """Make the previous capture's buffers available for reuse by shape, dtype and device."""
        self._spare = {}
        for item in self._saved_tensors():
            key = (item.buffer.shape, item.buffer.dtype, item.device)
            self._spare.setdefault(key, []).append(item.buffer)


def _module_tensors(module: nn.Module) -> list[Tensor]:
    return [*module.parameters(), *module.buffers()]


def _put_back(live: Any, saved: Any) -> Any:
    """The restored value of one optimizer-state entry: copied into the live tensor when it
    has the same shape, dtype and device, else a fresh tensor on the source's device."""
    if not isinstance(saved, _SavedTensor):
        return copy.deepcopy(saved)
    buffer = saved.buffer
    if (
        isinstance(live, Tensor)
        and live.shape == buffer.shape
        and live.dtype == buffer.dtype
        and live.device == saved.device
    ):
        return live.copy_(buffer, non_blocking=True)
    return buffer.to(saved.device, copy=True)

"""Staging: copy the state off the training's hands so training can go on.

``Stager.stage(state_dict)`` returns a ``Staged`` snapshot: every tensor
copied into a host buffer set taken from a pool that is reused across saves,
object blobs (already serialised by ``state.py``) shared as they are.

- CPU tensors are copied with a plain ``copy_`` into reused pageable buffers.
- CUDA tensors, ``mode="pinned"``: non-blocking device-to-host copies into
  pinned buffers on a dedicated side stream that first waits for the training
  stream.  ``stage`` returns without a host sync.  The training stream waits
  (on the GPU) for the copies of buffers at once; copies of parameters and
  optimizer state (``deferrable``) overlap the next forward and backward, and
  ``fence()`` (an optimizer step pre-hook) makes the training stream wait for
  them before ``optimizer.step`` changes them.  The writer thread waits for
  the copies' event before reading.
- CUDA tensors, ``mode="device"``: a device-to-device snapshot into reused
  GPU buffers (the stall is the cost of a GPU copy); the device-to-host copy
  runs later on the writer thread, which releases the GPU buffers after it.
- ``mode="auto"``: ``device`` when free GPU memory exceeds the state plus a
  margin, else ``pinned``.

The pool holds whole buffer sets for one state layout.  It allocates a set
only while the budget allows (default: one set for pinned memory, two for
pageable memory), so memory is bounded; when every set is still held by the
writer, ``stage`` waits for one (backpressure).  A state larger than the whole
budget is not staged: the save writes its live tensors, one item at a time, and
training waits for it (``mode="direct"``).  ``prewarm`` allocates a set
ahead of the first save on a background thread.
"""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ._torch_compat import DTensor, empty_host_cache
from .errors import ConfigError

log = logging.getLogger(__name__)

MODES = ("auto", "pinned", "device")
_DEVICE_MARGIN_BYTES = 2 << 30

Path = tuple[Any, ...]


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t  # type: ignore[arg-type]


def _walk(v: Any, path: Path = ()) -> Iterator[tuple[Path, torch.Tensor]]:
    """Every tensor in a nested state dict with its path, in a stable order."""
    if isinstance(v, torch.Tensor):
        yield path, v
    elif isinstance(v, Mapping):
        for k, x in v.items():
            yield from _walk(x, (*path, k))
    elif isinstance(v, (list, tuple)):
        for i, x in enumerate(v):
            yield from _walk(x, (*path, i))


def _rebuild(v: Any, repl: Mapping[Path, torch.Tensor], path: Path = ()) -> Any:
    if isinstance(v, torch.Tensor):
        new = repl[path]
        if isinstance(v, DTensor):  # type: ignore[arg-type]
            return DTensor.from_local(new, v.device_mesh, v.placements, run_check=False,
                                      shape=v.shape, stride=v.stride())
        return new
    if isinstance(v, io.BytesIO):
        return v
    if isinstance(v, Mapping):
        return {k: _rebuild(x, repl, (*path, k)) for k, x in v.items()}
    if isinstance(v, list):
        return [_rebuild(x, repl, (*path, i)) for i, x in enumerate(v)]
    if type(v) is torch.Size:  # a tuple of ints: never holds a tensor, and must stay a Size
        return v
    if isinstance(v, tuple):  # values.py made every other tuple a plain one
        return tuple(_rebuild(x, repl, (*path, i)) for i, x in enumerate(v))
    return v  # ints, floats, strings: immutable, or copied by state.py


@dataclass(frozen=True)
class Spec:
    """What one buffer must hold."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.dtype.itemsize


Layout = tuple[tuple[Path, Spec], ...]


def layout_of(state_dict: Mapping[str, Any]) -> Layout:
    return _layout(list(_walk(state_dict)))


def _layout(items: list[tuple[Path, torch.Tensor]]) -> Layout:
    return tuple((p, Spec(tuple(_local(t).shape), t.dtype)) for p, t in items)


def _any_cuda(items: list[tuple[Path, torch.Tensor]]) -> bool:
    return any(_local(t).is_cuda for _, t in items)


def layout_bytes(layout: Layout) -> int:
    return sum(s.nbytes for _, s in layout)


@dataclass(eq=False)
class BufferSet:
    """One set of buffers matching a layout; held by at most one save at a time."""

    layout: Layout
    buffers: dict[Path, torch.Tensor]
    nbytes: int


class BufferPool:
    """Buffer sets for the current layout, reused across saves, bounded by a byte budget."""

    def __init__(self, *, device: str | torch.device = "cpu", pin: bool = False,
                 budget_bytes: int | None = None, default_sets: int = 1) -> None:
        self.device = torch.device(device)
        self.pin = pin
        self.budget_bytes = budget_bytes
        self.default_sets = default_sets
        self.allocations = 0
        """Buffer sets allocated so far (a warm pool stops counting up)."""
        self._free: list[BufferSet] = []
        self._held = 0
        self._allocated_bytes = 0
        self._layout: Layout | None = None
        self._cond = threading.Condition()

    @property
    def allocated_bytes(self) -> int:
        return self._allocated_bytes

    def _limit(self, set_bytes: int) -> int:
        if self.budget_bytes is not None:
            return self.budget_bytes
        return set_bytes * self.default_sets

    def footprint(self, layout: Layout) -> int:
        """Bytes one set for ``layout`` takes: torch's pinned allocator rounds each
        allocation up to a power of two, so pinned sets are counted as it allocates them."""
        if not self.pin:
            return layout_bytes(layout)
        return sum(0 if s.nbytes == 0 else 1 << (s.nbytes - 1).bit_length() for _, s in layout)

    def acquire(self, layout: Layout, *, wait: Callable[[], None] | None = None) -> BufferSet:
        """A free buffer set for ``layout``; allocates within budget, else waits for a release."""
        set_bytes = self.footprint(layout)
        with self._cond:
            if layout != self._layout:
                self._switch_layout(layout)
            if set_bytes > self._limit(set_bytes):
                raise ConfigError(f"pinned_memory_budget={self.budget_bytes} bytes is smaller than "
                                  f"one copy of the state ({set_bytes} bytes"
                                  + (", each tensor's pinned buffer rounded up to a power of two"
                                     if self.pin else "") + "); raise the budget")
            warned = False
            while True:
                if self._free:
                    buf = self._free.pop()
                    self._held += 1
                    return buf
                if self._allocated_bytes + set_bytes <= self._limit(set_bytes):
                    self._allocated_bytes += set_bytes
                    self._held += 1
                    break
                if not warned and wait is not None:
                    wait()
                    warned = True
                self._cond.wait()
        try:
            return self._allocate(layout, set_bytes)
        except BaseException:
            with self._cond:
                self._allocated_bytes -= set_bytes
                self._held -= 1
                self._cond.notify_all()
            raise

    def _switch_layout(self, layout: Layout) -> None:
        if self._layout is not None:
            log.info("state layout changed; dropping %d idle buffer set(s)", len(self._free))
        dropped, self._free = self._free, []
        self._allocated_bytes -= sum(d.nbytes for d in dropped)
        self._layout = layout
        if dropped and self.pin:
            del dropped  # the last reference: the buffers go back to torch's pinned cache
            empty_host_cache()  # and from there back to the system

    def _allocate(self, layout: Layout, set_bytes: int) -> BufferSet:
        buffers = {p: torch.empty(s.shape, dtype=s.dtype, device=self.device, pin_memory=self.pin)
                   for p, s in layout}
        if self.device.type == "cpu" and not self.pin:
            for b in buffers.values():  # fault the pages in now, not during the first save
                b.zero_()
        with self._cond:
            self.allocations += 1
        log.debug("allocated a buffer set of %d bytes on %s (pinned=%s)", set_bytes, self.device, self.pin)
        return BufferSet(layout, buffers, set_bytes)

    def release(self, buf: BufferSet) -> None:
        with self._cond:
            self._held -= 1
            if buf.layout == self._layout:
                self._free.append(buf)
            else:
                self._allocated_bytes -= buf.nbytes
            self._cond.notify_all()

    def prewarm(self, layout: Layout) -> None:
        """Allocate one set for ``layout`` now (call from a background thread)."""
        buf = self.acquire(layout)
        self.release(buf)


def _exceeds(pool: BufferPool, layout: Layout) -> bool:
    """One set for ``layout`` is larger than the pool's whole budget."""
    return pool.budget_bytes is not None and pool.footprint(layout) > pool.budget_bytes


@dataclass
class Staged:
    """The host-side snapshot of one save, valid once ``wait_ready()`` returns."""

    state_dict: dict[str, Any]
    bytes_staged: int
    mode: str = "cpu"
    """"cpu", "pinned", "device", or "direct": nothing copied, ``state_dict`` holds the live
    tensors (over budget; the save must finish before training goes on)."""
    _event: Any = None
    _finish: Callable[[], None] | None = None
    _releases: list[Callable[[], None]] = field(default_factory=list)

    def wait_ready(self) -> None:
        """Block until every copy has landed in host memory (writer thread)."""
        if self._event is not None:
            self._event.synchronize()
        if self._finish is not None:
            finish, self._finish = self._finish, None
            finish()

    def release(self) -> None:
        """Give the buffers back to their pools (after the write)."""
        releases, self._releases = self._releases, []
        for r in releases:
            r()


class Stager:
    """Stages state dicts into pooled buffers; one per manager."""

    def __init__(self, *, mode: str = "auto", budget_bytes: int | None = None,
                 pageable_sets: int = 2) -> None:
        if mode not in MODES:
            raise ConfigError.field("staging", mode, " | ".join(map(repr, MODES)))
        if budget_bytes is not None and (isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int)
                                         or budget_bytes <= 0):
            raise ConfigError.field("pinned_memory_budget", budget_bytes, "a positive number of bytes or None")
        self.mode = mode
        cuda = torch.cuda.is_available()
        self.host = BufferPool(pin=cuda, budget_bytes=budget_bytes,
                               default_sets=1 if cuda else pageable_sets)
        """Host buffers of CUDA state (pinned) or, without CUDA, of all state (pageable)."""
        self.cpu_host = (BufferPool(budget_bytes=budget_bytes, default_sets=pageable_sets)
                         if cuda else self.host)
        """Host buffers of CPU state: pageable, never pinned (no device copy reads them)."""
        self._device_pool: BufferPool | None = None
        self._stream: Any = None
        self._pending: Any = None
        """The newest deferred copies' event: the side stream runs copies in order, so
        waiting for it covers every earlier save's (``fence``)."""
        self._fence_lock = threading.Lock()
        self._prewarm: threading.Thread | None = None
        self._auto: tuple[Layout, str] | None = None

    # -- choosing a path ---------------------------------------------------------
    def _pool_for(self, cuda: bool) -> BufferPool:
        """The host pool for a state with (pinned) or without (pageable) CUDA tensors."""
        return self.host if cuda else self.cpu_host

    def _path_for(self, cuda: bool, layout: Layout, nbytes: int) -> str:
        if not cuda:
            return "cpu"
        if self.mode == "device":
            return "device"
        if self.mode == "pinned":
            return "pinned"
        # "auto" decides once per layout: switching between saves could deadlock, since a
        # device save takes its host set later, on the writer, behind a pinned one queued
        # after it that took the set at once
        if self._auto is None or self._auto[0] != layout:
            free, _ = torch.cuda.mem_get_info()
            path = "device" if free > nbytes + _DEVICE_MARGIN_BYTES else "pinned"
            log.info("staging='auto': %s (%.2f GB free on the GPU, %.2f GB of state)",
                     path, free / 1e9, nbytes / 1e9)
            self._auto = (layout, path)
        return self._auto[1]

    def _side_stream(self) -> Any:
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        return self._stream

    # -- prewarm -----------------------------------------------------------------
    @property
    def warm(self) -> bool:
        """Whether host buffers exist or are being allocated (cheap to ask every step)."""
        return self.host.allocations + self.cpu_host.allocations > 0 or (
            self._prewarm is not None and self._prewarm.is_alive())

    def prewarm(self, state_dict: Mapping[str, Any]) -> threading.Thread | None:
        """Allocate the host buffers for this layout on a background thread."""
        if self._prewarm is not None and self._prewarm.is_alive():
            return self._prewarm
        items = list(_walk(state_dict))
        layout, pool = _layout(items), self._pool_for(_any_cuda(items))
        if (pool.allocations and pool._layout == layout) or _exceeds(pool, layout):
            return None
        # not a daemon: finite work, and the interpreter then joins it at exit even if the
        # manager was dropped without close() (a daemon thread still inside torch when the
        # interpreter finalises aborts the process: "terminate called without an active exception")
        self._prewarm = threading.Thread(target=self._run_prewarm, args=(pool, layout),
                                         name="asyncckpt-prewarm", daemon=False)
        self._prewarm.start()
        return self._prewarm

    def close(self) -> None:
        """Wait for the prewarm thread (a thread still allocating when the interpreter
        finalises can abort the process); idempotent."""
        thread, self._prewarm = self._prewarm, None
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _run_prewarm(self, pool: BufferPool, layout: Layout) -> None:
        try:
            pool.prewarm(layout)
        except Exception as e:  # noqa: BLE001 - the first save allocates instead, and says why
            log.warning("prewarming staging buffers failed: %s", e)

    def over_budget(self, state_dict: Mapping[str, Any]) -> bool:
        """Whether one copy of ``state_dict`` exceeds ``pinned_memory_budget``: then it is not
        staged at all (``Staged.mode == "direct"``) and the save writes the live tensors,
        one item at a time, while training waits (the stall grows, memory does not)."""
        items = list(_walk(state_dict))
        return _exceeds(self._pool_for(_any_cuda(items)), _layout(items))

    # -- staging -----------------------------------------------------------------
    def stage(self, state_dict: Mapping[str, Any], *,
              on_wait: Callable[[], None] | None = None,
              deferrable: Callable[[torch.Tensor], bool] | None = None) -> Staged:
        """Snapshot ``state_dict``; returns once the training may change it again.

        ``deferrable(t)`` marks CUDA tensors that only a guarded update changes
        (parameters and optimizer state, which ``optimizer.step`` updates).  Their
        copies overlap the next forward and backward; ``fence()`` makes the
        training stream wait for them, and must run before such an update.
        Every other tensor's copy is fenced at once.
        """
        items = list(_walk(state_dict))
        layout, cuda = _layout(items), _any_cuda(items)
        pool = self._pool_for(cuda)
        if _exceeds(pool, layout):
            return Staged(dict(state_dict), 0, mode="direct")
        nbytes = layout_bytes(layout) + _blob_bytes(state_dict)
        path = self._path_for(cuda, layout, nbytes)
        if path == "device":
            return self._stage_device(state_dict, items, layout, nbytes, on_wait, deferrable)
        host = pool.acquire(layout, wait=on_wait)
        staged = Staged({}, nbytes, mode=path, _releases=[lambda: pool.release(host)])
        try:
            if path == "cpu":
                for p, t in items:
                    host.buffers[p].copy_(_local(t).detach())
            else:
                staged._event = self._copy_on_side_stream(items, host.buffers, deferrable)
            staged.state_dict = _rebuild(state_dict, host.buffers)
        except BaseException:  # KeyboardInterrupt too: a lost set would stall every later save
            if path != "cpu":  # copies queued before the error may still write into the set
                self._side_stream().synchronize()
            staged.release()
            raise
        return staged

    def _copy_on_side_stream(self, items: list[tuple[Path, torch.Tensor]],
                             dst: Mapping[Path, torch.Tensor],
                             deferrable: Callable[[torch.Tensor], bool] | None = None) -> Any:
        """Copy on the side stream, after everything queued so far on the training stream.

        Tensors that are not deferrable go first and the training stream waits
        for them at once; the deferrable rest is fenced later (``fence``).
        """
        stream, current = self._side_stream(), torch.cuda.current_stream()
        stream.wait_stream(current)
        now = [(p, t) for p, t in items if deferrable is None or not deferrable(t)]
        later = [(p, t) for p, t in items if deferrable is not None and deferrable(t)]
        with torch.cuda.stream(stream):
            for batch in (now, later):
                for p, t in batch:
                    src = _local(t).detach()
                    dst[p].copy_(src, non_blocking=True)
                    src.record_stream(stream)
                event = torch.cuda.Event()
                event.record(stream)
                if batch is now:
                    current.wait_event(event)
        if later:
            with self._fence_lock:
                self._pending = event
        return event

    def fence(self) -> None:
        """Make the current stream wait for deferred copies (a GPU-side wait; cheap)."""
        if self._pending is None:
            return
        with self._fence_lock:
            event, self._pending = self._pending, None
        if event is not None:
            torch.cuda.current_stream().wait_event(event)

    def _stage_device(self, state_dict: Mapping[str, Any], items: list[tuple[Path, torch.Tensor]],
                      layout: Layout, nbytes: int, on_wait: Callable[[], None] | None,
                      deferrable: Callable[[torch.Tensor], bool] | None = None) -> Staged:
        if self._device_pool is None:
            self._device_pool = BufferPool(device=torch.device("cuda", torch.cuda.current_device()),
                                           default_sets=1)
        pool = self._device_pool
        dev = pool.acquire(layout, wait=on_wait)
        try:
            event = self._copy_on_side_stream(items, dev.buffers, deferrable)
        except BaseException:  # copies queued before the error may still write into the set
            self._side_stream().synchronize()
            pool.release(dev)
            raise
        gone = threading.Event()

        def release_device_set() -> None:
            # once, after the copies into it (and out of it, by finish) are done; also when
            # the save fails before finish ran, or finish failed: the pool holds one set
            if not gone.is_set():
                gone.set()
                event.synchronize()
                pool.release(dev)

        def finish() -> None:
            # writer thread: device snapshot -> pinned host buffers, then free the GPU set
            host = self.host.acquire(layout)
            staged._releases.append(lambda: self.host.release(host))
            event.synchronize()
            with torch.cuda.stream(self._side_stream()):
                for p, _ in items:
                    host.buffers[p].copy_(dev.buffers[p], non_blocking=True)
                done = torch.cuda.Event()
                done.record(self._side_stream())
            done.synchronize()
            release_device_set()
            staged.state_dict = _rebuild(state_dict, host.buffers)

        staged = Staged({}, nbytes, mode="device", _finish=finish, _releases=[release_device_set])
        return staged


def _blob_bytes(state_dict: Mapping[str, Any]) -> int:
    total = 0
    for v in state_dict.values():
        if isinstance(v, io.BytesIO):
            total += v.getbuffer().nbytes
        elif isinstance(v, Mapping):
            total += _blob_bytes(v)
    return total

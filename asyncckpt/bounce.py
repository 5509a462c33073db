"""Host-to-device copies on restore through reused pinned bounce buffers.

A tensor read from a checkpoint lands in pageable host memory (decoded zstd
bytes, or a ``torch.load``-ed item).  Copying pageable memory to a GPU runs
at a fraction of the bus speed (about 1 GB/s), because the driver stages it
through its own small pinned buffers one piece at a time.  ``Bounce`` copies
instead through two pinned buffers of ``chunk_bytes`` each, taken in turn: a
CPU copy fills one while the other's non-blocking copy to the device runs on a
side stream, so reading threads keep the bus busy.

Call order, per reading thread: ``Bounce(device)`` once, ``copy(dst, src)``
per tensor (``dst`` on the device, ``src`` on the host), ``finish()`` before
anything else uses the destinations (it waits for the side stream).  The side
stream first waits for ``after`` (the caller's stream; by default the current
one of the thread that copies), so copies land after whatever the training
stream had queued on the destinations.

For a destination on another device than the ``Bounce``'s, or one that is
not contiguous, ``copy`` is a plain ``dst.copy_(src)``.  (On a CPU device the
buffers are pageable and the copies synchronous: the same chunking, no
stream; the tests use it.)
"""

from __future__ import annotations

from typing import Any

import torch

CHUNK_BYTES = 32 << 20
"""Bytes per bounce buffer (two per reading thread)."""


class Bounce:
    """Two pinned buffers and a side stream for one reading thread (see the module doc)."""

    def __init__(self, device: torch.device | str, *, chunk_bytes: int = CHUNK_BYTES,
                 pin: bool | None = None, after: Any = None) -> None:
        self.device = torch.device(device)
        cuda = self.device.type == "cuda" and torch.cuda.is_available()
        if cuda and self.device.index is None:  # "cuda" means the current device: name it
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.chunk_bytes = max(1, int(chunk_bytes))
        self._after = after
        """The stream whose queued work the copies must follow (default: this thread's current)."""
        self.pin = cuda if pin is None else pin
        self._stream: Any = torch.cuda.Stream(self.device) if cuda else None
        self._bufs: list[torch.Tensor] = []
        self._events: list[Any] = []
        self._turn = 0
        self._started = False

    def _buffer(self, i: int) -> torch.Tensor:
        while len(self._bufs) <= i:
            self._bufs.append(torch.empty(self.chunk_bytes, dtype=torch.uint8, pin_memory=self.pin))
            self._events.append(None)
        return self._bufs[i]

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """``dst.copy_(src)``, through the bounce buffers when ``dst`` is a contiguous device tensor."""
        if dst.device != self.device or not dst.is_contiguous() or dst.dtype != src.dtype \
                or dst.numel() != src.numel() or not dst.numel():
            dst.copy_(src)
            return
        if self._stream is not None and not self._started:
            self._stream.wait_stream(self._after or torch.cuda.current_stream(self.device))
            self._started = True
        out = dst.view(-1).view(torch.uint8)
        raw = src.contiguous().view(-1).view(torch.uint8)
        for start in range(0, raw.numel(), self.chunk_bytes):
            n = min(self.chunk_bytes, raw.numel() - start)
            i, self._turn = self._turn, 1 - self._turn
            buf = self._buffer(i)
            if self._events[i] is not None:
                self._events[i].synchronize()  # the device copy out of this buffer is done
            buf[:n].copy_(raw[start:start + n])
            if self._stream is None:
                out[start:start + n].copy_(buf[:n])
                continue
            with torch.cuda.stream(self._stream):
                out[start:start + n].copy_(buf[:n], non_blocking=True)
                event = torch.cuda.Event()
                event.record(self._stream)
            self._events[i] = event

    def finish(self) -> None:
        """Wait until every copy has landed on the device."""
        if self._stream is not None and self._started:
            self._stream.synchronize()
            self._started = False

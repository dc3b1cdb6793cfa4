"""A matrix that stays in its safetensors file and is read a block of rows at a time.

Calibration statistics are memory-mapped (``CalibrationStats.load``), and every page of a mapping
that is touched counts in the process's resident memory until the mapping goes: one pass of the
top-r eigensolver over FLUX's 15360-wide second moment makes 1.76 GiB resident. ``OnDiskMatrix``
reads rows into one small buffer with ``readinto`` instead, so the file's pages stay in the
kernel's page cache (shared, reclaimable, not the process's) and the resident cost is the buffer
(docs/DESIGN.md "Memory and devices").
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

# safetensors dtype names (https://github.com/huggingface/safetensors, "Format") -> torch dtypes
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


@dataclass(frozen=True)
class OnDiskMatrix:
    """A 2-D tensor at byte ``offset`` of ``file`` (row-major, little-endian, as safetensors stores it).

    ``shape``: (rows, cols); ``dtype``: its element type. Read with ``read_rows`` (a copy; nothing
    stays mapped)."""

    file: Path
    offset: int
    shape: tuple[int, int]
    dtype: torch.dtype

    @classmethod
    def in_safetensors(cls, file: str | Path, name: str) -> OnDiskMatrix:
        """The tensor ``name`` of a safetensors ``file``, located from its header (nothing else read)."""
        file = Path(file)
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        entry = header.get(name)
        if entry is None:
            raise KeyError(f"{file} has no tensor {name!r}")
        dtype = _DTYPES.get(entry["dtype"])
        shape = tuple(entry["shape"])
        begin, end = entry["data_offsets"]
        if dtype is None or len(shape) != 2:
            raise ValueError(f"{file}: {name!r} is {entry['dtype']} of shape {shape}; a 2-D float matrix is needed")
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise ValueError(f"{file}: {name!r} spans {end - begin} bytes, its shape needs "
                             f"{math.prod(shape) * dtype.itemsize}")
        return cls(file, 8 + n + begin, (int(shape[0]), int(shape[1])), dtype)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def read_rows(self, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``[start, stop)`` as a (stop − start, cols) CPU tensor in the file's dtype, read into
        ``out`` (a contiguous CPU tensor of that dtype with at least that many rows) when given."""
        rows, cols = self.shape
        if not 0 <= start <= stop <= rows:
            raise IndexError(f"rows [{start}, {stop}) outside a matrix of {rows} rows")
        n = stop - start
        if out is None:
            buf = torch.empty(n, cols, dtype=self.dtype)
        else:
            fits = out.dtype == self.dtype and out.device.type == "cpu" and out.is_contiguous()
            if not fits or out.shape[1:] != (cols,) or out.shape[0] < n:
                raise ValueError("read_rows: out must be a contiguous CPU tensor of the matrix's dtype and width")
            buf = out[:n]
        view = memoryview(buf.view(torch.uint8).numpy()).cast("B")
        with open(self.file, "rb", buffering=0) as f:
            f.seek(self.offset + start * cols * self.dtype.itemsize)
            done = 0
            while done < len(view):
                got = f.readinto(view[done:])
                if not got:
                    raise EOFError(f"{self.file} ends before rows [{start}, {stop}) of its matrix (truncated?)")
                done += got
        return buf


def row_blocks(c: torch.Tensor | OnDiskMatrix, rows: int) -> Iterator[tuple[int, int, torch.Tensor]]:
    """``(start, stop, c[start:stop])`` for consecutive blocks of ``rows`` rows of ``c: (n, d)``, in
    memory (views) or on disk (read into one reused buffer: each block is valid until the next)."""
    n, d = c.shape
    buf = torch.empty(min(rows, n), d, dtype=c.dtype) if isinstance(c, OnDiskMatrix) else None
    for i in range(0, n, rows):
        j = min(n, i + rows)
        yield i, j, (c.read_rows(i, j, out=buf) if buf is not None else c[i:j])


def row_block_matmul(c: torch.Tensor | OnDiskMatrix, q: torch.Tensor, *, block_bytes: int = 32 << 20
                     ) -> torch.Tensor:
    """``C @ Q`` for ``c: (n, d)`` in memory or on disk and ``q: (d, k)``, one block of rows at a time
    (each block converted to q's dtype and device), so C on disk costs one block of memory. The
    blocks depend only on the shape, so a matrix gives the same product in memory and on disk."""
    z = torch.empty(c.shape[0], q.shape[1], dtype=q.dtype, device=q.device)
    for i, j, blk in row_blocks(c, max(1, block_bytes // (8 * c.shape[1]))):
        torch.matmul(blk.to(device=q.device, dtype=q.dtype), q, out=z[i:j])
    return z


__all__ = ["OnDiskMatrix", "row_block_matmul", "row_blocks"]

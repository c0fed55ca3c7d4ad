"""Positioned reads of ``.npy`` rows into caller buffers: the streamed placement's reader."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from crossalign.io import load_npy


class NpyRows:
    """Rows of a ``.npy`` file read with ``os.preadv`` into caller buffers instead of a memory map:
    pages read this way are never mapped into the process, so its resident set stays at the size of
    the buffers however large the file (the kernel may still cache the file)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        header = load_npy(self.path)  # a memory map only to read the header
        if not isinstance(header, np.memmap) or header.dtype.hasobject or not header.flags.c_contiguous:
            raise ValueError(f"{self.path}: expected a C-ordered numeric .npy file")
        self.shape, self.dtype, self.offset = header.shape, header.dtype, int(header.offset)
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        del header
        self.fd = os.open(self.path, os.O_RDONLY)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        self.close()

    def read_spans(self, starts: np.ndarray, counts: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Rows [starts[j], starts[j] + counts[j]) for each j, concatenated into ``out`` (C-contiguous,
        at least sum(counts) rows of this file's row shape and dtype). Adjacent spans are read in one
        call, so sorted ``starts`` read fastest. Returns the filled rows of ``out``."""
        starts, counts = np.asarray(starts, np.int64), np.asarray(counts, np.int64)
        total = int(counts.sum())
        flat = out.reshape(-1).view(np.uint8)
        if out.dtype != self.dtype or not out.flags.c_contiguous or flat.size < total * self.row_bytes:
            raise ValueError(f"{self.path}: buffer {out.dtype} {list(out.shape)} cannot hold {total} rows of "
                             f"{self.dtype} {list(self.shape[1:])}")
        pos = 0
        j, n = 0, len(starts)
        while j < n:
            k, rows = j + 1, int(counts[j])
            while k < n and starts[k] == starts[k - 1] + counts[k - 1]:  # coalesce adjacent spans
                rows += int(counts[k])
                k += 1
            nbytes = rows * self.row_bytes
            if nbytes:
                view = memoryview(flat[pos:pos + nbytes])
                got = os.preadv(self.fd, [view], self.offset + int(starts[j]) * self.row_bytes)
                while got < nbytes:  # short reads are legal; finish them
                    more = os.preadv(self.fd, [view[got:]], self.offset + int(starts[j]) * self.row_bytes + got)
                    if more <= 0:
                        raise OSError(f"{self.path}: file ends before row {int(starts[j]) + rows}")
                    got += more
            pos += nbytes
            j = k
        return out.reshape(-1)[: total * (self.row_bytes // self.dtype.itemsize)].reshape((total,) + self.shape[1:])

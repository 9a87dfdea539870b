"""Writing lines to a pipe without ever blocking: the fast path of the audit and log writers.

The audit lines (stdout by default) and the logs (stderr) are written by threads of their own
(broker.audit, broker.logs), so that a sink that blocks never stalls the event loop. Handing
every line to a thread costs a wake-up and a switch of the interpreter lock, which measured
more than all the rest of a cache hit's own work. In a container, stdout and stderr are pipes
read by the container runtime, and a write to a pipe that has room cannot block: so a pipe gets
a file description of its own, opened non-blocking (`nonblocking_pipe`), and a line is written
to it directly, from whichever thread logs it, when the pipe takes it whole at once
(`write_whole`: at most PIPE_BUF bytes, which POSIX makes atomic: all or nothing) and nothing
is waiting in the writer's queue before it. Otherwise (a full pipe, a line too long, a
regular file, a socket, a terminal) the line goes to the writer thread as before, and lines
keep their order.

The description is the pipe's own (opened through /proc/self/fd), so its non-blocking flag
touches no other process sharing the pipe, nor this process's other descriptors of it.
"""

from __future__ import annotations

import contextlib
import os
import select
import stat

# POSIX: a write of at most this many bytes to a pipe is atomic.
PIPE_BUF: int = select.PIPE_BUF


def nonblocking_pipe(fd: int) -> int | None:
    """A non-blocking description of the pipe (or FIFO) `fd` writes to, of this process's
    own; None when `fd` is not a pipe or it cannot be opened (then write through a thread)."""
    try:
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return None
        return os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None


def write_whole(fd: int, data: bytes) -> bool:
    """Write `data` to the non-blocking pipe `fd` if it takes all of it at once, now. False
    (nothing written) when it is longer than PIPE_BUF, the pipe is full, or the write fails:
    then the caller's writer thread writes it (and reports a failure)."""
    if len(data) > PIPE_BUF:
        return False
    try:
        return os.write(fd, data) == len(data)
    except OSError:
        return False


def write_lines(fd: int, lines: list[bytes]) -> int:
    """Write whole `lines` (each ending in a newline), in order, to the non-blocking pipe
    `fd`, in writes of at most PIPE_BUF bytes, as far as the pipe takes them at once; how
    many were written (the rest: a full pipe, or a line longer than PIPE_BUF)."""
    done = 0
    while done < len(lines):
        end, size = done, 0
        while end < len(lines) and (end == done or size + len(lines[end]) <= PIPE_BUF):
            size += len(lines[end])
            end += 1
        if not write_whole(fd, b"".join(lines[done:end])):
            break
        done = end
    return done


def close_quietly(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)

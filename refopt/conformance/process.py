"""The runner's side of the port protocol (conformance/PROTOCOL.md): a port in its own process.

``PortProcess(argv)`` starts the program, reads its ``hello``, and runs cases through it, one at a
time, reusing the process. Whatever the port does costs at most the case it is running: an exit
or a crash fails that case (the next one gets a new process), a case that takes longer than the
time limit ends the process, a line that is not a protocol message or too long fails the case,
and standard error is drained and kept to its last few kilobytes. Reading never holds more than
the line limit in memory.
"""
from __future__ import annotations

import atexit
import os
import queue
import signal
import subprocess
import threading
import time
import weakref

from . import protocol
from .protocol import Case, ProtocolError
from .targets import ConfigError, PortFailure, SkipVector

#: Seconds a case may take (``refopt check --timeout``).
DEFAULT_TIMEOUT = 60.0
#: A port gets at least this long to send its hello (imports can be slow on a loaded machine).
MIN_START_TIMEOUT = 60.0
#: After this many cases in a row during which the process died, it is not restarted again.
MAX_DEATHS = 10
STDERR_TAIL = 8192
#: Lines read ahead of the runner: a port that writes faster than it is read waits.
READ_AHEAD = 16
_CHUNK = 1 << 16


#: Port processes still running, ended when the runner exits (however it exits).
_LIVE: "weakref.WeakSet[PortProcess]" = weakref.WeakSet()


@atexit.register
def _end_all() -> None:
    for port in list(_LIVE):
        port.kill()


class _Timeout(Exception):
    pass


class _Exited(Exception):
    pass


class _TooLong(Exception):
    pass


class PortProcess:
    """A port program speaking the protocol; ``name`` is how messages refer to it."""

    def __init__(self, argv: list, name: str, *, timeout: float = DEFAULT_TIMEOUT, env: dict | None = None,
                 worker: bool = False):
        self.argv, self.name, self.timeout, self.env = list(argv), name, float(timeout), env
        self.worker = worker  # refopt's own worker: its start-up errors are already one clean line
        self.proc = None
        self.deaths = 0
        self.limit = protocol.MIN_LINE_LIMIT
        self._hello = None

    # -- life cycle ------------------------------------------------------------------------------

    def hello(self) -> protocol.Hello:
        """Start the port (if it is not running) and return its hello; ConfigError if it cannot."""
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        return self._hello

    def _start(self) -> None:
        self.close()
        try:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, env=self.env, bufsize=0,
                                         start_new_session=os.name == "posix")
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--port {self.name}: cannot start {self.argv[0]!r} ({exc})") from None
        _LIVE.add(self)
        self.lines: queue.Queue = queue.Queue(READ_AHEAD)
        self.stop = threading.Event()
        self.tail = bytearray()
        self.limit = protocol.MIN_LINE_LIMIT
        self._threads = [threading.Thread(target=self._read_lines, args=(self.proc.stdout, self.lines, self.stop),
                                          daemon=True),
                         threading.Thread(target=_read_tail, args=(self.proc.stderr, self.tail), daemon=True)]
        for t in self._threads:
            t.start()
        deadline = time.monotonic() + max(self.timeout, MIN_START_TIMEOUT)
        try:
            self._hello = protocol.read_hello(self._next(deadline))
        except _Timeout:
            self.kill()
            raise ConfigError(f"--port {self.name}: no hello within {max(self.timeout, MIN_START_TIMEOUT):g} s; "
                              f"the port process was ended{self._last_words()}") from None
        except _Exited:
            code = self._reap()
            words = self._last_line(named=False)  # the worker's own one-line reason comes last
            if self.worker and code == 2 and words:
                raise ConfigError(words) from None
            raise ConfigError(f"--port {self.name}: the port {describe(code)} before its hello message"
                              f"{self._last_words()}") from None
        except (ProtocolError, _TooLong) as exc:
            self.kill()
            raise ConfigError(f"--port {self.name}: {exc}") from None

    def close(self) -> None:
        """End the port: close its input (it should exit), then kill what is left."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        self._release()
        try:
            proc.stdin.close()
        except OSError:
            pass
        try:
            proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            _kill(proc)

    def kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None:
            self._release()
            _kill(proc)

    def _release(self) -> None:
        """Let the reader of a process we are leaving finish (it may wait on a full queue)."""
        self.stop.set()
        try:
            while True:
                self.lines.get_nowait()
        except queue.Empty:
            pass

    def _reap(self) -> int:
        proc, self.proc = self.proc, None
        self._release()
        try:
            code = proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # closed its output but lives on
            _kill(proc)
            code = proc.returncode
        self._threads[1].join(timeout=1)  # let the last words on standard error arrive
        return code

    # -- running a case --------------------------------------------------------------------------

    def run(self, case: Case):
        """Yield the port's ``StepResult`` for each gradient of ``case``; PortFailure or
        SkipVector as the port answers. The process is ended if the case is left unfinished."""
        if self.deaths >= MAX_DEATHS:
            raise PortFailure(f"not run: the port process died during the last {MAX_DEATHS} cases in a row")
        if self.proc is None or self.proc.poll() is not None:
            try:
                self._start()
            except ConfigError as exc:
                self.deaths += 1
                raise PortFailure(f"the port could not be restarted: {exc}") from None
        data = protocol.dumps(protocol.case_message(case))
        self.limit = max(protocol.MIN_LINE_LIMIT, protocol.LINE_LIMIT_FACTOR * len(data))
        threading.Thread(target=_write, args=(self.proc, data), daemon=True).start()
        deadline = time.monotonic() + self.timeout
        finished = False
        try:
            for index in range(1, len(case.grads) + 1):
                kind, value = self._reply(index, case, deadline)
                if kind == "error":
                    self.deaths = 0
                    finished = True
                    raise PortFailure(value)
                if kind == "skip":
                    self.deaths = 0
                    finished = True
                    raise SkipVector(value)
                yield value
            finished = True
            self.deaths = 0
        finally:
            if not finished:  # a reader that stopped early, or a failure mid-case: never desynchronise
                self.kill()

    def _reply(self, index: int, case: Case, deadline: float):
        try:
            return protocol.read_reply(self._next(deadline), index, case)
        except _Timeout:
            self.kill()
            self.deaths += 1
            raise PortFailure(f"step {index}: no answer within {self.timeout:g} s (--timeout); the port "
                              f"process was ended{self._last_words()}") from None
        except _Exited:
            code = self._reap()
            self.deaths += 1
            raise PortFailure(f"step {index}: the port {describe(code)} while running this case"
                              f"{self._last_words()}") from None
        except (ProtocolError, _TooLong) as exc:
            self.kill()
            raise PortFailure(f"step {index}: protocol error: {exc}") from None

    def _next(self, deadline: float) -> dict:
        try:
            kind, payload = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise _Timeout from None
        if kind == "eof":
            raise _Exited
        if kind == "long":
            raise _TooLong(f"a line longer than {payload} bytes (the limit for this case)")
        return protocol.loads(payload)

    # -- reading (threads) -----------------------------------------------------------------------

    def _read_lines(self, stream, q, stop) -> None:
        """Split standard output into lines (blank ones skipped), at most READ_AHEAD ahead of the
        runner; stop (and say so) at a line over the limit."""
        def put(item) -> bool:
            q.put(item)
            return not stop.is_set()

        buf, scanned = bytearray(), 0
        try:
            while True:
                chunk = stream.read(_CHUNK)
                if not chunk:
                    break
                buf += chunk
                while True:
                    i = buf.find(b"\n", scanned)
                    if i < 0:
                        scanned = len(buf)
                        break
                    if i > self.limit:
                        put(("long", self.limit))
                        return
                    line = bytes(buf[:i])
                    del buf[:i + 1]
                    scanned = 0
                    if line.strip() and not put(("line", line)):
                        return
                if len(buf) > self.limit:
                    put(("long", self.limit))
                    return
        except (OSError, ValueError):
            pass
        finally:
            _close(stream)
        put(("eof", None))

    def _last_line(self, named: bool = True) -> str:
        text = bytes(self.tail[-STDERR_TAIL:]).decode("utf-8", "replace")
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        if not lines:
            return ""
        # the last line that names an error (a traceback's last line, "Fatal Python error: ..."),
        # else the last line
        errors = [ln for ln in lines if any(w in ln for w in ("Error", "error:", "Exception", "Fatal"))] if named else []
        line = "".join(c if c.isprintable() else "?" for c in (errors or lines)[-1])
        return line[:300] + ("..." if len(line) > 300 else "")

    def _last_words(self) -> str:
        line = self._last_line()
        return f"; last line on its standard error: {line!r}" if line else ""


def _read_tail(stream, tail: bytearray) -> None:
    """Drain standard error, keeping its last STDERR_TAIL bytes (a flood costs no memory)."""
    try:
        while True:
            chunk = stream.read(_CHUNK)
            if not chunk:
                return
            tail += chunk
            if len(tail) > 2 * STDERR_TAIL:
                del tail[:-STDERR_TAIL]
    except (OSError, ValueError):
        return
    finally:
        _close(stream)


def _close(stream) -> None:
    try:
        stream.close()
    except (OSError, ValueError):
        pass


def _write(proc, data: bytes) -> None:
    """Write a whole case to the port (in a thread: a port that does not read cannot block us)."""
    try:
        fd = proc.stdin.fileno()
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except (OSError, ValueError):
        pass


def _kill(proc) -> None:
    """Kill the port and whatever it started (its own process group)."""
    try:
        if os.name == "posix":
            os.killpg(proc.pid, signal.SIGKILL)
        else:  # pragma: no cover
            proc.kill()
    except (ProcessLookupError, PermissionError, OSError):
        pass
    _close(proc.stdin)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:  # pragma: no cover
        pass


def describe(code) -> str:
    """'exited with status 3' / 'was killed by signal SIGSEGV'."""
    if code is None:
        return "stopped answering"
    if code < 0:
        try:
            return f"was killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"

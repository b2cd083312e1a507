"""Being attached to a container: its output relayed to us and kept in its log, and a terminal of its own.

A foreground ``stages run`` used to hand the container our own stdout and stderr: the output reached the
screen, and nothing else kept it. ``docker run`` (without ``--rm``) keeps it too, so that ``docker logs``
shows it later. So the container writes into pipes (pipe(7)), and this process copies what comes out of
them both to where it was going and to the container's log (:class:`Output`): a tee, as conmon does for
podman. When our stdout and stderr are the same file (a terminal), one pipe carries both, so that their
order is kept exactly.

With ``-t`` the container gets a pseudo-terminal (pty(7)) instead: its side (``/dev/pts/N`` inside) is
its stdin, stdout and stderr, and we hold the other side, the *master*. :class:`Terminal` puts our own
terminal in raw mode (every key goes through as typed; the container's terminal does the echo, the line
editing and Ctrl-C), copies keys to the master and output back, and passes on our window size
(SIGWINCH -> TIOCSWINSZ, tty_ioctl(4)). Our terminal is restored on every way out.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import selectors
import signal
import struct
import termios
import threading
import tty

CHUNK = 65536
#: Ctrl-D: what the container's terminal takes as end of input when our input ends (termios(3), VEOF).
END_OF_INPUT = b"\x04"


def _same_file(first: int, second: int) -> bool:
    try:
        a, b = os.fstat(first), os.fstat(second)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _write_all(fd: int, data: bytes) -> bool:
    """Write all of ``data``; False if the reader has gone (EPIPE, EIO): we stop writing there."""
    while data:
        try:
            written = os.write(fd, data)
        except BlockingIOError:
            selector = selectors.DefaultSelector()
            selector.register(fd, selectors.EVENT_WRITE)
            selector.select()
            selector.close()
            continue
        except OSError as error:
            if error.errno in (errno.EPIPE, errno.EIO, errno.EBADF):
                return False
            raise
        data = data[written:]
    return True


def relay(sources: dict[int, int | None], log: int | None = None, stdin: tuple[int, int] | None = None,
          on_input_end=None) -> None:
    """Copy each source descriptor to its target (and to ``log``) until every source has ended.

    ``stdin`` is ``(ours, theirs)``: what we read on ``ours`` goes to ``theirs`` while the sources last;
    when it ends, ``on_input_end()`` is called. A target whose reader went away is dropped, the log
    keeps getting everything.
    """
    selector = selectors.DefaultSelector()
    targets = dict(sources)
    for source in targets:
        selector.register(source, selectors.EVENT_READ)
    unpolled = None  # our input when epoll(7) cannot watch it (/dev/null, a regular file): EPERM
    if stdin is not None:
        try:
            selector.register(stdin[0], selectors.EVENT_READ)
        except PermissionError:
            # Such a file is always "ready" (a read never waits, select(2) says so too): read it a chunk
            # at a time between the container's output, as podman does with `-i </dev/null`.
            unpolled = stdin[0]
    try:
        while targets:
            events = [(key.fd, mask) for key, mask in selector.select(0 if unpolled is not None else None)]
            if unpolled is not None:
                try:
                    data = os.read(unpolled, CHUNK)
                except OSError:
                    data = b""
                if not data:
                    unpolled = None
                    if on_input_end is not None:
                        on_input_end()
                elif not _write_all(stdin[1], data):
                    unpolled = None
            for fd, _ in events:
                try:
                    data = os.read(fd, CHUNK)
                except BlockingIOError:
                    continue
                except OSError as error:
                    if error.errno != errno.EIO:  # a pty master says EIO once no one has its other side
                        raise
                    data = b""
                if stdin is not None and fd == stdin[0] and fd not in targets:
                    if not data:
                        selector.unregister(fd)
                        if on_input_end is not None:
                            on_input_end()
                    elif not _write_all(stdin[1], data):
                        selector.unregister(fd)
                    continue
                if not data:
                    selector.unregister(fd)
                    del targets[fd]
                    continue
                if targets[fd] is not None and not _write_all(targets[fd], data):
                    targets[fd] = None
                if log is not None:
                    _write_all(log, data)
    finally:
        selector.close()


def open_log(path: str | os.PathLike) -> int:
    """The container's log, for appending (the same file a detached container's output goes to)."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)


class Output:
    """A foreground container's stdout and stderr through pipes: to ours, and into its log.

    ``stdio`` is what the caller would have given the container (``(stdin, stdout, stderr)``, None for
    "ours"). Use :attr:`stdio` for ``create``, :meth:`created` once it is created (our copies of the
    container's ends must close, or the pipes never end), :meth:`relay` until its output ends, and
    :meth:`close` in any case.
    """

    def __init__(self, log_path: str | os.PathLike, stdio=None):
        stdin, stdout, stderr = stdio or (None, None, None)
        self.out = descriptor(stdout, 1)
        self.err = descriptor(stderr, 2)
        self.log = open_log(log_path)
        self._ours: list[int] = []
        self._theirs: list[int] = []
        out_read, out_write = os.pipe2(os.O_CLOEXEC)
        self._ours.append(out_read)
        self._theirs.append(out_write)
        if _same_file(self.out, self.err):
            self.sources = {out_read: self.out}
            err_write = out_write
        else:
            err_read, err_write = os.pipe2(os.O_CLOEXEC)
            self._ours.append(err_read)
            self._theirs.append(err_write)
            self.sources = {out_read: self.out, err_read: self.err}
        self.stdio = (stdin, out_write, err_write)

    def created(self) -> None:
        for fd in self._theirs:
            os.close(fd)
        self._theirs = []

    def relay(self) -> None:
        relay(self.sources, self.log)

    def close(self) -> None:
        for fd in self._theirs + self._ours + [self.log]:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._theirs, self._ours, self.log = [], [], -1


def descriptor(item, default: int) -> int:
    """``item`` (a file descriptor, a file object, or None for ``default``) as a file descriptor."""
    if item is None:
        return default
    return item if isinstance(item, int) else item.fileno()


# -- a terminal of its own -------------------------------------------------------------------------------
def window_size(fd: int) -> bytes | None:
    """The window size of the terminal ``fd`` (struct winsize, TIOCGWINSZ), or None if it is none."""
    try:
        return fcntl.ioctl(fd, termios.TIOCGWINSZ, struct.pack("HHHH", 0, 0, 0, 0))
    except OSError:
        return None


def set_window_size(fd: int, size: bytes | None) -> None:
    """Give the pseudo-terminal ``fd`` the window size ``size``; the kernel sends its foreground process
    group SIGWINCH, and a shell or an editor redraws (tty_ioctl(4), TIOCSWINSZ)."""
    if size is not None:
        with contextlib.suppress(OSError):
            fcntl.ioctl(fd, termios.TIOCSWINSZ, size)


class Terminal:
    """Our side of a container's pseudo-terminal: its master, attached to our own terminal (or to whatever
    our stdin and stdout are), and what it shows also kept in the container's log (``log_path``).

    :meth:`configure` asks config.json's ``process`` for a terminal of our window's size; :meth:`receive`
    is the runtime's ``console`` callback, which hands us the master; :meth:`attach` relays until the
    container's side closes (in this thread), :meth:`start` and :meth:`join` do it in another (while this
    one waits for an exec'd process); :meth:`close` in any case, which also gives our terminal back its
    modes if it is still raw.
    """

    def __init__(self, *, stdin: int | None = 0, stdout: int = 1, log_path: str | os.PathLike | None = None):
        self.stdin = stdin
        self.stdout = stdout
        self.master: int | None = None
        self.name = ""
        self.log = open_log(log_path) if log_path is not None else None
        self._size_from = stdin if stdin is not None and os.isatty(stdin) else stdout
        if stdin is not None and not os.isatty(stdin):
            # podman's words and podman's way (Docker refuses): -t with an input that is no terminal runs,
            # its input passed on as typed keys would be; a file or /dev/null ends it with Ctrl-D
            os.write(2, b"stages: warning: the input device is not a TTY; the --tty and --interactive "
                        b"flags might not work properly\n")
        self._saved = None
        self._thread: threading.Thread | None = None
        self._previous_handler = None
        self.error: BaseException | None = None

    def configure(self, process: dict) -> dict:
        """Ask for a terminal in config.json's ``process`` (terminal, consoleSize, TERM as docker sets it)."""
        process["terminal"] = True
        size = window_size(self._size_from)
        if size is not None:
            rows, columns, _, _ = struct.unpack("HHHH", size)
            if rows and columns:
                process["consoleSize"] = {"height": rows, "width": columns}
        env = process.setdefault("env", [])
        if not any(item.startswith("TERM=") for item in env):
            env.append("TERM=xterm")
        return process

    def receive(self, master: int, name: str) -> None:
        """The ``console`` callback of :func:`stages.runtime.oci.create`: the master is ours now."""
        self.master, self.name = master, name
        set_window_size(master, window_size(self._size_from))

    def _resize(self, _number, _frame) -> None:
        if self.master is not None and self.master >= 0:
            set_window_size(self.master, window_size(self._size_from))

    def follow_window(self) -> None:
        """From now on, a SIGWINCH (our window changed) passes the new size on (main thread only)."""
        if threading.current_thread() is threading.main_thread() and self._previous_handler is None:
            self._previous_handler = signal.signal(signal.SIGWINCH, self._resize)

    def _raw(self) -> None:
        # Raw (termios(3), cfmakeraw): no echo, no line editing, no Ctrl-C -> SIGINT here; the container's
        # terminal does all of that itself, or each key would be echoed twice and Ctrl-C would end us.
        if self.stdin is not None and os.isatty(self.stdin) and self._saved is None:
            self._saved = termios.tcgetattr(self.stdin)
            tty.setraw(self.stdin, termios.TCSANOW)

    def _restore(self) -> None:
        if self._saved is not None:
            with contextlib.suppress(termios.error, OSError):
                termios.tcsetattr(self.stdin, termios.TCSAFLUSH, self._saved)
            self._saved = None

    def attach(self) -> None:
        """Relay until the container's side of the terminal closes (its processes have ended); our
        terminal is raw meanwhile, and restored however this ends."""
        if self.master is None:
            return
        self.follow_window()
        self._raw()
        try:
            relay({self.master: self.stdout}, self.log,
                  stdin=(self.stdin, self.master) if self.stdin is not None else None,
                  on_input_end=lambda: _write_all(self.master, END_OF_INPUT))
        finally:
            self._restore()

    def start(self) -> None:
        """:meth:`attach` in a thread of its own (the caller waits for the process meanwhile)."""

        def attached():
            try:
                self.attach()
            except BaseException as error:  # noqa: B036 - handed to join()
                self.error = error

        self._thread = threading.Thread(target=attached, name="terminal", daemon=True)
        self._thread.start()

    def join(self, timeout: float | None = 10.0) -> None:
        """Wait for :meth:`start`'s relay to end (the process has ended: its terminal closes)."""
        if self._thread is not None:
            self._thread.join(timeout)
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        self._restore()
        if self._previous_handler is not None:
            signal.signal(signal.SIGWINCH, self._previous_handler)
            self._previous_handler = None
        for fd in (self.master, self.log):
            if fd is not None and fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.master, self.log = -1, None


"""SIGTERM (what SLURM and TPU maintenance send) and Ctrl-C as requests to stop at the next step boundary.

With one process a Python handler records the signal. With several, JAX's preemption service
(started by `jax.distributed.initialize`) catches SIGTERM on whichever process receives it and
agrees with the others on one step at which all of them stop (`reached_preemption_sync_point`),
so the checkpoint they then save together is consistent; Ctrl-C is turned into a SIGTERM of its
own process to join that protocol. A second Ctrl-C stops at once, without a checkpoint.

The entry point installs the handlers first thing (`install_early`, before JAX starts, then
`install` once the processes are known), so a signal that arrives while libraries, data, models or a
teacher load is kept until the first step boundary; a run started from Python installs them for its
own duration.
"""
from __future__ import annotations

import _thread
import os
import signal
import sys
import threading
import time
from typing import Callable, Optional


class StopRequests:
    """Owns SIGTERM / SIGINT while installed; `should_stop()` is asked at every step boundary and between an
    evaluation's batches."""

    def __init__(self):
        self.received: Optional[str] = None
        self._previous = {}
        self._multi_process = False
        self.exit_at_once: Optional[Callable[[], None]] = None  # the entry point's: say so and end the process
        self.in_training_steps = False  # the loop's: it turns a second Ctrl-C into a save where it can
        self._sync_calls = 0  # several processes: the checks made so far, step boundaries and evaluation batches
        self._in_hook = False  # the main thread is inside _redeliver_lost_interrupt
        self._wakeup: Optional[tuple] = None  # (read end, write end, the wakeup fd it replaced): _take_wakeup_fd
        self._sigints_pending = 0  # SIGINTs read from the wakeup pipe that no handler call has acted on yet

    def install(self, *, before_jax: bool = False) -> "StopRequests":
        """Takes SIGINT, and SIGTERM unless several processes run (JAX's preemption notifier, which
        `jax.distributed.initialize` installs, owns it then). `before_jax`: JAX is not started yet, so take
        both; a signal caught then is handed on at the second `install`."""
        if threading.current_thread() is not threading.main_thread():
            return self
        if not before_jax:
            import jax

            self._multi_process = jax.process_count() > 1
        if not self._multi_process and signal.SIGTERM not in self._previous:
            self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_sigterm)
        if signal.SIGINT not in self._previous:
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_sigint)
            self._take_wakeup_fd()
            self._previous_unraisable_hook = sys.unraisablehook
            sys.unraisablehook = self._redeliver_lost_interrupt
        if self._multi_process:
            self._previous.pop(signal.SIGTERM, None)  # now the notifier's: never restored over it
            if self.received is not None:
                os.kill(os.getpid(), signal.SIGTERM)  # a signal from before JAX started joins the protocol
        return self

    def uninstall(self):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        if signal.SIGINT in self._previous and sys.unraisablehook == self._redeliver_lost_interrupt:
            sys.unraisablehook = self._previous_unraisable_hook
        if self._wakeup is not None:
            read_end, write_end, replaced = self._wakeup
            current = signal.set_wakeup_fd(replaced)
            if current != write_end:  # taken over since: it stays, and so does this pipe (its taker puts it back)
                _set_wakeup_fd(current)
            else:
                _OUR_WAKEUP_FDS.discard(write_end)
                os.close(read_end)
                os.close(write_end)
                self._wakeup = None
        self._previous.clear()

    def _take_wakeup_fd(self):
        """Python runs a handler once for all the deliveries of one signal made before the main thread checks
        for them: two Ctrl-Cs while it is inside a long C call (XLA compiling the first step, seconds) were one
        call of `_on_sigint`, and the second was lost (CI, 2026-12-08: the run stopped at the next step boundary
        instead of at once). Python's wakeup fd gets one byte per delivery, so the handler counts those. Taken
        only if no one else holds it (asyncio does while it handles signals); otherwise one call counts one."""
        read_end, write_end = os.pipe()
        for fd in (read_end, write_end):
            os.set_blocking(fd, False)
        replaced = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
        if replaced != -1 and replaced not in _OUR_WAKEUP_FDS:
            signal.set_wakeup_fd(replaced)
            os.close(read_end)
            os.close(write_end)
            return
        _OUR_WAKEUP_FDS.add(write_end)
        self._wakeup = (read_end, write_end, replaced)

    def _sigints_arrived(self) -> int:
        """How many Ctrl-Cs this call of `_on_sigint` stands for: those the wakeup pipe holds; 0 when an earlier
        call counted this one's already (it came while that call ran). A delivery on another thread writes its
        byte just after it marks the signal for the main thread, so an empty pipe is read again for 10 ms; and
        should someone have set another wakeup fd since (nothing reaches ours then), one call counts one."""
        if self._wakeup is None:
            return 1
        deadline = time.monotonic() + 0.01
        self._read_wakeup_pipe()
        while not self._sigints_pending and time.monotonic() < deadline:
            time.sleep(0.0005)
            self._read_wakeup_pipe()
        if not self._sigints_pending:
            current = signal.set_wakeup_fd(-1)
            _set_wakeup_fd(current)
            return 0 if current == self._wakeup[1] else 1
        arrived, self._sigints_pending = self._sigints_pending, 0
        return arrived

    def _read_wakeup_pipe(self):
        if self._wakeup is None:
            return
        while True:
            try:
                data = os.read(self._wakeup[0], 4096)
            except (BlockingIOError, InterruptedError):
                return
            if not data:
                return
            self._sigints_pending += data.count(signal.SIGINT)

    def _redeliver_lost_interrupt(self, unraisable):
        """A second Ctrl-C's KeyboardInterrupt raised while the main thread ran a callback whose exceptions
        Python cannot propagate (a gc callback such as JAX's `_xla_gc_callback`, a `__del__`) is "ignored":
        printed as a traceback and lost, and the run went on to stop at the next step boundary instead of at
        once (CI, 2026-12-05). Here it is dropped silently and the interrupt posted again from another thread
        once the main thread has left this hook: raised inside the hook, it would be lost the same way. Should
        the re-posted one land in such a callback too, this repeats."""
        if (isinstance(unraisable.exc_value, KeyboardInterrupt) and self.received == "SIGINT"
                and threading.current_thread() is threading.main_thread()):
            self._in_hook = True
            try:
                self._post_interrupt_after_hook()
            finally:
                self._in_hook = False
        else:
            self._previous_unraisable_hook(unraisable)

    def _post_interrupt_after_hook(self):
        """Starts a thread that interrupts the main thread (SIGINT's handler again) once it is out of this
        hook. A fixed delay was not enough: on a loaded host starting the thread could outlast it, and the
        interrupt then landed inside the hook and was lost (CI-like load, 2026-12-06)."""
        def post():
            while self._in_hook:
                time.sleep(0.001)
            time.sleep(0.01)  # and out of the interpreter's unraisable-exception machinery around the hook
            _thread.interrupt_main(signal.SIGINT)  # marks SIGINT pending: the handler runs at the next check

        try:
            threading.Thread(target=post, daemon=True).start()
        except RuntimeError:  # the interpreter is shutting down: there is nothing left to interrupt
            pass

    def _on_sigterm(self, signum, frame):
        self._read_wakeup_pipe()  # (keeps the pipe from filling; the Ctrl-Cs in it stay counted)
        self.received = self.received or "SIGTERM"

    def _on_sigint(self, signum, frame):
        arrived = self._sigints_arrived()
        if arrived and self.received != "SIGINT":  # the first Ctrl-C: stop at the next step boundary
            arrived -= 1
            self.received = "SIGINT"
            if self._multi_process:
                os.kill(os.getpid(), signal.SIGTERM)
        if arrived:  # a second Ctrl-C: stop now
            if self._in_hook:  # raised here it would be lost with the hook's: post it again for after the hook
                self._post_interrupt_after_hook()
                return
            if self.exit_at_once is not None and not self.in_training_steps:
                self.exit_at_once()  # here, not by unwinding: an orbax restore cut short by an exception leaves
            raise KeyboardInterrupt  # its worker threads posting to a closed event loop, each a traceback

    def should_stop(self) -> bool:
        """Whether to stop at this check (the same answer on every process). With several processes the
        answer is agreed on: JAX's preemption sync manager, told of a SIGTERM on any process, picks the check
        after the furthest one any process has made, and all of them stop there. The checks are counted (not
        numbered by step) so that those between an evaluation's batches, which every process makes at the same
        batches, join the count."""
        if self._multi_process:
            from jax.experimental import multihost_utils

            self._sync_calls += 1
            return multihost_utils.reached_preemption_sync_point(self._sync_calls)
        return self.received is not None

    @property
    def reason(self) -> str:
        return {"SIGINT": "Ctrl-C (SIGINT)"}.get(self.received, "SIGTERM")


_installed: Optional[StopRequests] = None
_OUR_WAKEUP_FDS: set = set()  # the write ends of StopRequests' wakeup pipes (one may take another's over)


def _set_wakeup_fd(fd: int) -> None:
    """Puts `fd` back as Python's wakeup fd: one of ours without warnings when its pipe is full (it is read only
    when a handler runs), another's as its owner set it (the default)."""
    signal.set_wakeup_fd(fd, **({"warn_on_full_buffer": False} if fd in _OUR_WAKEUP_FDS else {}))


def install_early(exit_at_once: Optional[Callable[[], None]] = None) -> StopRequests:
    """The entry points' first call, before JAX starts: from here on no SIGTERM / Ctrl-C is lost.
    `exit_at_once`: called for a second Ctrl-C outside the training steps (it must end the process);
    without it, or inside the steps, a second Ctrl-C raises KeyboardInterrupt."""
    global _installed
    if _installed is None:
        _installed = StopRequests().install(before_jax=True)
    _installed.exit_at_once = exit_at_once
    return _installed


def install() -> StopRequests:
    """Installs the process's stop handlers for good, once `jax.distributed.initialize` has run (if it does)."""
    global _installed
    _installed = (_installed or StopRequests()).install()
    return _installed


def ignore_while_exiting():
    """Ignores SIGINT and SIGTERM from here on: the entry point has finished or stopped (and said so), and
    what remains is the interpreter's exit (threads joined, modules torn down, a second or more). Python
    puts the default handlers back while it finalises, so a signal then killed the process (status -2 or
    -15) after a clean stop; ignored handlers are left as they are, and the status stays the one chosen."""
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_IGN)


_active: Optional[StopRequests] = None  # the running loop's, while `during_run` lasts


def check_during_eval():
    """Called between an evaluation's batches (by every process, at the same batches): raises `EvalStopped`
    once a stop was requested, or, with several processes, once they agreed on this check to stop at."""
    stops = _active
    if stops is not None and stops.should_stop():
        from vitdistill.errors import EvalStopped

        raise EvalStopped(f"stopped by {stops.reason} during an evaluation, whose results are not written", -1)


class during_run:
    """`with during_run() as stops:` the installed handlers, or ones installed for the run's duration."""

    def __enter__(self) -> StopRequests:
        global _active
        self._own = _installed is None
        self._stops = StopRequests().install() if self._own else _installed
        self._outer, _active = _active, self._stops
        return self._stops

    def __exit__(self, *exc):
        global _active
        _active = self._outer
        if self._own:
            self._stops.uninstall()
        return False

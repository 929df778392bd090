"""SIGTERM and Ctrl-C, whenever they arrive, end a run with one line and lose nothing.

A nano DINO run (tests/nano_main.py) is started as a process and signalled at moments placed on the
timeline of an uninterrupted run measured first in the same test: while it starts up (the libraries,
the data, the models, the tf.data pipeline being traced, the step being compiled), while it trains,
while it evaluates at the end. Each interrupted run must end in one of the outcomes a user can rely on:

- stopped at a step boundary: exit 0, one `vitdistill:` line naming the signal and the step, no
  traceback, and (once a step was trained) that step saved;
- finished: the signal came after the last step's checkpoint (the final evaluation and summary go on);
- killed by the default handler: only before vitdistill's handlers exist, with nothing written.

Then the same command re-run without a signal must end exactly as the uninterrupted run: the same final
loss, bit for bit, and the same k-NN. The default suite interrupts one workdir three times (while the first step
compiles, while training, twice Ctrl-C while the first step compiles); the slow test signals 20 moments drawn at
random over the whole run. The signals during the compile come from a thread of the process itself
($NANO_SIGNALS_IN_FIRST_STEP): sent from the test at a moment taken from the uninterrupted run's timeline they
landed elsewhere when the machine's load changed between the runs (in the set-up before the first step, or
after the last one; 2 failures on 2026-12-04, both beside other training runs).
"""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
STEPS = 8
COMMAND = [sys.executable, "-u", os.path.join(TESTS, "nano_main.py"), "--config=tests/nano_config.py:dino",
           f"--config.max_steps={STEPS}", "--config.checkpoint_every_steps=3"]


class Run:
    """One process of COMMAND, its output lines with the time (s since the start) at which each came."""

    def __init__(self, workdir, cache, signals_in_first_step=None):
        """`cache`: the persistent compilation cache's directory. A run signalled while it compiles gets an
        empty one, as the uninterrupted run had, so that its timeline is the one measured.
        `signals_in_first_step`: $NANO_SIGNALS_IN_FIRST_STEP of tests/nano_main.py (signals the process sends
        itself while its first train step compiles)."""
        self.checkpoints_before = _checkpoint_steps(workdir)
        self.start = time.monotonic()
        env = dict(os.environ, **({"NANO_SIGNALS_IN_FIRST_STEP": signals_in_first_step}
                                  if signals_in_first_step else {}))
        self.process = subprocess.Popen(COMMAND + [f"--workdir={workdir}", f"--jax_cache_dir={cache}"],
                                        cwd=os.path.dirname(TESTS), env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines = {"stdout": [], "stderr": []}
        self.readers = [threading.Thread(target=self._read, args=(stream, name), daemon=True)
                        for name, stream in (("stdout", self.process.stdout), ("stderr", self.process.stderr))]
        for reader in self.readers:
            reader.start()

    def _read(self, stream, name):
        for line in stream:
            self.lines[name].append((time.monotonic() - self.start, line.rstrip("\n")))

    def signal_when(self, ready, delay, signum, *, then=None):
        """Waits until `ready()` (polled every 20 ms), `delay` s more, then sends `signum` (and `then` =
        (seconds or a condition polled like `ready`, signum) after that). Returns the time it was sent (s since
        the start)."""
        self._wait_for(ready)
        time.sleep(delay)
        sent = time.monotonic() - self.start
        self.process.send_signal(signum)
        if then is not None:
            if callable(then[0]):
                self._wait_for(then[0])
            else:
                time.sleep(then[0])
            if self.process.poll() is None:
                self.process.send_signal(then[1])
        return sent

    def _wait_for(self, ready):
        while not ready() and self.process.poll() is None:
            time.sleep(0.02)

    def wait(self, timeout=600):
        rc = self.process.wait(timeout=timeout)
        for reader in self.readers:
            reader.join(timeout=30)
        return rc

    def sent_in_first_step(self, count):
        """Waits for the process to end; asserts it sent itself `count` signals while its first step's call
        (trace and compile) was running, and returns when the first was sent (s since the start)."""
        self.process.wait(timeout=600)
        for reader in self.readers:
            reader.join(timeout=30)
        sent = [(t, line) for t, line in self.lines["stderr"] if line.startswith("nano: ")]
        assert len(sent) == count and all("while it was running" in line for _, line in sent), sent
        return sent[0][0]

    def text(self, name="stderr"):
        return "\n".join(line for _, line in self.lines[name])

    def first(self, needle):
        """When the first output line containing `needle` came (s), or None."""
        times = [t for name in self.lines for t, line in self.lines[name] if needle in line]
        return min(times) if times else None


def _final(workdir):
    """(the loss logged at the last step, the final k-NN top-1) from metrics.jsonl."""
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    loss = [r["loss"] for r in rows if r.get("step") == STEPS and "loss" in r]
    knn = [r["knn_top1"] for r in rows if r.get("step") == STEPS and "knn_top1" in r]
    return loss[-1], knn[-1]


def _checkpoint_steps(workdir):
    directory = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(directory) if n.isdigit()) if os.path.isdir(directory) else []


def _has_config(workdir):
    """The run's config.json, (re)written by this run: the training loop has started (libraries, data and
    models are built; the state, the tf.data pipeline and the step are next)."""
    path, since = os.path.join(workdir, "config.json"), time.time()
    return lambda: os.path.exists(path) and os.path.getmtime(path) >= since - 1e-3


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: its final figures and its timeline (s from the start: config.json written,
    first and last step logged, exit)."""
    workdir, cache = str(tmp_path_factory.mktemp("uninterrupted")), str(tmp_path_factory.mktemp("jax_cache"))
    run = Run(workdir, cache)
    config_written = run.signal_when(_has_config(workdir), 0.0, 0)  # signal 0: nothing sent, just the time
    assert run.wait() == 0, run.text()[-3000:]
    timeline = dict(config_written=config_written, first_step=run.first("step 1/"),
                    last_step=run.first(f"step {STEPS}/"), end=time.monotonic() - run.start)
    print("uninterrupted run:", {k: round(v, 2) for k, v in timeline.items()})
    return dict(final=_final(workdir), timeline=timeline, cache=cache)


def interrupted(run, workdir, sent, signum=signal.SIGTERM, *, at_once=False) -> str:
    """Checks how a signalled run ended: 'stopped' (one line, the step saved), 'finished' or 'killed'."""
    before = run.checkpoints_before
    rc = run.wait()
    out, err = run.text("stdout"), run.text("stderr")
    ours = [line for line in err.splitlines() if line.startswith("vitdistill:")]
    assert "Traceback" not in out + err, f"signal at {sent:.2f} s: a traceback\n{err[-3000:]}"
    saved = _checkpoint_steps(workdir)
    metrics = os.path.join(workdir, "metrics.jsonl")
    trained = [int(r["step"]) for r in map(json.loads, open(metrics)) if "loss" in r] if os.path.exists(metrics) else []
    if rc == -signum:
        outcome = "killed"  # vitdistill's handlers were not installed yet: nothing may have changed
        assert saved == before and (before or not trained), (sent, before, saved, trained)
    elif ours:
        outcome = "stopped"
        assert rc == (130 if at_once else 0), f"signal at {sent:.2f} s: exit {rc}\n{err[-3000:]}"
        assert len(ours) == 1, ours
        name = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C (SIGINT)"
        expected = (["stopped at once by a second Ctrl-C"] if at_once else  # or during an evaluation (EvalStopped)
                    [f"stopped by {name} at step", f"stopped by {name} during an evaluation"])
        assert any(text in ours[0] for text in expected), ours
        assert "Re-run the same command to resume" in ours[0], ours
        if not at_once and trained:  # stopped at the boundary after its last logged step, and saved it
            assert saved and saved[-1] >= max(trained), (sent, saved, trained)
    else:
        outcome = "finished"
        assert rc == 0 and saved and saved[-1] == STEPS, f"signal at {sent:.2f} s: exit {rc}\n{err[-3000:]}"
    print(f"signal {signal.Signals(signum).name} at {sent:.2f} s: {outcome}, checkpoints {saved}, "
          f"steps logged {trained}")
    return outcome


def resumed_ends_as_uninterrupted(workdir, reference, what):
    run = Run(workdir, reference["cache"])
    assert run.wait() == 0, run.text()[-3000:]
    assert "Traceback" not in run.text() + run.text("stdout")
    loss, knn = _final(workdir)
    want_loss, want_knn = reference["final"]
    assert loss == want_loss and knn == want_knn, (f"{what}: the resumed run ends at loss {loss!r}, k-NN {knn!r}; "
                                                  f"uninterrupted {want_loss!r}, {want_knn!r}")


def test_signals_while_compiling_training_and_starting_are_never_lost(tmp_path, reference):
    """One workdir, interrupted three times, then finished: SIGTERM while the first step is being traced and
    compiled (half a second into that call), SIGTERM while training and a Ctrl-C once that run has printed its
    stop line (it is exiting: the status stays 0), then Ctrl-C twice while the resumed run compiles (the
    second stops it at once: exit 130). Each run ends in one line, saves what it trained, and the last
    re-run ends bit for bit as the uninterrupted run."""
    workdir = str(tmp_path)
    run = Run(workdir, str(tmp_path / "empty_jax_cache"), signals_in_first_step="SIGTERM@0.5")
    sent = run.sent_in_first_step(1)
    assert interrupted(run, workdir, sent) == "stopped"
    before = _checkpoint_steps(workdir)
    assert before == [1], before  # the step the signal came during, nothing more

    run = Run(workdir, reference["cache"])  # the steps compiled by the uninterrupted run: faster, same numbers
    logged = lambda: any(f"step {before[-1] + 2}/" in line for _, line in run.lines["stdout"] + run.lines["stderr"])
    said = lambda: any(line.startswith("vitdistill:") for _, line in run.lines["stderr"])
    sent = run.signal_when(logged, 0.0, signal.SIGTERM, then=(said, signal.SIGINT))
    assert interrupted(run, workdir, sent) == "stopped"  # the Ctrl-C while exiting killed it before: status -2
    assert before[-1] + 2 <= _checkpoint_steps(workdir)[-1] < STEPS, _checkpoint_steps(workdir)

    run = Run(workdir, str(tmp_path / "empty_jax_cache_2"),  # both while its first step compiles (seconds)
              signals_in_first_step="SIGINT@0.5,SIGINT@0.8")
    sent = run.sent_in_first_step(2)
    assert interrupted(run, workdir, sent, signal.SIGINT, at_once=True) == "stopped"
    resumed_ends_as_uninterrupted(workdir, reference, "after three interruptions")


@pytest.mark.slow
def test_sigterm_at_20_random_moments(tmp_path, reference):
    """20 moments uniform over the uninterrupted run's whole duration, each in a fresh workdir that is then
    resumed to the end (about 40 minutes on 2 cores). VITDISTILL_SIGNAL_SEED picks the moments."""
    rng = np.random.default_rng(int(os.environ.get("VITDISTILL_SIGNAL_SEED", "0")))
    outcomes = {}
    for i, seconds in enumerate(np.sort(rng.uniform(0.0, reference["timeline"]["end"], 20))):
        workdir = str(tmp_path / f"at_{i}")
        run = Run(workdir, str(tmp_path / f"empty_jax_cache_{i}"))
        sent = run.signal_when(lambda: True, float(seconds), signal.SIGTERM)
        outcomes[round(sent, 2)] = interrupted(run, workdir, sent)
        resumed_ends_as_uninterrupted(workdir, reference, f"SIGTERM at {sent:.2f} s")
    print(outcomes)


def test_a_second_ctrl_c_ends_the_process_outside_the_steps_and_goes_to_the_loop_inside_them():
    """In-process, with the handlers the entry point installs: the first Ctrl-C is only recorded; a second one
    outside the training steps (starting up, restoring a checkpoint: where unwinding through orbax's restore
    left its threads printing tracebacks) calls the entry point's exit at once, and inside them raises
    KeyboardInterrupt for the loop to save. Without an entry point's exit (a run started from Python) it is a
    KeyboardInterrupt everywhere, as Python's own handler would make it."""
    from vitdistill.train.preemption import StopRequests

    exits, before = [], signal.getsignal(signal.SIGINT)
    stops = StopRequests().install(before_jax=True)
    try:
        stops.exit_at_once = lambda: exits.append("exit")
        os.kill(os.getpid(), signal.SIGINT)
        assert stops.received == "SIGINT" and stops.should_stop() and stops.reason == "Ctrl-C (SIGINT)"
        with pytest.raises(KeyboardInterrupt):  # the stub exit returns; the real one never does
            os.kill(os.getpid(), signal.SIGINT)
        assert exits == ["exit"]
        stops.in_training_steps = True
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        assert exits == ["exit"]
        stops.in_training_steps, stops.exit_at_once = False, None
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        assert exits == ["exit"]
    finally:
        stops.uninstall()
    assert signal.getsignal(signal.SIGINT) is before


def test_two_ctrl_cs_that_come_during_one_c_call_are_two(capfd):
    """Python calls a signal's handler once for all its deliveries before the main thread next checks: two Ctrl-Cs
    while the main thread is in one long C call (XLA compiling the first step) were one call of the handler, and
    the run stopped at the next step boundary instead of at once (CI, 2026-12-08, the test above). Here the main
    thread waits in a C call with SIGINT blocked (so the signals' C handler runs on another thread and nothing
    interrupts the wait) while a thread sends two: they must make a second Ctrl-C. A handler call for which an
    earlier call already counted the delivery changes nothing. With a wakeup fd someone else holds (asyncio's), it
    stays theirs, and each handler call counts one Ctrl-C, as before."""
    from vitdistill.train.preemption import StopRequests

    def two_during_one_call():
        go = threading.Event()

        def send():
            go.wait()
            for _ in range(2):  # 50 ms apart: a signal sent while the last is still pending in the kernel is lost there
                time.sleep(0.05)  # (the main thread is inside join() by now)
                os.kill(os.getpid(), signal.SIGINT)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            go.set()
            sender.join()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        deadline = time.monotonic() + 2  # the handler runs at one of these checks
        while time.monotonic() < deadline:
            pass

    exits = []
    stops = StopRequests().install(before_jax=True)
    stops.exit_at_once = lambda: exits.append("exit")
    try:
        with pytest.raises(KeyboardInterrupt):
            two_during_one_call()
        assert stops.received == "SIGINT" and exits == ["exit"]
        stops._on_sigint(signal.SIGINT, None)  # no delivery behind it: nothing happens
        assert exits == ["exit"]
    finally:
        stops.uninstall()

    theirs_read, theirs_write = os.pipe()
    os.set_blocking(theirs_write, False)
    before = signal.set_wakeup_fd(theirs_write)
    stops = StopRequests().install(before_jax=True)
    stops.exit_at_once = lambda: exits.append("exit")
    try:
        assert signal.set_wakeup_fd(theirs_write) == theirs_write
        os.kill(os.getpid(), signal.SIGINT)  # each handled as it comes: one Ctrl-C, then a second
        assert stops.received == "SIGINT" and exits == ["exit"]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        assert exits == ["exit", "exit"]
    finally:
        stops.uninstall()
        assert signal.set_wakeup_fd(before) == theirs_write
        os.close(theirs_read)
        os.close(theirs_write)
    assert "Traceback" not in capfd.readouterr().err


def test_a_second_ctrl_c_that_lands_in_a_gc_callback_is_delivered_after_it_not_lost(capfd):
    """Python cannot propagate an exception out of a gc callback (JAX registers one, `_xla_gc_callback`, which
    runs during a compile): a KeyboardInterrupt raised there was printed as "Exception ignored in ...", with a
    traceback, and lost, so a second Ctrl-C during the first step's compile stopped the run at the next step
    boundary instead of at once (CI, 2026-12-05). The interrupt must reach the code that runs after the
    callback, with nothing printed."""
    import gc

    from vitdistill.train.preemption import StopRequests

    landed, armed = [], []

    def callback(phase, info):  # armed: not for a collection another test's leftover thread starts meanwhile
        if phase == "start" and armed and not landed and threading.current_thread() is threading.main_thread():
            landed.append("sent")
            os.kill(os.getpid(), signal.SIGINT)  # the handler runs at one of this frame's next checks
            deadline = time.monotonic() + 5  # (the signal may reach another thread first, microseconds later)
            while time.monotonic() < deadline:
                pass
            landed.append("callback went on")  # never reached: the KeyboardInterrupt ended the callback

    stops = StopRequests().install(before_jax=True)
    stops.received, stops.in_training_steps = "SIGINT", True  # the first Ctrl-C came; inside the steps
    gc.callbacks.append(callback)
    try:
        with pytest.raises(KeyboardInterrupt):
            armed.append(True)
            gc.collect()  # (a full collection of a worker's heap late in the suite can itself take seconds)
            collected = time.monotonic()
            while time.monotonic() < collected + 10:  # the re-posted interrupt is handled at one of these checks
                pass
        assert landed == ["sent"], landed
    finally:
        gc.callbacks.remove(callback)
        stops.uninstall()
    err = capfd.readouterr().err
    assert "Exception ignored" not in err and "Traceback" not in err, err


def test_a_reposted_interrupt_comes_after_the_hook_returns_however_slowly_its_thread_starts(monkeypatch):
    """The lost interrupt is posted again from a thread. On a loaded host (the whole suite on 2 cores) starting
    that thread outlasted the fixed 10 ms the thread used to wait, and the interrupt landed inside the hook,
    where it is lost as well: a second Ctrl-C during a compile then stopped the run a step later (the suite,
    2026-12-06). Here the main thread stays in the hook 200 ms after the thread has started; the interrupt
    must come after the hook has returned."""
    from types import SimpleNamespace

    from vitdistill.train.preemption import StopRequests

    real_start = threading.Thread.start

    def slow_start(thread):
        real_start(thread)
        deadline = time.monotonic() + 0.2
        while time.monotonic() < deadline:
            pass

    stops = StopRequests().install(before_jax=True)
    stops.received, stops.in_training_steps = "SIGINT", True  # the first Ctrl-C came; inside the steps
    monkeypatch.setattr(threading.Thread, "start", slow_start)
    try:
        try:
            sys.unraisablehook(SimpleNamespace(exc_type=KeyboardInterrupt, exc_value=KeyboardInterrupt(),
                                               exc_traceback=None, err_msg=None, object=None))
        except KeyboardInterrupt:
            pytest.fail("the re-posted interrupt landed inside the hook")
        monkeypatch.setattr(threading.Thread, "start", real_start)
        with pytest.raises(KeyboardInterrupt):
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                pass
    finally:
        stops.uninstall()


def _signal_at_check(monkeypatch, n):
    """SIGTERM to this process just before the n-th check an evaluation makes between its batches; the calls
    made so far are returned."""
    from sigterm_at_check import sigterm_at_check
    from vitdistill.train import preemption

    check = sigterm_at_check(n, preemption.check_during_eval)
    monkeypatch.setattr(preemption, "check_during_eval", check)
    return check.calls


def test_sigterm_during_the_knn_before_training_stops_it_between_batches(tmp_path, monkeypatch):
    """A k-NN over a large split can outlast a scheduler's grace period: the stop comes at the next batch,
    nothing is saved (nothing was trained), and the re-run measures the network at initialisation again."""
    from test_diagnostics import _dino_run
    from vitdistill import methods
    from vitdistill.errors import Preempted

    config = _dino_run(**{"knn.before_training": True, "max_steps": 2})
    calls = _signal_at_check(monkeypatch, 2)
    with pytest.raises(Preempted) as stopped:
        methods.train_and_evaluate(config, str(tmp_path))
    assert len(calls) == 2  # the bank's second batch of 3: not the end of the evaluation
    message = str(stopped.value)
    assert "stopped by SIGTERM during an evaluation" in message and "at step 0/2" in message, message
    assert "nothing was trained yet, so nothing was saved" in message and "Re-run the same command" in message
    assert _checkpoint_steps(str(tmp_path)) == [] and not os.path.exists(tmp_path / "knn_at_init.json")
    monkeypatch.undo()
    final = methods.train_and_evaluate(config, str(tmp_path))
    assert final["step"] == 2 and os.path.exists(tmp_path / "knn_at_init.json")


def test_sigterm_during_an_evaluation_between_steps_saves_the_step_it_evaluated(tmp_path, monkeypatch):
    from test_train import _deit_config
    from vitdistill import methods
    from vitdistill.errors import Preempted

    config = _deit_config(kind="none", steps=4)
    config.eval_every_epochs = 2.5 / (1438 // config.batch_size)  # after step 2 (and at the end)
    config.checkpoint_every_steps = 1000
    _signal_at_check(monkeypatch, 1)
    with pytest.raises(Preempted) as stopped:
        methods.train_and_evaluate(config, str(tmp_path))
    message = str(stopped.value)
    assert "stopped by SIGTERM during an evaluation" in message and "at step 2/4" in message, message
    assert _checkpoint_steps(str(tmp_path)) == [2] and "step 2 is saved" in message
    monkeypatch.undo()
    assert methods.train_and_evaluate(config, str(tmp_path))["step"] == 4
    assert _checkpoint_steps(str(tmp_path))[-1] == 4

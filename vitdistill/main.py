"""Train and evaluate DeiT or DINO.

    python -m vitdistill.main --config=configs/deit_s.py --workdir=DIR [--config.KEY=VALUE ...]

Re-running the same command in the same workdir resumes from the latest checkpoint.
"""
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before anything imports TensorFlow

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from vitdistill import cli  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "A config file, configs/NAME.py[:ARG].", lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, metrics and the resolved config go here; re-running resumes.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first: multi-host TPU pods, SLURM and Open MPI "
                  "are detected; elsewhere give the three flags below.")
flags.DEFINE_string("coordinator_address", None, "--distributed: host:port of process 0 (default: auto-detected).")
flags.DEFINE_integer("num_processes", None, "--distributed: how many processes (default: auto-detected).")
flags.DEFINE_integer("process_id", None, "--distributed: this process's index (default: auto-detected).")
flags.DEFINE_string("jax_cache_dir", os.path.expanduser("~/.cache/vitdistill/jax"),
                    "Persistent XLA compilation cache: re-runs and resumes skip compiling ('' turns it off).")
flags.DEFINE_bool("debug", False, "Show the traceback of errors about the config, data or checkpoints.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    from vitdistill.train import preemption

    # SIGTERM / Ctrl-C from now on stop the run at a step boundary, with a checkpoint
    preemption.install_early(exit_at_once=None if FLAGS.debug else _stopped_at_once)
    try:
        _main(argv, preemption)  # with --debug a second Ctrl-C outside the steps is a KeyboardInterrupt's traceback
    finally:  # the run has ended (its line is printed): a Ctrl-C or SIGTERM during the exit changes nothing
        preemption.ignore_while_exiting()


def _stopped_at_once():
    """A second Ctrl-C outside a training step (starting up, restoring, building the run, evaluating): one
    line, then the process ends without unwinding (nothing is being written then: the loop's checkpoint saves
    are awaited before it returns, and a second Ctrl-C inside the steps goes to the loop)."""
    print("vitdistill: stopped at once by a second Ctrl-C, outside a training step; every checkpoint already "
          f"written in {FLAGS.workdir} stays. Re-run the same command to resume.", file=sys.stderr, flush=True)
    _exit_now(130)


def _exit_now(status: int):
    """Ends the process with `status` without the interpreter's exit, once what it had to say is printed:
    threads that an interrupt or a failed write left behind (orbax's workers, XLA's compiler, tf.data's)
    print tracebacks, hang or crash when Python joins and tears them down."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _main(argv, preemption):
    if len(argv) > 1:  # one line, not absl's usage page: a value without its flag, or a flag without "--"
        print(f"vitdistill: unexpected arguments {' '.join(map(repr, argv[1:]))}: every setting is a flag, "
              "--name=value (--config=FILE, --workdir=DIR, --config.KEY=VALUE); see --helpfull", file=sys.stderr)
        sys.exit(2)
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax and TF are chatty at INFO; the progress bar says enough
    from vitdistill import tf_import

    tf = tf_import.tensorflow()  # without the start-up lines TF_CPP_MIN_LOG_LEVEL no longer silences
    tf.config.set_visible_devices([], "GPU")  # tf.data runs on the host; accelerators belong to JAX
    import jax

    if FLAGS.jax_cache_dir:
        jax.config.update("jax_compilation_cache_dir", FLAGS.jax_cache_dir)
    if FLAGS.distributed:
        jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address, num_processes=FLAGS.num_processes,
                                   process_id=FLAGS.process_id)
    preemption.install()  # the processes are known now: with several, JAX's preemption service takes SIGTERM
    logging.info("JAX process %d/%d, local devices %s, %d devices in all", jax.process_index(),
                 jax.process_count(), jax.local_devices(), jax.device_count())

    from vitdistill.errors import CheckpointSaveError, Preempted, StoppedAtOnce, UserError
    from vitdistill.methods import train_and_evaluate

    try:
        train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except Preempted as e:  # SIGTERM / Ctrl-C: the state is saved; the scheduler's requeue resumes it
        if jax.process_index() == 0:
            print(f"vitdistill: {e}", file=sys.stderr, flush=True)
        if isinstance(e, StoppedAtOnce):  # the second Ctrl-C may have cut XLA's compile or tf.data's tracing
            _exit_now(e.exit_status)  # short (SIGSEGV at exit); the loop closed checkpoints and metrics first
        sys.exit(e.exit_status)
    except UserError as e:
        if FLAGS.debug:
            raise
        print(f"vitdistill: {e}", file=sys.stderr, flush=True)
        if isinstance(e, CheckpointSaveError):  # orbax's writer threads die noisily, or hang, at a normal exit
            _exit_now(2)
        sys.exit(2)


def _parse_flags(argv):
    return cli.parse_flags(argv, "vitdistill")


if __name__ == "__main__":
    from vitdistill import allocator

    allocator.reexec_under_tcmalloc()  # XLA:CPU's per-step temporaries: see vitdistill/allocator.py
    app.run(main, flags_parser=_parse_flags)

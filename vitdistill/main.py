"""Train and evaluate DeiT or DINO.

    python -m vitdistill.main --config=configs/deit_s.py --workdir=DIR [--config.KEY=VALUE ...]

Re-running the same command in the same workdir resumes from the latest checkpoint.
"""
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before anything imports TensorFlow

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

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
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax and TF are chatty at INFO; the progress bar says enough
    import tensorflow as tf

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


def _config_arg(argv):
    """The value of --config=PATH[:ARG] in `argv`, or None."""
    return next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)


def _unknown_override(argv) -> str:
    """Names an override that is not a config key, with the valid keys where it failed ('' if none)."""
    config_arg = _config_arg(argv)
    if config_arg is None:
        return ""
    from vitdistill import recipes

    try:
        config = recipes.from_file(config_arg)
    except Exception:  # the flag parser reports a config file that does not load
        return ""
    for override in (a for a in argv if a.startswith("--config.")):
        key = override[len("--config."):].split("=", 1)[0]
        node, walked = config, []
        for part in key.split("."):
            fields = node.keys() if hasattr(node, "keys") else []
            if part not in fields:
                where = "config." + ".".join(walked) if walked else "config"
                return (f"Unknown config key {key!r}: {where} has no field {part!r}. Valid keys of {where}: "
                        f"{', '.join(sorted(fields))}.")
            node, walked = node[part], walked + [part]
    return ""


def _first_user_error(error):
    """The first `UserError` in an exception's chain (a config file's get_config raised it, and ml_collections
    and absl wrapped it in errors of their own that carry its traceback as their message), or None."""
    from vitdistill.errors import UserError

    found, seen = None, set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, UserError):
            found = error
        error = error.__cause__ or error.__context__
    return found


def _missing_config_file(argv) -> str:
    """Names a --config file that does not exist, with the shipped configs ('' if it exists or none is given)."""
    config_arg = _config_arg(argv)
    if config_arg is None:
        return ""
    path = config_arg.partition(":")[0]
    if os.path.isfile(path):
        return ""
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    shipped = sorted(f for f in os.listdir(here) if f.endswith(".py")) if os.path.isdir(here) else []
    listing = f"; the shipped configs are in {here}: {', '.join(shipped)}" if shipped else ""
    return f"No config file {path!r} (from --config={config_arg}){listing}"


def _parse_flags(argv):
    missing = _missing_config_file(argv)
    if missing:
        print(f"vitdistill: {missing}", file=sys.stderr)
        sys.exit(2)
    try:
        return FLAGS(argv)
    except flags.IllegalFlagValueError as e:  # e.g. --config.batch_size=abc, or a config file's own UserError
        user_error = _first_user_error(e)
        if "--debug" in argv and user_error is not None:
            raise
        message = user_error or f"{e}; give the key a value of its type (see the config file)"
        print(f"vitdistill: {message}", file=sys.stderr)
        sys.exit(2)
    except (AttributeError, KeyError) as e:
        message = _unknown_override(argv) or f"Bad --config override: {e}"
        print(f"vitdistill: {message}", file=sys.stderr)
        sys.exit(2)
    except Exception as e:  # noqa: BLE001 -- only a config file's own UserError is shortened
        user_error = _first_user_error(e)
        if user_error is None or "--debug" in argv:
            raise
        print(f"vitdistill: {user_error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    from vitdistill import allocator

    allocator.reexec_under_tcmalloc()  # XLA:CPU's per-step temporaries: see vitdistill/allocator.py
    app.run(main, flags_parser=_parse_flags)

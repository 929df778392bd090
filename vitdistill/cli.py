"""The command line's flag parsing, shared by `vitdistill.main` and `vitdistill.bench`: a fault in the flags (a
missing config file or one that does not load, an unknown flag, an unknown or mistyped override, a config file's
own error) is one line that names it and the fix, exit status 2, never a traceback (but with --debug)."""
import os
import sys

from absl import flags


def config_flag_value(argv):
    """The value of --config=PATH[:ARG] in `argv`, or None."""
    return next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)


def unknown_override(argv) -> str:
    """Names an override that is not a config key, with the valid keys where it failed ('' if none)."""
    config_arg = config_flag_value(argv)
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


def first_user_error(error):
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


def missing_config_file(argv) -> str:
    """Names a --config file that does not exist, with the shipped configs ('' if it exists or none is given)."""
    config_arg = config_flag_value(argv)
    if config_arg is None:
        return ""
    path = config_arg.partition(":")[0]
    if os.path.isfile(path):
        return ""
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    shipped = sorted(f for f in os.listdir(here) if f.endswith(".py")) if os.path.isdir(here) else []
    listing = f"; the shipped configs are in {here}: {', '.join(shipped)}" if shipped else ""
    return f"No config file {path!r} (from --config={config_arg}){listing}"


def config_file_fault(argv, error) -> str:
    """One line for a config file that does not load (a syntax error, a failed import, an exception of its
    get_config that is not a `UserError`, no get_config at all), naming the file, the fault and the fix."""
    path = (config_flag_value(argv) or "").partition(":")[0]
    fix = "fix the file, or run with --debug for the traceback"
    if isinstance(error, SyntaxError):
        return f"The config file {path} does not parse: {error.msg} at line {error.lineno}; {fix}"
    if isinstance(error, AttributeError) and "get_config" in str(error):
        return (f"The config file {path} defines no get_config(): a config file returns its ConfigDict from "
                "get_config(arg=None) (see configs/)")
    text = str(error)
    if isinstance(error, flags.IllegalFlagValueError) and "Traceback" in text:
        # ml_collections wraps get_config's exception with its traceback: keep the exception's own last line
        last = [line for line in text.splitlines() if line.strip()][-1].strip()
        return f"The config file {path} failed to load: {last}; {fix}"
    return f"The config file {path} failed to load: {type(error).__name__}: {text}; {fix}"


def flags_fault(argv, error) -> str:
    """The one line for an error of absl's flag parsing: a config file's own `UserError`, an unknown flag, an
    override of the wrong type or of a key the config lacks, or a config file that does not load."""
    user_error = first_user_error(error)
    if user_error is not None:
        return str(user_error)
    text = str(error)
    if isinstance(error, flags.UnrecognizedFlagError):  # e.g. --wrkdir: absl names it and the nearest flag
        return f"{text} (the flags: --helpfull)"
    if isinstance(error, flags.IllegalFlagValueError) and "Error whilst parsing config file" not in text:
        hint = "; give the key a value of its type (see the config file)" if text.startswith("flag --config.") else ""
        return f"{text}{hint}"  # e.g. --config.batch_size=abc
    if isinstance(error, (AttributeError, KeyError)) and "get_config" not in text:
        return unknown_override(argv) or f"Bad --config override: {error}"
    return config_file_fault(argv, error)  # its import or get_config failed


def parse_flags(argv, program: str = "vitdistill"):
    """absl's flag parsing for an entry point with a --config flag, its faults one line each (`program: ...`,
    exit status 2, no traceback): a config file that is missing or does not load, an unknown flag, an override of
    a key the config lacks or of the wrong type, and a config file's own `UserError` (tracebacks with --debug)."""
    missing = missing_config_file(argv)
    if missing:
        print(f"{program}: {missing}", file=sys.stderr)
        sys.exit(2)
    try:
        return flags.FLAGS(argv)
    except Exception as e:  # noqa: BLE001 -- each fault is one line (`flags_fault`)
        if "--debug" in argv:
            raise
        print(f"{program}: {flags_fault(argv, e)}", file=sys.stderr)
        sys.exit(2)

"""The command-line tools run under tcmalloc where the machine has it.

XLA:CPU allocates each execution's temporary buffers anew and frees them at its end. glibc's malloc serves
allocations that large with mmap and gives them back with munmap, so every train step faults its temporaries
in again, one zeroed 4 KiB page at a time: a DeiT-S step at batch 4 took 128,540 minor page faults (502 MB)
and 220 ms of system CPU time a step, a DINO ViT-S/16 step 434,714. tcmalloc keeps freed memory for the next
allocation, so the faults go away (36 and 48 a step). PyTorch's steps do not pay this (its minor faults and
step times are the same with and without tcmalloc), which is why the comparison in the README's speed table is
like for like either way. The preloaded allocator is the one TPU VM images and PyTorch's CPU launcher
(`torch.backends.xeon.run_cpu`) set up for the same reason.

A preload has to be in place before the process starts, so `python -m vitdistill.main` and
`python -m vitdistill.bench` re-execute themselves once, with `LD_PRELOAD` naming the library, before they
import anything heavy. `VITDISTILL_MALLOC` chooses: unset or `tcmalloc` (the library where one is installed,
`apt-get install libtcmalloc-minimal4` on Debian and Ubuntu; glibc's malloc otherwise, as before), `system`
(never re-execute), or the path of an allocator library to preload instead. Library users (notebooks,
their own scripts) start their interpreter with `LD_PRELOAD` themselves.
"""
import os
import sys

CHOICE = "VITDISTILL_MALLOC"
MARKER = "VITDISTILL_MALLOC_PRELOADED"  # set in the re-executed process: never re-execute twice
LIBRARIES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
MALLOC_LIBRARIES = ("libtcmalloc", "libjemalloc", "libmimalloc")  # file-name prefixes of malloc replacements
SEARCH_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
               "/usr/local/lib", "/lib/x86_64-linux-gnu", "/lib64")
# tcmalloc prints a report with a stack trace for every allocation over 1 GiB by default; XLA's temporaries
# for a large batch are that big on every step.
QUIET = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)}


class AllocatorChoiceError(ValueError):
    """`VITDISTILL_MALLOC` names neither a choice nor a library file."""


def find_tcmalloc(dirs=SEARCH_DIRS) -> str | None:
    """The first tcmalloc library in the usual library directories, or None."""
    for directory in dirs:
        for name in LIBRARIES:
            path = os.path.join(directory, name)
            if os.path.isfile(path):
                return path
    return None


def preload_environment(environ, find=find_tcmalloc) -> dict | None:
    """The environment to re-execute under, or None where the process should go on as it is: not on Linux,
    already re-executed, `VITDISTILL_MALLOC=system`, the library already preloaded, or none installed."""
    if not sys.platform.startswith("linux") or environ.get(MARKER):
        return None
    choice = environ.get(CHOICE, "tcmalloc").strip()
    if choice == "system":
        return None
    if choice == "tcmalloc":
        library = find()
    elif os.path.isfile(choice):
        library = choice
    else:
        raise AllocatorChoiceError(
            f"{CHOICE}={choice!r} is not a file: set it to 'tcmalloc' (the default: tcmalloc where installed), "
            "'system' (glibc's malloc) or the path of an allocator library to preload")
    preloaded = environ.get("LD_PRELOAD", "").replace(":", " ").split()
    if library is None or library in preloaded or any(os.path.basename(p).startswith(MALLOC_LIBRARIES)
                                                      for p in preloaded):
        return None  # none to preload, or the user preloads an allocator of their own
    env = dict(environ)
    env["LD_PRELOAD"] = " ".join([library] + preloaded)
    env[MARKER] = library
    for key, value in QUIET.items():
        env.setdefault(key, value)
    return env


def reexec_under_tcmalloc():
    """Re-execute this interpreter with the same command line under the preloaded allocator, where
    `preload_environment` says so; returns only where it does not. A bad `VITDISTILL_MALLOC` ends the
    process with one message."""
    try:
        env = preload_environment(os.environ)
    except AllocatorChoiceError as e:
        print(f"vitdistill: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    argv = getattr(sys, "orig_argv", None)
    if env is None or not argv:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable] + list(argv[1:]), env)
    except OSError:  # cannot re-execute: go on with glibc's malloc, only slower
        return


def in_use() -> str:
    """The malloc library this process has mapped (tcmalloc's, jemalloc's or mimalloc's file name), else 'glibc'
    ('system' where there is no /proc/self/maps to read)."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                name = os.path.basename(line.split()[-1]) if line.strip() else ""
                if name.startswith(MALLOC_LIBRARIES):
                    return name
    except OSError:
        return "system"
    return "glibc"

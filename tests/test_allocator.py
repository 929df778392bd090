"""The command-line tools re-execute themselves under tcmalloc (vitdistill/allocator.py): when, how, and the
message for a bad choice."""
import json
import os
import subprocess
import sys

import pytest

from vitdistill import allocator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _library(tmp_path, name="libtcmalloc_minimal.so.4"):
    path = tmp_path / name
    path.write_bytes(b"")
    return str(path)


def _mapped(fragment):
    """The path of a library this process has mapped whose file name contains `fragment`."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            path = line.split()[-1] if len(line.split()) >= 6 else ""
            if fragment in os.path.basename(path) and os.path.isfile(path):
                return path
    raise AssertionError(f"no {fragment} mapped")


def test_find_tcmalloc_prefers_the_minimal_library(tmp_path):
    assert allocator.find_tcmalloc(dirs=[str(tmp_path)]) is None
    full = _library(tmp_path, "libtcmalloc.so.4")
    assert allocator.find_tcmalloc(dirs=[str(tmp_path)]) == full
    minimal = _library(tmp_path)
    assert allocator.find_tcmalloc(dirs=["/nonexistent", str(tmp_path)]) == minimal


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux's")
def test_preload_environment(tmp_path):
    lib = _library(tmp_path)
    env = allocator.preload_environment({"PATH": "/bin", "LD_PRELOAD": "/x/libother.so"}, find=lambda: lib)
    assert env["LD_PRELOAD"] == f"{lib} /x/libother.so"  # first, the user's own preloads kept after it
    assert env[allocator.MARKER] == lib and env["PATH"] == "/bin"
    assert int(env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) >= 1 << 40
    kept = allocator.preload_environment({"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": "5"}, find=lambda: lib)
    assert kept["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"] == "5"
    # A path instead of 'tcmalloc' is preloaded as given, without searching.
    other = _library(tmp_path, "libjemalloc.so.2")
    assert allocator.preload_environment({allocator.CHOICE: other}, find=None)["LD_PRELOAD"] == other
    # Cases that go on as they are.
    assert allocator.preload_environment({}, find=lambda: None) is None  # none installed
    assert allocator.preload_environment({allocator.CHOICE: "system"}, find=lambda: lib) is None
    assert allocator.preload_environment({allocator.MARKER: lib}, find=lambda: lib) is None  # re-executed once
    assert allocator.preload_environment({"LD_PRELOAD": lib}, find=lambda: lib) is None
    assert allocator.preload_environment({"LD_PRELOAD": "/opt/libtcmalloc.so"}, find=lambda: lib) is None
    assert allocator.preload_environment({"LD_PRELOAD": "/opt/libjemalloc.so.2"}, find=lambda: lib) is None
    with pytest.raises(allocator.AllocatorChoiceError, match="'system'"):
        allocator.preload_environment({allocator.CHOICE: str(tmp_path / "missing.so")}, find=lambda: lib)


_CHILD = ("from vitdistill import allocator; allocator.reexec_under_tcmalloc(); import json, os, sys; "
          "print(json.dumps([os.getpid(), os.environ.get('LD_PRELOAD'), os.environ.get(allocator.MARKER), "
          "sys.argv[1:], allocator.in_use()]))")


def _run_child(env, *args):
    child = subprocess.Popen([sys.executable, "-c", _CHILD, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err
    return child.pid, json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux's")
def test_reexec_replaces_the_process_with_the_same_command_line():
    """With the C library itself as the 'allocator' (harmless to preload, present everywhere): the process
    re-executes in place (same pid) with the same arguments and the preload and marker set."""
    libc = _mapped("libc.so")
    env = dict(os.environ, **{allocator.CHOICE: libc})
    env.pop(allocator.MARKER, None)
    env.pop("LD_PRELOAD", None)
    pid, (child_pid, preload, marker, argv, _) = _run_child(env, "a", "--b=c")
    assert child_pid == pid  # exec, not a new process
    assert preload == libc and marker == libc
    assert argv == ["a", "--b=c"]
    # `system` leaves the process alone.
    env[allocator.CHOICE] = "system"
    assert _run_child(env)[1][1:3] == [None, None]


@pytest.mark.skipif(allocator.find_tcmalloc() is None, reason="tcmalloc is not installed "
                    "(apt-get install libtcmalloc-minimal4); .ci/run installs it")
def test_tcmalloc_is_mapped_by_default():
    env = dict(os.environ)
    for key in (allocator.CHOICE, allocator.MARKER, "LD_PRELOAD"):
        env.pop(key, None)
    _, (_, preload, marker, _, in_use) = _run_child(env)
    assert in_use.startswith("libtcmalloc") and marker == allocator.find_tcmalloc() and preload == marker


def test_a_bad_choice_is_one_message():
    env = dict(os.environ, **{allocator.CHOICE: "/no/such/libmalloc.so"})
    env.pop(allocator.MARKER, None)
    out = subprocess.run([sys.executable, "-m", "vitdistill.bench", "--config=configs/deit_s.py"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "vitdistill: VITDISTILL_MALLOC='/no/such/libmalloc.so' is not a file: set it to 'tcmalloc' (the default: "
        "tcmalloc where installed), 'system' (glibc's malloc) or the path of an allocator library to preload"]

"""Local or remote paths. A path with a scheme (`gs://bucket/run`, or any filesystem `tf.io.gfile` has:
`ram://` in the tests) goes through `tf.io.gfile`, never the `os` module; a local path through `os`, so
that the converter writes local weights without importing TensorFlow.

Orbax writes checkpoint arrays with TensorStore, which has local files and Google Cloud Storage: workdirs and
checkpoints may be local or `gs://`. Data, logs, metrics and the resolved config may be on any gfile path.
"""
import os

CHECKPOINT_SCHEMES = ("gs://",)  # the remote paths orbax (TensorStore) writes checkpoint arrays to


def is_remote(path: str) -> bool:
    return "://" in str(path)


def absolute(path: str) -> str:
    """An absolute local path, or a remote one as given."""
    return str(path) if is_remote(path) else os.path.abspath(path)


def _gfile():
    from tensorflow.io import gfile

    return gfile


def exists(path: str) -> bool:
    return _gfile().exists(path) if is_remote(path) else os.path.exists(path)


def isdir(path: str) -> bool:
    return _gfile().isdir(path) if is_remote(path) else os.path.isdir(path)


def listdir(path: str) -> list:
    return [name.rstrip("/") for name in _gfile().listdir(path)] if is_remote(path) else os.listdir(path)


def makedirs(path: str) -> None:
    if is_remote(path):
        _gfile().makedirs(path)
    else:
        os.makedirs(path, exist_ok=True)


def open_file(path: str, mode: str = "r"):
    return _gfile().GFile(path, mode) if is_remote(path) else open(path, mode)


def check_checkpointable(path: str, what: str = "workdir") -> str:
    """`path` made absolute, or a UserError-worthy message's ConfigError if orbax cannot write checkpoints
    there (a remote scheme other than gs://): checkpoints would otherwise land in a local folder named
    after the scheme."""
    from vitdistill.errors import ConfigError

    if is_remote(path) and not str(path).startswith(CHECKPOINT_SCHEMES):
        raise ConfigError(f"{what} {path!r}: checkpoints can be written to local paths and "
                          f"{', '.join(CHECKPOINT_SCHEMES)} only (orbax writes arrays with TensorStore); "
                          "use a local or gs:// path (data may be on any path tf.io.gfile reads)")
    return absolute(path)

"""Every run, checkpoint, export and data path, local or in the cloud, through ``etils.epath``.

``gs://bucket/run`` (and ``s3://``, ``az://`` with the user's fsspec plugin: gcsfs, s3fs, adlfs)
stays a URL end to end; local paths expand ``~``. Object stores cannot append or rename
atomically, so the helpers here rewrite instead of appending and write in place instead of
renaming where the path is remote.
"""

from __future__ import annotations

import io
import os
import re
import uuid

from etils import epath

from comoe_jax.errors import ConfigError, RunFolderError

URL_SCHEMES = ("gs://", "s3://", "az://", "hf://")


# A Hugging Face hub model id, "org/name" or "org/name@revision" (model.path, when no such local path exists).
HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")


def hub_id(path) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` when ``path`` names a hub model rather than an existing local path."""
    text = os.fspath(path)
    match = HUB_ID.match(text)
    if match is None or text.startswith((".", "~")) or os.path.exists(text):
        return None
    return match["repo"], match["revision"]


def is_local(path) -> bool:
    return "://" not in os.fspath(path)


def as_path(path) -> epath.Path:
    """``path`` (str, pathlib or epath) as an ``epath.Path``; an unsupported URL scheme is a ConfigError."""
    text = os.fspath(path)
    if text.startswith("file://"):  # file:///abs/path: a local path written as a URL
        text = text.removeprefix("file://")
    if is_local(text):
        return epath.Path(os.path.expanduser(text))
    if not text.startswith(URL_SCHEMES):
        raise ConfigError(f"{text}: URL scheme not supported; use a local path or one of {', '.join(URL_SCHEMES)}")
    return epath.Path(text)


def absolute(path) -> epath.Path:
    """Absolute for local paths (orbax needs them), unchanged for URLs."""
    path = as_path(path)
    return epath.Path(os.path.abspath(path)) if is_local(path) else path


def append_text(path, text: str) -> None:
    """Append to a text file; on an object store, rewrite it (they cannot append)."""
    path = as_path(path)
    if is_local(path):
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)
        return
    path.write_text((path.read_text() if path.exists() else "") + text)


def replace(src, dst) -> None:
    """Move ``src`` to ``dst``, replacing a file there (atomic on local disks)."""
    src, dst = as_path(src), as_path(dst)
    if is_local(src):
        os.replace(src, dst)
    else:
        if dst.exists():
            dst.rmtree() if dst.is_dir() else dst.unlink()
        src.rename(dst)


def write_atomic(path, text: str) -> None:
    """Write a text file so that a reader (or a crash) never sees it half written."""
    path = as_path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    replace(tmp, path)


def output_folder(path, name: str) -> epath.Path:
    """Create the folder ``path`` (named ``name`` in messages: a config key or an option) before any work, so a
    file in the way or an unwritable place is refused at once."""
    path = as_path(path)
    if path.exists() and not path.is_dir():
        raise RunFolderError(f"{name}={path} is a file, not a folder; choose a folder path")
    try:
        path.mkdir(parents=True, exist_ok=True)
        if is_local(path):  # an existing read-only folder passes mkdir: write (and remove) a probe file
            probe = path / f".comoe-write-probe-{uuid.uuid4().hex}"  # hosts may share the folder
            probe.write_bytes(b"")
            probe.unlink()
    except OSError as e:
        raise RunFolderError(f"{name}={path} cannot be written ({e.strerror or e}); choose a writable folder") from None
    return path


def results_folder(path, name: str) -> epath.Path:
    """:func:`output_folder` for a command's results (analyze, compare, sweep): never a training run's folder,
    whose plots and tables have the same names."""
    if not str(path).strip():
        raise RunFolderError(f"{name} '': empty; give a folder for the results")
    path = as_path(path)
    if (path / "config.json").is_file() and ((path / "checkpoints").is_dir() or (path / "metrics.jsonl").is_file()):
        raise RunFolderError(f"{name}={path} is a training run, whose plots and tables the results would overwrite; "
                             "choose another folder")
    return output_folder(path, name)


def copy_tree(src, dst) -> None:
    """Copy the files of folder ``src`` (and its subfolders) into ``dst``, local or remote."""
    src, dst = as_path(src), as_path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        if item.is_dir():
            copy_tree(item, dst / item.name)
        else:
            (dst / item.name).write_bytes(item.read_bytes())


def remove_tree(path) -> None:
    path = as_path(path)
    if path.exists():
        path.rmtree() if path.is_dir() else path.unlink()


def save_figure(fig, path, dpi: int = 100) -> epath.Path:
    """``fig.savefig`` as PNG to any path (matplotlib writes local files only, so it goes through bytes)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    path = as_path(path)
    path.write_bytes(buffer.getvalue())
    return path

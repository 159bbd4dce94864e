"""Writing a folder (a saved adapter, a merged model) whole or not at all.

The files go into a hidden sibling folder first, are flushed to disk, and then take the target's place in one
rename; a kill at any moment leaves the old folder or the new one, never new weights beside an old run record.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import shutil
from pathlib import Path

from ..config import check_folder
from ..errors import ConfigError

STAGING = ".qlora-staging-"  # + the writer's pid: a staging folder a killed writer left is removed by the next one
_RENAME_EXCHANGE = 2  # renameat2's flag: swap two paths in one step (Linux 3.15+, glibc 2.28+)


def check_folder_path(path, what: str) -> Path:
    """`path` as a folder `what` can be written to (config.check_folder: one line when it cannot be), before
    anything is written. A link is followed: the folder it points to is the one replaced."""
    check_folder(path, what)
    folder = Path(path).expanduser()
    return folder.resolve() if folder.is_symlink() else folder


@contextlib.contextmanager
def folder_written(target: Path, what: str, keep_others: bool = False):
    """Yields an empty staging folder beside `target`; when the block ends, its files are synced to disk and the
    folder takes `target`'s place at once (the old `target` is removed after). On any error the staging folder is
    removed and `target` stays as it was; an OSError (a full disk, a permission) becomes one line.
    `keep_others`: what `target` holds that the new folder does not (a user's notes, a checkpoint's optimizer
    state beside a saved adapter) is kept, linked into the staging folder before the swap."""
    created = _make_parents(target.parent, what)
    _remove_abandoned_staging(target.parent)
    staging = None
    try:
        staging = target.parent / f"{STAGING}{os.getpid()}-{secrets.token_hex(4)}"
        staging.mkdir()  # not mkdtemp: its 0700 would become the saved folder's mode
        yield staging
        if keep_others and target.is_dir():
            _keep_others(target, staging)
        _sync(staging)
        old = _swap_in(staging, target)
        _sync_folder(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as error:
        if staging is not None and staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
        for folder in reversed(created):
            with contextlib.suppress(OSError):
                folder.rmdir()
        if isinstance(error, OSError):
            raise ConfigError(f"Cannot write {what} to {str(target)!r}: {error.strerror or error}. Nothing was changed: "
                              "choose another folder, or free the space.") from None
        raise


def _keep_others(old: Path, new: Path):
    """Link (or, across file systems, copy) into `new` every entry of `old` that `new` does not have."""
    for entry in old.iterdir():
        if (new / entry.name).exists() or (new / entry.name).is_symlink():
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry), new / entry.name)
        elif entry.is_dir():
            shutil.copytree(entry, new / entry.name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, new / entry.name)


def _link_or_copy(source, destination):
    try:
        os.link(source, destination)  # no second copy: the old folder is removed after the swap
    except OSError:
        shutil.copy2(source, destination)


def _make_parents(parent: Path, what: str) -> list[Path]:
    """Create the missing folders above the target; returns them, outermost first, to remove on failure."""
    created = []
    try:
        for folder in [p for p in [parent, *parent.parents] if not p.exists()][::-1]:
            folder.mkdir()
            created.append(folder)
    except OSError as error:
        for folder in reversed(created):
            folder.rmdir()
        raise ConfigError(f"Cannot create {str(parent)!r} for {what}: {error.strerror or error}: choose another folder.") from None
    return created


def _remove_abandoned_staging(parent: Path):
    """Remove staging folders whose writer is gone (killed mid-save). An old folder set aside by the two-rename
    swap ("-old") stays: its writer may have died before the new one took its place."""
    for folder in parent.glob(f"{STAGING}*"):
        pid = folder.name[len(STAGING):].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)) and not folder.name.endswith("-old"):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _sync(folder: Path):
    """Flush every file under `folder`, and the folders themselves, to disk."""
    for root, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _sync_folder(Path(root))


def _sync_folder(folder: Path):
    with contextlib.suppress(OSError):  # some systems cannot open a folder to sync it
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _swap_in(staging: Path, target: Path) -> Path | None:
    """Put `staging` in `target`'s place; returns where the old target now is (None when there was none)."""
    if not target.exists() or (target.is_dir() and not any(target.iterdir())):
        os.replace(staging, target)  # a missing target or an empty folder: one rename
        return None
    if _exchange(staging, target):
        return staging  # the two swapped: staging holds the old folder
    # No atomic swap here: two renames, the old folder set aside until the new one is in place.
    old = staging.with_name(staging.name + "-old")
    os.rename(target, old)
    os.rename(staging, target)
    return old


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step with Linux's renameat2; False where the system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_cwd = -100  # AT_FDCWD: the paths are absolute or relative to the working folder
    if renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):  # the file system or kernel has no exchange
        return False
    raise OSError(code, os.strerror(code), str(b))

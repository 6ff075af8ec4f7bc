"""File helpers: content hashes, atomic writes, and a writable-folder check."""
import hashlib
import os
import tempfile
from typing import Callable

__all__ = ['file_sha256', 'atomic_write', 'check_writable']


def file_sha256(path: str) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks.

    Example:
        >>> file_sha256('hub/run/model.safetensors')
    """
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Calls ``write(tmp)`` then renames ``tmp`` to ``path``: readers see the old file or the whole new one.

    Example:
        >>> atomic_write('run/last.pth', lambda p: torch.save(state, p))
    """
    tmp = f'{path}.tmp{os.getpid()}'
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask)  # some writers (safetensors) create 0600 files
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def check_writable(folder: str, flag: str) -> None:
    """Raises a one-line ``ValueError`` naming ``flag`` when ``folder`` (or, if it does not exist yet, the
    folder it would be created in) cannot take a new file. Writes and removes a probe file: permission
    bits alone do not tell (read-only mounts, or root, for whom ``os.access`` always says yes).

    Example:
        >>> check_writable('output/train/run1', '--output')
    """
    probe_dir = os.path.abspath(folder)
    while not os.path.isdir(probe_dir) and os.path.dirname(probe_dir) != probe_dir:
        probe_dir = os.path.dirname(probe_dir)
    try:
        fd, probe = tempfile.mkstemp(prefix='.write-test-', dir=probe_dir)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise ValueError(f'{flag}: cannot write to {probe_dir!r} ({e.strerror or e}); choose a folder this user can '
                         f'write to.') from None

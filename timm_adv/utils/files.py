"""File helpers: content hashes and atomic writes."""
import hashlib
import os
from typing import Callable

__all__ = ['file_sha256', 'atomic_write']


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

"""File helpers shared by the Hub cache and the VQGAN loader."""
import hashlib

__all__ = ['file_sha256']


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

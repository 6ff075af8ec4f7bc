"""Place an exported folder in a Hugging Face cache, for offline use and air-gapped machines.

The layout is the one ``huggingface_hub`` reads with ``HF_HUB_OFFLINE=1``:
``models--<org>--<name>/{blobs/<sha256>, snapshots/<commit>/<file> -> blob, refs/<revision>}``.
After it, ``timm.create_model('hf-hub:org/name', pretrained=True)`` works without network.
"""
import hashlib
import os
import shutil
from typing import Optional

from timm_adv.utils.files import file_sha256

__all__ = ['populate_hf_cache']


def populate_hf_cache(folder: str, repo_id: str, cache_dir: Optional[str] = None, revision: str = 'main') -> str:
    """Copies an export folder into a Hub cache as repo ``repo_id`` at ``revision``.

    Args:
        folder: Export folder.
        repo_id: ``org/name`` the model will be loaded as (``hf-hub:org/name``).
        cache_dir: Hub cache root (default: huggingface_hub's, i.e. ``$HF_HUB_CACHE`` or ``$HF_HOME/hub``).
        revision: Branch name the snapshot is registered under.

    Returns:
        The snapshot folder.

    Example:
        >>> populate_hf_cache('hub/resnet10t.pgd_mnist', 'me/resnet10t.pgd_mnist', '/tmp/hf/hub')
    """
    if repo_id.count('/') != 1:
        raise ValueError(f'repo_id must look like org/name, got {repo_id!r}.')
    if cache_dir is None:
        from huggingface_hub.constants import HF_HUB_CACHE
        cache_dir = HF_HUB_CACHE
    repo_dir = os.path.join(cache_dir, 'models--' + repo_id.replace('/', '--'))
    files = sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)
    digest = hashlib.sha1()
    for rel in files:
        digest.update(rel.encode() + file_sha256(os.path.join(folder, rel)).encode())
    commit = digest.hexdigest()  # a 40-hex id standing for this exact content
    snapshot = os.path.join(repo_dir, 'snapshots', commit)
    for rel in files:
        src = os.path.join(folder, rel)
        blob = os.path.join(repo_dir, 'blobs', file_sha256(src))
        os.makedirs(os.path.dirname(blob), exist_ok=True)
        if not os.path.exists(blob):
            shutil.copyfile(src, blob)
        dst = os.path.join(snapshot, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if os.path.lexists(dst):
            os.remove(dst)
        try:
            os.symlink(os.path.relpath(blob, os.path.dirname(dst)), dst)
        except OSError:  # file systems without symlinks: huggingface_hub accepts plain copies
            shutil.copyfile(blob, dst)
    os.makedirs(os.path.join(repo_dir, 'refs'), exist_ok=True)
    with open(os.path.join(repo_dir, 'refs', revision), 'w') as f:
        f.write(commit)
    return snapshot

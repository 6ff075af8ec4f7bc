"""Upload an exported folder to the Hugging Face Hub, or check it in a dry run."""
import logging
import os
from typing import Dict, Optional

from timm_adv.utils import find_leaks

__all__ = ['REQUIRED_FILES', 'check_hub_folder', 'publish_folder']

_logger = logging.getLogger(__name__)

REQUIRED_FILES = ('config.json', 'model.safetensors', 'README.md')


def check_hub_folder(folder: str) -> None:
    """Raises a clear error when ``folder`` is not a complete export."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f'{folder!r} is not a folder; create it with `python -m timm_adv.hub export`.')
    missing = [f for f in REQUIRED_FILES if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise FileNotFoundError(f'{folder!r} lacks {", ".join(missing)}; re-run `python -m timm_adv.hub export` '
                                f'(it writes the weights, config and model card together).')
    for name in sorted(os.listdir(folder)):
        leaks = find_leaks(_published_text(os.path.join(folder, name)))
        if leaks:
            raise ValueError(f'{os.path.join(folder, name)!r} holds {" and ".join(leaks)}; nothing was uploaded. Remove '
                             f'it from the file (`python -m timm_adv.hub export` writes folders without them).')


def _published_text(path: str) -> str:
    # the text a reader of the repository sees: text files whole, the header of safetensors files
    if path.endswith('.safetensors'):
        from safetensors import safe_open
        with safe_open(path, framework='pt') as f:
            return '\n'.join((f.metadata() or {}).values())
    if path.endswith(('.md', '.json', '.yaml', '.yml', '.txt', '.csv')):
        with open(path, errors='replace') as f:
            return f.read()
    return ''


def publish_folder(
        folder: str,
        repo_id: str,
        private: bool = False,
        revision: Optional[str] = None,
        commit_message: str = 'Upload timm-adv robust model',
        token: Optional[str] = None,
        dry_run: bool = False,
        api=None,
) -> Dict:
    """Creates (if needed) the model repo and uploads the folder; ``dry_run`` only checks it.

    Args:
        folder: Export folder (config.json, model.safetensors, README.md).
        repo_id: ``org/name``.
        private: Create the repo private.
        revision: Branch to upload to (created from main if missing); default main.
        commit_message: Commit message.
        token: Hub token (default: ``HF_TOKEN`` / the saved login).
        dry_run: Check the folder and report what would be uploaded, without network.
        api: An ``HfApi``-like object (tests pass a fake).

    Returns:
        Dict with ``repo_id``, ``files``, ``dry_run`` and, after an upload, ``url`` / ``commit``.

    Raises:
        RuntimeError: No token for a real upload (names the fix).

    Example:
        >>> publish_folder('hub/resnet10t.pgd_mnist', 'me/resnet10t.pgd_mnist', dry_run=True)
    """
    check_hub_folder(folder)
    if repo_id.count('/') != 1 or not all(repo_id.split('/')):
        raise ValueError(f'--repo-id must look like org/name, got {repo_id!r}.')
    files = sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)
    result = dict(repo_id=repo_id, files=files, dry_run=dry_run, private=private, revision=revision or 'main')
    if dry_run:
        _logger.info(f'Dry run: would upload {len(files)} files from {folder} to {repo_id} '
                     f'({"private" if private else "public"}, revision {revision or "main"}): {", ".join(files)}')
        return result
    if api is None:
        from huggingface_hub import HfApi
        api = HfApi(token=token)
        token = token or _saved_token()
        if not token:
            raise RuntimeError('No Hugging Face token: set HF_TOKEN or run `hf auth login` (or use --dry-run to only '
                               'build and check the folder).')
    repo = api.create_repo(repo_id=repo_id, repo_type='model', private=private, exist_ok=True, token=token)
    if revision and revision != 'main':
        api.create_branch(repo_id=repo_id, branch=revision, exist_ok=True, token=token)
    commit = api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type='model', revision=revision,
                               commit_message=commit_message, token=token)
    result['url'] = str(getattr(repo, 'url', repo))
    result['commit'] = str(getattr(commit, 'oid', commit))
    _logger.info(f'Uploaded {folder} to {result["url"]} (commit {result["commit"]})')
    return result


def _saved_token() -> Optional[str]:
    from huggingface_hub import get_token
    return get_token()

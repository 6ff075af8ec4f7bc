"""Process groups that survive ``torchrun --max-restarts``: every restart of the worker group rendezvous afresh.

Under torchrun the workers build their process group on the agent's store (``TORCHELASTIC_USE_AGENT_STORE``),
and the agent keeps that store across restarts, with the static rendezvous and with ``c10d``. A restarted group
therefore finds the keys of the group before it, among them the addresses its peers listened on: gloo reads a
dead peer's address (``connectFullMesh ... Connection refused``) or waits on it. :func:`init_distributed_device`
gives each attempt its own namespace in that store, agreed on through the store itself (the restart count cannot
serve: an agent restarted for a new member does not count it, so nodes can disagree on it).

Example:
    >>> device = init_distributed_device(args)  # instead of timm.utils.init_distributed_device(args)
"""
import os
import time
import uuid
from datetime import timedelta
from typing import Iterator, Optional, Tuple
from urllib.parse import urlparse, urlunparse

import torch
from torch.distributed import PrefixStore, Store
from torch.distributed.constants import default_pg_timeout
from torch.distributed.rendezvous import register_rendezvous_handler, rendezvous
from timm.utils.distributed import init_distributed_device_so

__all__ = ['ELASTIC_SCHEME', 'agree_on_attempt', 'elastic_init_method', 'init_distributed_device']

ELASTIC_SCHEME = 'timm-adv-elastic'
_POLL_S = (0.05, 0.5)  # first and longest pause between looks at the store


def agree_on_attempt(store: Store, rank: int, world_size: int, timeout: timedelta) -> str:
    """A name for this attempt of the worker group: the same on every rank, new on every restart.

    ``store`` may still hold an earlier attempt's name, so a name read from it proves nothing: rank 0 draws a
    fresh name, every other rank answers the name it read with a nonce of its own, and accepts the name once
    rank 0 has echoed that nonce under it. An old name never echoes a nonce drawn now, so a rank that read one
    reads the name again until rank 0 has written the new one.

    Args:
        store: The store every rank of the group reaches (the agent's).
        rank: This process's global rank.
        world_size: Number of ranks.
        timeout: How long to wait for the other ranks.

    Raises:
        TimeoutError: The other ranks did not all answer within ``timeout``.

    Example:
        >>> name = agree_on_attempt(agent_store, rank, world_size, timedelta(minutes=30))
        >>> group_store = PrefixStore(f'my_run/{name}/', agent_store)  # no key of an earlier attempt in it
    """
    store = PrefixStore('timm_adv/attempt/', store)
    if rank == 0:
        name = uuid.uuid4().hex
        store.set('name', name)
        for peer in range(1, world_size):
            key = f'{name}/nonce/{peer}'
            store.wait([key], timeout)
            store.set(f'{name}/echo/{peer}', store.get(key))
        return name
    nonce, pause = uuid.uuid4().hex, _POLL_S[0]
    deadline = time.monotonic() + timeout.total_seconds()
    while time.monotonic() < deadline:
        name = store.get('name').decode()
        store.set(f'{name}/nonce/{rank}', nonce)
        echo = f'{name}/echo/{rank}'
        if store.check([echo]) and store.get(echo).decode() == nonce:
            return name
        time.sleep(pause)
        pause = min(2 * pause, _POLL_S[1])
    raise TimeoutError(f'rank {rank}: rank 0 of this attempt did not answer within {timeout} (torchrun restart)')


def _elastic_rendezvous(url: str, timeout: timedelta = default_pg_timeout,
                        **kwargs) -> Iterator[Tuple[Store, int, int]]:
    # torch's env:// rendezvous on the agent's store, narrowed to this attempt's namespace
    env_url = urlunparse(urlparse(url)._replace(scheme='env'))
    store, rank, world_size = next(rendezvous(env_url, timeout=timeout, **kwargs))
    attempt = agree_on_attempt(store, rank, world_size, timeout)
    yield PrefixStore(f'timm_adv/{attempt}/', store), rank, world_size
    raise RuntimeError(f'{ELASTIC_SCHEME}:// cannot rendezvous again; torchrun restarts the whole group instead')


register_rendezvous_handler(ELASTIC_SCHEME, _elastic_rendezvous)


def elastic_init_method() -> Optional[str]:
    """``init_method`` for the default process group: this module's rendezvous when the process group will live
    on torchrun's agent store (``TORCHELASTIC_USE_AGENT_STORE=True``), else None (``env://``)."""
    return f'{ELASTIC_SCHEME}://' if os.environ.get('TORCHELASTIC_USE_AGENT_STORE') == 'True' else None


def init_distributed_device(args) -> torch.device:
    """timm's ``init_distributed_device`` (sets ``args.device``, ``rank``, ``world_size``, ``local_rank``,
    ``distributed``), its process group restart-safe under torchrun."""
    result = init_distributed_device_so(device=getattr(args, 'device', 'cuda'),
                                        dist_backend=getattr(args, 'dist_backend', None),
                                        dist_url=elastic_init_method())
    args.device, args.world_size, args.rank = result['device'], result['world_size'], result['global_rank']
    args.local_rank, args.distributed = result['local_rank'], result['distributed']
    return torch.device(args.device)

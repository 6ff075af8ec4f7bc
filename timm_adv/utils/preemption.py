"""Preemption and exact mid-epoch resume for long runs on shared clusters.

A scheduler that reclaims a machine sends ``SIGTERM`` (cloud, Kubernetes, torchrun's agent) or a
chosen early signal (SLURM ``--signal=USR1@120``). :class:`PreemptionHandler` records the signal
instead of dying; the training loop finishes the update in flight, writes a recovery checkpoint with
:func:`save_recovery` (weights, optimiser, scaler, EMA, task state, and the position in the epoch with
every rank's random-number state) and raises :class:`Preempted`, which exits with ``128 + signal``:
the status a shell reports for a process the signal killed, and the range launchers retry.

``--resume auto`` (:func:`resolve_auto_resume`) picks the newest readable checkpoint of the experiment
(``last`` or ``recovery-*``); :class:`ResumableBatches` replays the epoch's data order up to the saved
position (loading only, no training) and restores the random state, so the run continues at the next
batch exactly as if it had not stopped.

Example:
    >>> with PreemptionHandler() as preemption:
    ...     batches = ResumableBatches(loader, position)
    ...     for batch_idx, (x, y) in batches:
    ...         step(x, y)
    ...         if preemption.requested():
    ...             save_recovery(saver, epoch, batches, distributed=False)
    ...             raise Preempted(preemption.requested())
"""
import glob
import logging
import os
import signal
import threading
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
from timm.utils.checkpoint_saver import load_checkpoint_metadata

from .rng import ReplayCheckpointSaver, get_rng_state, set_rng_state

__all__ = ['PREEMPT_SIGNALS', 'Preempted', 'PreemptionHandler', 'CheckpointWriteError', 'RecoverySaver',
           'ResumableBatches', 'start_epoch_rng', 'save_recovery', 'checkpoint_position', 'find_resume_checkpoint',
           'resolve_auto_resume']

_logger = logging.getLogger(__name__)

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(SystemExit):
    """Ends the run after its recovery checkpoint; the exit status is ``128 + signum`` (retryable)."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum


class PreemptionHandler:
    """Context manager that turns ``signals`` into a request to stop after the current update.

    Under ``torch.distributed`` :meth:`requested` agrees across ranks (one ``MAX`` all-reduce), so every
    rank stops after the same update even when only one of them was signalled.

    Args:
        distributed: Whether a process group is initialised.
        device: Device for the all-reduce (the ``nccl`` backend needs a CUDA tensor).
        signals: Signals to catch.
    """

    def __init__(self, distributed: bool = False, device: Optional[torch.device] = None,
                 signals: Iterable[int] = PREEMPT_SIGNALS):
        self.distributed = distributed
        self.device = device or torch.device('cpu')
        self.signals = tuple(signals)
        self.signum = 0
        self._previous = {}

    def __enter__(self) -> 'PreemptionHandler':
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def _record(self, signum: int, frame) -> None:
        if not self.signum:
            _logger.warning(f'Received {signal.Signals(signum).name}: finishing this update, then writing a '
                            f'recovery checkpoint and exiting with status {128 + signum}.')
        self.signum = signum

    def requested(self) -> int:
        """The signal to stop on (0: keep training), the same on every rank."""
        if not self.distributed:
            return self.signum
        flag = torch.tensor([self.signum], dtype=torch.int64, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, folder gone read-only); the previous ones are intact."""


class RecoverySaver(ReplayCheckpointSaver):
    """timm's ``CheckpointSaver`` (with every rank's random state at epoch ends) whose recovery checkpoints also hold the position in the epoch, and whose
    failed writes leave no partial file and raise :class:`CheckpointWriteError` (one line, naming the folder).

    The position travels in the saver's bookkeeping (``checkpoint['saver']['position']``), which timm
    reads back with ``load_state_dict`` and ignores where it does not know the key. So does the epoch's
    validation record (:attr:`validation`: figures and protocol, ``checkpoint['saver']['validation']``),
    which the model card reads.
    """

    position: Optional[Dict[str, Any]] = None
    validation: Optional[Dict[str, Any]] = None

    def _save(self, save_path, epoch, metric=None):
        # timm writes a temporary file and renames it over ``last``: on failure only the temporary is partial
        try:
            super()._save(save_path, epoch, metric)
        except OSError as e:
            if os.path.exists(save_path):
                os.remove(save_path)
            raise CheckpointWriteError(
                e.errno, f'cannot write a checkpoint in {os.path.dirname(os.path.abspath(save_path))!r} '
                         f'({e.strerror or e}); the previous checkpoints there are intact. Free space (or fix the '
                         f'folder), then continue with --resume auto') from None

    def state_dict(self, epoch=None, metric=None):
        state = super().state_dict(epoch, metric)
        if self.position is not None:
            state['position'] = self.position
        if self.validation is not None:
            state['validation'] = self.validation
        return state

    def save_checkpoint(self, epoch, metric=None):
        result = super().save_checkpoint(epoch, metric)
        # ``last`` now holds the end of ``epoch``: recovery files of it or earlier epochs (also those left by the
        # run before a restart) can never be the newest state again
        for path in glob.glob(os.path.join(self.recovery_dir, f'{self.recovery_prefix}-*{self.extension}')):
            parts = os.path.basename(path).split('-')
            if len(parts) == 3 and parts[1].isdigit() and int(parts[1]) <= epoch:
                os.remove(path)
        return result

    def save_recovery(self, epoch: int, batch_idx: int = 0, position: Optional[Dict[str, Any]] = None) -> None:
        self.position = position
        try:
            super().save_recovery(epoch, batch_idx)
        finally:
            self.position = None


def save_recovery(saver: Optional[RecoverySaver], epoch: int, batches: 'ResumableBatches', distributed: bool,
                  accum_steps: int = 1) -> None:
    """Writes a recovery checkpoint after the batches of ``epoch`` that ``batches`` yielded (call on every rank).

    Every rank's random states (now, and before its last fetch) are gathered to the primary, which writes
    through ``saver`` (atomically: timm writes a temporary file and renames it); the others wait until the
    file is complete.
    """
    batches_done = batches.done
    states: List[Dict[str, Any]] = [{'start': batches.start_rng_state, 'fetch': batches.fetch_rng_state,
                                     'now': get_rng_state()}]
    if distributed:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, states[0])
        states = gathered
    if saver is not None:
        position = {'epoch': epoch, 'batches': batches_done, 'rng': states}
        saver.save_recovery(epoch, batch_idx=(batches_done - 1) // accum_steps, position=position)
        _logger.info(f'Recovery checkpoint: epoch {epoch}, {batches_done} batches done ({saver.curr_recovery_file}).')
    if distributed:
        dist.barrier()


def checkpoint_position(checkpoint: Any) -> Optional[Dict[str, Any]]:
    """The mid-epoch position saved by :func:`save_recovery`, or None for an end-of-epoch checkpoint."""
    saver_state = checkpoint.get('saver') if isinstance(checkpoint, dict) else None
    return saver_state.get('position') if isinstance(saver_state, dict) else None


def _progress(path: str) -> Optional[Tuple[int, int, int]]:
    # (epoch, batches done, prefer last on a tie) of a readable checkpoint; None for a corrupt one
    try:
        checkpoint = load_checkpoint_metadata(path)
    except Exception as e:  # truncated by a kill during a copy, a foreign pickle refused by weights_only...
        _logger.warning(f'--resume auto: skipping {path} ({type(e).__name__}: {str(e).splitlines()[0][:120]}).')
        return None
    if not isinstance(checkpoint, dict) or 'epoch' not in checkpoint:
        return None
    position = checkpoint_position(checkpoint)
    if position is not None:
        return position['epoch'], position['batches'], 0
    if os.path.basename(path).startswith('recovery'):
        return None  # a recovery file without a position cannot be continued exactly
    return checkpoint['epoch'] + 1, 0, 1


def find_resume_checkpoint(output_dir: str) -> str:
    """The checkpoint of ``output_dir`` furthest into training (``last`` or ``recovery-*``), or ``''``.

    Unreadable files are skipped with a warning, so a checkpoint cut short by a kill is never resumed.

    Example:
        >>> find_resume_checkpoint('output/train/run1')
        'output/train/run1/recovery-3-117.pth.tar'
    """
    candidates = [os.path.join(output_dir, 'last.pth.tar')]
    candidates += sorted(glob.glob(os.path.join(output_dir, 'recovery-*.pth.tar')))
    best, best_progress = '', None
    for path in candidates:
        progress = _progress(path) if os.path.isfile(path) else None
        if progress is not None and (best_progress is None or progress > best_progress):
            best, best_progress = path, progress
    return best


def resolve_auto_resume(resume: str, output: str, experiment: str) -> str:
    """``--resume auto``: the newest valid checkpoint of ``<output>/<experiment>``, ``''`` for a fresh start.

    Any other value of ``--resume`` is returned unchanged.

    Raises:
        ValueError: ``--resume auto`` without ``--experiment`` (a timestamped folder cannot be found again).
    """
    if resume != 'auto':
        return resume
    if not experiment:
        raise ValueError('--resume auto finds the run by its folder: add --experiment NAME (and the same --output '
                         'on every restart).')
    output_dir = os.path.join(output or './output/train', experiment)
    path = find_resume_checkpoint(output_dir) if os.path.isdir(output_dir) else ''
    _logger.info(f'--resume auto: {"continuing from " + path if path else "no checkpoint in " + output_dir + ", starting"}.')
    return path


def start_epoch_rng(position: Optional[Dict[str, Any]], rank: int = 0) -> Dict[str, Any]:
    """Call at the top of an epoch: restores the stopped run's random state at the start of the epoch a
    recovery ``position`` lies in (when it has one for ``rank``); returns the state the epoch starts from."""
    states = position['rng'] if position else []
    if rank < len(states) and states[rank].get('start') is not None:
        set_rng_state(states[rank]['start'])
    return get_rng_state()


class ResumableBatches:
    """``enumerate(loader)`` that continues after a recovery ``position`` exactly as the stopped run went on.

    The batches before the position are loaded again and dropped (no training), so data order and worker
    random streams are where the stopped run had them. The last of them is fetched under the random state
    the stopped run fetched it with (a prefetching loader transforms the *next* batch during that fetch,
    in this process when it has no workers), then the state at the position is restored. For this, the
    random state before each fetch is kept in :attr:`fetch_rng_state`. The reload costs the data-loading
    time of the skipped part. The epoch itself must start from the stopped run's random state at its
    start (:func:`start_epoch_rng`), so that the loader shuffles and seeds its workers as it did.

    Example:
        >>> position = checkpoint_position(ckpt)
        >>> batches = ResumableBatches(loader, position, rank, start_epoch_rng(position, rank))
        >>> for batch_idx, (x, y) in batches:
        ...     step(x, y)
        ...     save_recovery(saver, epoch, batches, distributed=False)
    """

    def __init__(self, loader: Iterable, position: Optional[Dict[str, Any]] = None, rank: int = 0,
                 start_rng_state: Optional[Dict[str, Any]] = None):
        self.loader, self.position, self.rank = loader, position, rank
        self.start_rng_state = start_rng_state  # from :func:`start_epoch_rng`, saved with every recovery
        self.done = 0  # batches yielded so far in the epoch, the skipped ones included
        self.fetch_rng_state: Optional[Dict[str, Any]] = None

    def _saved_state(self) -> Optional[Dict[str, Any]]:
        states = self.position['rng']
        if self.rank < len(states):
            return states[self.rank]
        # more ranks than the stopped run: the data order still holds, the random draws do not
        _logger.warning(f'Recovery checkpoint has random states for {len(states)} ranks; rank {self.rank} keeps its '
                        f'epoch seed (the resumed run is close to, not bitwise equal to, an uninterrupted one).')
        return None

    def __iter__(self) -> Iterator[Tuple[int, Any]]:
        iterator = iter(self.loader)
        self.done = self.position['batches'] if self.position else 0
        if self.done:
            saved = self._saved_state()
            for _ in zip(range(self.done - 1), iterator):  # range first: stops without drawing one batch too many
                pass
            if saved is not None:
                set_rng_state(saved['fetch'])
            next(iterator, None)
            if saved is not None:
                set_rng_state(saved['now'])
        while True:
            self.fetch_rng_state = get_rng_state()
            batch = next(iterator, None)
            if batch is None:
                return
            self.done += 1
            yield self.done - 1, batch

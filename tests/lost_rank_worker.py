"""Run under ``torchrun --max-restarts 1`` by tests/test_preemption.py: train.py, except that on the first
attempt rank 1 dies (SIGKILL, no chance to save) when its loader yields batch KILL_AT of the first epoch.

    torchrun --nproc_per_node 2 --max-restarts 1 tests/lost_rank_worker.py KILL_AT TRAIN_ARGS...
"""
import os
import signal
import sys

from timm_adv.cli import train


def main():
    kill_at = int(sys.argv[1])
    if os.environ.get('TORCHELASTIC_RESTART_COUNT', '0') == '0' and os.environ.get('RANK') == '1':
        class DyingBatches(train.ResumableBatches):
            def __iter__(self):
                for batch_idx, batch in super().__iter__():
                    if batch_idx == kill_at:
                        os.kill(os.getpid(), signal.SIGKILL)
                    yield batch_idx, batch

        train.ResumableBatches = DyingBatches
    train.main(sys.argv[2:])


if __name__ == '__main__':
    main()

"""Run under ``torchrun --max-restarts 1`` by tests/test_preemption.py: train.py twice, on the first attempt only
an uninterrupted reference (experiment ``whole``), then experiment ``lost``, in which rank 1 of the first attempt
dies (SIGKILL, no chance to save) when its loader yields batch KILL_AT of the first epoch.

    torchrun --nproc_per_node 2 --max-restarts 1 tests/lost_rank_worker.py KILL_AT TRAIN_ARGS...
"""
import os
import signal
import sys

import train


def main():
    kill_at, argv = int(sys.argv[1]), sys.argv[2:]
    if os.environ['TORCHELASTIC_RESTART_COUNT'] == '0':
        train.main([*argv, '--experiment', 'whole'])  # one launch for both runs: a worker start is most of the cost
        if os.environ['RANK'] == '1':
            class DyingBatches(train.ResumableBatches):
                def __iter__(self):
                    for batch_idx, batch in super().__iter__():
                        if batch_idx == kill_at:
                            os.kill(os.getpid(), signal.SIGKILL)
                        yield batch_idx, batch

            train.ResumableBatches = DyingBatches
    train.main([*argv, '--experiment', 'lost'])


if __name__ == '__main__':
    main()

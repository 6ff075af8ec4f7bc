"""Run under ``torchrun --max-restarts 1`` by tests/test_preemption.py: train.py twice, on the first attempt only
an uninterrupted reference (experiment ``whole``), then experiment ``lost``, in which rank 1 of the first attempt
dies (SIGKILL, no chance to save) when its loader yields batch KILL_AT of the first epoch. In the restarted
group rank 0 starts training last, so rank 1 meets the keys the first attempt left in torchrun's store (rank 0's
old address among them) before rank 0 has replaced them.

    torchrun --nproc_per_node 2 --max-restarts 1 tests/lost_rank_worker.py KILL_AT TRAIN_ARGS...
"""
import os
import signal
import sys
import time

from timm_adv.cli import train


def main():
    kill_at, argv = int(sys.argv[1]), sys.argv[2:]
    rank, restarted = os.environ['RANK'], os.environ['TORCHELASTIC_RESTART_COUNT'] != '0'
    rank1_back = os.path.join(argv[argv.index('--output') + 1], 'rank1-restarted')
    if not restarted:
        train.main([*argv, '--experiment', 'whole'])  # one launch for both runs: a worker start is most of the cost
        if rank == '1':
            class DyingBatches(train.ResumableBatches):
                def __iter__(self):
                    for batch_idx, batch in super().__iter__():
                        if batch_idx == kill_at:
                            os.kill(os.getpid(), signal.SIGKILL)
                        yield batch_idx, batch

            train.ResumableBatches = DyingBatches
    elif rank == '1':
        open(rank1_back, 'w').close()
    else:
        while not os.path.exists(rank1_back):
            time.sleep(0.1)
        time.sleep(1)
    train.main([*argv, '--experiment', 'lost'])


if __name__ == '__main__':
    main()

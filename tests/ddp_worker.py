"""Run under torchrun by tests/test_ddp_methods.py: trains with train.py's setup, saves this rank's state.

    torchrun --nproc_per_node 2 tests/ddp_worker.py OUT_FILE_PREFIX TRAIN_ARGS...

After the epochs, this rank's model (with any auxiliary BNs), method state (FGSM-SDI's generator,
DAT's VQGAN) and feature bank (``contrastive`` / ``ssat``: embedded sharded across the ranks) are saved
to ``<OUT_FILE_PREFIX>-rank<R>.pt`` so the test can check that the processes agree.
"""
import sys

import torch

from timm_adv.cli import train


def main():
    prefix = sys.argv[1]
    args, _ = train.parse_args(sys.argv[2:])
    state = train.setup(args)
    train.train(args, state)
    task = state.task
    snapshot = {'model': task.unwrapped_model.state_dict()}
    if hasattr(task, 'generator'):
        snapshot['generator'] = task.generator.state_dict()
    if hasattr(task, 'feature_bank'):  # a collective call: every rank embeds its shard
        bank = task.feature_bank()
        snapshot.update(bank_features=bank.features, bank_labels=bank.labels)
    if hasattr(getattr(task, 'augment', None), 'vqgan'):  # DAT's discretiser (contrastive's views have none)
        snapshot['vqgan'] = task.augment.vqgan.state_dict()
    torch.save(snapshot, f'{prefix}-rank{args.rank}.pt')
    torch.distributed.destroy_process_group()


if __name__ == '__main__':
    main()

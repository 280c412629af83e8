"""A method for the shutdown tests: reports each step on stderr and, with RLFT_TEST_STALL_AT=N, rank 1 stops taking
part at step N (it sleeps), so rank 0 waits in a collective nobody else enters."""

import os
import sys
import time

from rlft.methods import SFT


class StallingSFT(SFT):
    def training_step(self, batch, batch_idx):
        rank, step = self.trainer.global_rank, self.global_step
        print(f"rank {rank} pid {os.getpid()} step {step}", file=sys.stderr, flush=True)
        if rank == 1 and str(step) == os.environ.get("RLFT_TEST_STALL_AT"):
            time.sleep(3600)
        return super().training_step(batch, batch_idx)

"""Worker of ``test_low_level``'s kill -9 test: low-level updates, ``save_state`` after each, until killed.

    python -m tests.support.save_state_worker BACKEND MODEL_DIR OUTPUT_DIR STATE_DIR LAST

Prints ``saving N`` before writing the state after update ``N`` and ``saved N`` once it is complete; after saving
update ``LAST`` it waits to be killed (so a kill aimed at that save never finds a later one, however fast the
machine).
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(backend: str, model_dir: str, output_dir: str, state_dir: str, last: str) -> None:
    from tests.test_low_level import low_level_update, make_state_trainer

    trainer = make_state_trainer(model_dir, output_dir, backend)
    for update in range(int(last)):
        low_level_update(trainer, update)
        print(f"saving {update + 1}", flush=True)
        trainer.save_state(state_dir)
        print(f"saved {update + 1}", flush=True)
    time.sleep(600)  # killed here at the latest


if __name__ == "__main__":
    main(*sys.argv[1:6])

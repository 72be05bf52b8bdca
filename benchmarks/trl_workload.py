"""Run the iterative workload through TRL 0.23.1's IterativeSFTTrainer (in an interpreter that has it).

Usage: python trl_workload.py MODEL_DIR WORKLOAD_JSON BATCH — prints one JSON line of results.
Called by step_throughput.py with --trl-python; TRL needs transformers 4.57, so it lives in its own venv.
"""

import json
import os
import sys
import tempfile
import time

import torch
from transformers import PreTrainedTokenizerFast
from trl import IterativeSFTConfig, IterativeSFTTrainer


def main():
    model_dir, data, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
    with open(data) as f:
        workload = json.load(f)
    # max_steps set so TRL's linear schedule does not sit at LR 0 (its default-config bug); bf16 off and
    # use_cpu so its config constructs on a CPU-only machine.
    args = IterativeSFTConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch, bf16=False,
                              use_cpu=True, max_steps=10_000, gradient_checkpointing=False, learning_rate=1e-4,
                              report_to="none", logging_steps=10**6)
    # The directory's tokenizer_config.json is transformers 5's; 4.57 reads the tokenizer.json file directly.
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=os.path.join(model_dir, "tokenizer.json"), bos_token="<s>",
                                        eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    trainer = IterativeSFTTrainer(model_dir, args=args, processing_class=tokenizer)
    real, seconds = 0, 0.0
    for ids in workload:
        tensors = [torch.tensor(x) for x in ids]
        masks = [torch.ones(len(x), dtype=torch.long) for x in ids]
        t0 = time.perf_counter()
        trainer.step(input_ids=tensors, attention_mask=masks, labels=tensors)  # TRL raises without labels (g)
        seconds += time.perf_counter() - t0
        real += sum(len(x) for x in ids)
    print(json.dumps({"seconds": seconds, "tokens_per_s": real / seconds, "real_tokens": real,
                      "padded_tokens": 0, "first_loss": None, "last_loss": None}))


if __name__ == "__main__":
    main()

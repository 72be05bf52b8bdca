"""What atomic, verified checkpoints cost: save and resume time, and the share spent hashing.

A ~30M-parameter random Llama (hidden 512, 8 layers, MLP 1408, vocab 8192; fp32 params + AdamW moments:
~370 MB of train state, plus the ~120 MB Hugging Face copy), one update, then ``--repeats`` saves and
resumes. Reported (medians): the whole ``save_checkpoint``, the hashing + fsync pass inside it (timed
alone on the just-written checkpoint, page cache warm), the resume's verification (``verify_checkpoint``)
alone, the load without verification (``load_checkpoint(verify=False)``) and the default load, which
verifies first, as a ratio to the unverified one. The
verification reads the files cold when the page cache has dropped them; here they are warm (just saved),
the best case for the load that follows as well.

    python benchmarks/checkpoint_cost.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_trainer(output_dir: str):
    import torch
    from common import offline

    make_tokenizer = offline().make_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    from itersft_jax import IterativeSFTConfig
    from itersft_jax.trainer import IterativeSFTTrainer

    config = LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    args = IterativeSFTConfig(output_dir=output_dir, per_device_train_batch_size=2, gradient_checkpointing=False,
                              report_to="none", disable_tqdm=True)
    trainer = IterativeSFTTrainer(LlamaForCausalLM(config).float(), args=args, processing_class=make_tokenizer())
    trainer.step(input_ids=[[1, 5, 6, 7, 8, 9], [1, 10, 11, 12]])  # Adam moments exist and are non-zero
    return trainer


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from itersft_jax.io import checkpoint
    workdir = tempfile.mkdtemp(prefix="checkpoint_cost-")
    trainer = build_trainer(workdir)
    path = os.path.join(workdir, "checkpoint-1")
    save, hashing, verify, load, resume = [], [], [], [], []
    for _ in range(args.repeats):
        shutil.rmtree(path, ignore_errors=True)
        save.append(timed(lambda: trainer.save_checkpoint(path)))
        hashing.append(timed(lambda: checkpoint.hash_tree(path, skip=set(), fsync=True)))
        verify.append(timed(lambda: checkpoint.verify_checkpoint(path)))
        load.append(timed(lambda: checkpoint.load_checkpoint(path, trainer.train_state, verify=False)))
        resume.append(timed(lambda: checkpoint.load_checkpoint(path, trainer.train_state)))
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)
    med = {name: statistics.median(v) for name, v in
           {"save": save, "hashing": hashing, "verify": verify, "load": load, "resume": resume}.items()}
    print(f"checkpoint: {size / 1e6:.0f} MB in {sum(len(f) for _, _, f in os.walk(path))} files; "
          f"{checkpoint.HASH_THREADS} hashing threads; medians of {args.repeats}")
    print(f"{'':<34} {'seconds':>8} {'ratio':>26}")
    print(f"{'save_checkpoint (all of it)':<34} {med['save']:>8.3f}")
    share = med["hashing"] / med["save"]
    print(f"{'  hashing + fsync inside it':<34} {med['hashing']:>8.3f} {share:>12.2f} of the save")
    print(f"{'verify_checkpoint alone':<34} {med['verify']:>8.3f}")
    print(f"{'load, unverified (verify=False)':<34} {med['load']:>8.3f}")
    ratio = med["resume"] / med["load"]
    print(f"{'load, verified (the default)':<34} {med['resume']:>8.3f} {ratio:>12.2f}x unverified")
    print(f"{'SHA-256 throughput (verify)':<34} {size / med['verify'] / 1e9:>8.2f} GB/s")
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()

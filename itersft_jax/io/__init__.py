"""Files on disk and on the Hub: HF weights, PEFT adapter files, checkpoints, hub pushes.
"""

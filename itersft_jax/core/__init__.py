"""The pure training step: train_step, the loss, the optimizer, packing, and which parameters train.
"""

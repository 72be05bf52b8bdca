"""The shared layer, no jax: the config, its fields, the data pipeline, the trainer shell both engines build on,
outputs and model sources -- the only part of itersft_jax that itersft_torch imports.
"""

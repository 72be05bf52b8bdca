"""Generation from the trainer's live parameters.
"""

"""Reversing a solve: the autograd Function, the reversal strategies, checkpoint placement
(schedule) and the checkpoint store with its tiers.
"""

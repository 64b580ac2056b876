"""Utilities for training scripts: training states saved and verified in HDF5 (state) and
stop signals agreed on by every rank (preemption).
"""

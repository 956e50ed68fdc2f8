"""Kernel backends: the hot operations of the deltas and of decode attention, one implementation per backend.

interface.py names the operations; registry.py picks the backend once per device type (torch_grouped on CPU,
triton on CUDA; torch_ref is the oracle). Method modules ask the registry and never branch on the device.
"""

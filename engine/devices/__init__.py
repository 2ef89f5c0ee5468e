"""Devices: which ones the engine's workers get (`pool`, torch-free), what a device is without
torch (`probe`), and torch's own view inside a worker (`runtime`: device, dtype, memory).
"""

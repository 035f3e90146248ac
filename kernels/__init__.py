"""Pure tensor maths for MFM: the frequency ops (torch on any device, Triton on CUDA). No I/O, no config."""

"""Triton kernels, one family per file: kernel, launcher, then the torch.library op."""

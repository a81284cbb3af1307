"""Triton kernels, installed as ``loraprune.kernels``: one module per op, each holding its
kernels, launcher and (where it has a backward) its ``torch.autograd.Function``."""

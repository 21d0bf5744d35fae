"""Triton kernels (attention, norms, rotary, SwiGLU, fused distillation loss), each beside a torch reference."""

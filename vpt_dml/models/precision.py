"""Frozen backbone weights kept in the autocast compute dtype.

Under autocast every matmul casts its fp32 weight to bf16/fp16. autocast caches that cast
only for leaf tensors that require grad, so a frozen weight is cast again at every use,
every step (and twice for a weight that serves two branches). Storing the frozen weights
in the compute dtype once removes those casts and halves their memory. Trainable
parameters (BitFit biases, prompts, heads) stay fp32: they are the optimizer's master
copies. The trade: the frozen weights are rounded to bf16 once, as autocast would round
them at every use anyway, and the model then needs autocast (an fp32 input cannot meet a
bf16 weight outside it).
"""

from __future__ import annotations

import torch
import torch.nn as nn


def cast_frozen_weights_(module: nn.Module, dtype: torch.dtype = torch.bfloat16) -> int:
    """Cast the frozen weights of Linear / Conv layers to `dtype` in place; returns their count.

    Norm weights, position embeddings and tokens stay fp32: autocast runs norms in fp32,
    and they are small.
    """
    count = 0
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)) and not m.weight.requires_grad:
            m.weight.data = m.weight.data.to(dtype)
            count += m.weight.numel()
    return count

"""Frozen weights multiplied in bf16, activations kept in fp32: LoRA's mixed precision on CPU.

On a CPU with bf16 units (avx512_bf16, amx_bf16) bf16 autocast multiplies the matmul throughput
(tuning.py measures whether this CPU is one, and picks fp32 where it is not), but it also runs the
elementwise work in bf16 (rotary embeddings, SiLU x up, their gradients). On SmolLM2 that cost
0.03 to 0.08 of final loss over the training set against fp32, in three seeds
(bench/bench_training.py); putting the LM head, the attention or the adapters back in fp32 did
not recover it. Here only the frozen base layers' matmuls run in bf16, forward and backward, with
fp32 accumulation and fp32 results; everything else stays fp32. Same speed as autocast within the
noise, and the fp32 loss.
"""
import torch
import torch.nn.functional as F


class _FrozenLinearBf16(torch.autograd.Function):
    """y = x W^T + b with W frozen: the weight gets no gradient, the input's is computed in bf16."""

    @staticmethod
    def forward(ctx, x, weight16, bias):
        ctx.save_for_backward(weight16)
        out = F.linear(x.to(torch.bfloat16), weight16).to(x.dtype)
        return out if bias is None else out + bias

    @staticmethod
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return None, None, None
        weight16, = ctx.saved_tensors
        return (grad.to(torch.bfloat16) @ weight16).to(grad.dtype), None, None


def use_bf16_matmuls(model, switch=None):
    """Route every frozen base layer under a LoRA adapter through _FrozenLinearBf16 while
    `switch['bf16']` is true (the tuning controller flips it between steps; without a switch,
    always), plain fp32 F.linear otherwise. Keeps the fp32 weights (saving, merging) and, from the
    first bf16 step on, one bf16 copy. Returns how many layers were routed."""
    switch = switch if switch is not None else {'bf16': True}
    routed = 0
    for module in model.modules():
        base = getattr(module, 'base_layer', None)
        if not isinstance(base, torch.nn.Linear) or base.weight.requires_grad:
            continue

        def forward(x, _base=base, _copy={}):
            if not switch['bf16']:
                return F.linear(x, _base.weight, _base.bias)
            if 'weight16' not in _copy:  # made on first use: a CPU that never picks bf16 never pays for it
                _copy['weight16'] = _base.weight.detach().to(torch.bfloat16)
            return _FrozenLinearBf16.apply(x, _copy['weight16'], _base.bias)
        base.forward = forward
        routed += 1
    return routed

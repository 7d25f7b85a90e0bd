"""Attention for packed rows, one example at a time.

A packed row lays the batch's examples end to end. transformers' sdpa attends over the whole row
with a block-diagonal mask, so with four examples it computes four times the attention it needs
(about a fifth of a training step on SmolLM2). Here the row is cut where position_ids restart
at 0 and each example attends to itself only, causally, with no mask: about 1.15x the step
throughput, the same loss. Registered under NAME; anything else (a padded batch) goes to sdpa.
"""
import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

NAME = 'packed_sdpa'


def packed_sdpa_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                          position_ids=None, **kwargs):
    """query [1, heads, seq, dim], key/value [1, kv_heads, seq, dim] -> [1, seq, heads, dim]."""
    if attention_mask is not None or position_ids is None or query.shape[0] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, **kwargs)
    starts = (position_ids[0] == 0).nonzero().flatten().tolist()
    bounds = ([] if starts and starts[0] == 0 else [0]) + starts + [query.shape[2]]
    outputs = [F.scaled_dot_product_attention(
        query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], is_causal=True,
        dropout_p=dropout, scale=scaling, enable_gqa=query.shape[1] != key.shape[1])
        for start, end in zip(bounds, bounds[1:])]
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def packed_sdpa_mask(*args, **kwargs):
    """No mask for an unpadded (packed) row: the attention cuts it by position_ids; sdpa's mask
    for a padded batch."""
    return None if kwargs.get('attention_mask') is None else sdpa_mask(*args, **kwargs)


AttentionInterface.register(NAME, packed_sdpa_attention)
AttentionMaskInterface.register(NAME, packed_sdpa_mask)

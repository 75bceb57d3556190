"""The log-sum-exp of every attention row, from the kernel the model runs anyway.

On CPU, ``torch.nn.functional.scaled_dot_product_attention`` dispatches float inputs to the flash
kernel ``aten._scaled_dot_product_flash_attention_for_cpu``, which returns each row's log-sum-exp
next to the output and then drops it. :class:`KeepLSE` calls that kernel directly and keeps it, so
the scores need only the target logits (``scores_from_qk(..., lse=...)``). Imported only when a
model is scanned (it needs torch).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch.overrides import TorchFunctionMode


class KeepLSE(TorchFunctionMode):
    """Inside it, ``torch.nn.functional.scaled_dot_product_attention`` runs as the CPU flash
    kernel that it dispatches to anyway (``aten._scaled_dot_product_flash_attention_for_cpu``),
    which also returns each row's log-sum-exp; that is kept in ``lse`` ([batch, heads, n],
    float32). The output is the very tensor sdpa returns (bit for bit, checked by the tests over
    every family, dtype and mask); a call the flash kernel cannot take (an accelerator, dropout,
    mixed dtypes, more than one call) runs as sdpa itself and leaves ``lse`` None."""

    def __init__(self) -> None:
        super().__init__()
        self.lse: Any = None
        self.calls = 0

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Optional[dict[str, Any]] = None) -> Any:
        kwargs = kwargs or {}
        if func is not torch.nn.functional.scaled_dot_product_attention:
            return func(*args, **kwargs)
        self.calls += 1
        flash = _flash_arguments(*args, **kwargs)
        if flash is None or self.calls > 1:
            self.lse = None
            return func(*args, **kwargs)
        output, self.lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(*flash[0], **flash[1])
        return output


def _flash_arguments(
    query: Any, key: Any, value: Any, attn_mask: Any = None, dropout_p: float = 0.0, is_causal: bool = False,
    scale: Optional[float] = None, enable_gqa: bool = False,
) -> Optional[tuple[tuple[Any, ...], dict[str, Any]]]:
    """sdpa's arguments as the CPU flash kernel takes them, or None where it does not apply.

    Grouped-query keys are repeated (as sdpa's enable_gqa does, same results); a bool mask
    becomes the additive float mask of the query's dtype (what sdpa converts it to)."""
    if dropout_p or query.device.type != "cpu" or query.dim() != 4:
        return None
    if not (query.dtype == key.dtype == value.dtype) or query.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        return None
    if key.shape[1] != query.shape[1]:
        if not enable_gqa or query.shape[1] % key.shape[1]:
            return None
        repeat = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device).masked_fill_(~attn_mask, float("-inf"))
        elif attn_mask.dtype != query.dtype:
            return None
    return (query, key, value, 0.0, bool(is_causal)), {"attn_mask": attn_mask, "scale": scale}

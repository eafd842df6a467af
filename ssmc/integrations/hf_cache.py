"""One mixer layer's view of a Hugging Face `transformers` generation cache.

A patched mixer needs four things from the cache: the previous conv window and SSM state (or
None before the first forward), and a way to store the new ones. Releases of `transformers`
keep them in three shapes, told apart by what the cache object has (never by version
number, so a release between the ones read stays covered when its shape is one of these):

- `Mamba2Cache` / `MambaCache` (4.x, 5.0): tensors `conv_states[i]`, `ssm_states[i]`; a
  forward continues from the cache when `cache_position[0] > 0` (see `_continuing`).
- `Cache` with linear-attention layers, one state per layer (about 5.1 to 5.12):
  `has_previous_state(i)`, `layers[i].conv_states`; `update_conv_state` takes the whole
  window of the last `conv_kernel` inputs.
- The same with several states per layer (5.13 on): `layers[i].conv_states[0]` (or
  `get_conv_state(i)`); `update_conv_state` takes the new inputs and rolls the window itself,
  which also keeps the cache's token count.

States keep the cache's layout: conv windows (b, channels, conv_kernel), SSM states Mamba-2
(b, h, p, n) and Mamba (b, d, n), so a model can be patched or unpatched between two
generation steps. Writes copy into the cache's own tensors (their dtype and, for CUDA graphs,
their address stay).
"""
from __future__ import annotations

import sys
from typing import Optional

import torch

from ..errors import UnsupportedError


class LayerCache:
    """The states of layer `layer_idx` in `cache`; `conv` and `ssm` are None before the first
    write (prefill starts from zeros)."""

    def __init__(self, cache, layer_idx: int, conv, ssm):
        self.cache, self.layer_idx = cache, layer_idx
        self.conv: Optional[torch.Tensor] = conv
        self.ssm: Optional[torch.Tensor] = ssm

    def write(self, new_inputs: torch.Tensor, window: torch.Tensor, ssm: torch.Tensor) -> None:
        """Store the conv state (`new_inputs` (b, c, t) are this call's conv inputs, `window`
        (b, c, conv_kernel) the last conv_kernel of all inputs so far) and the SSM state."""
        raise NotImplementedError


class _Legacy(LayerCache):
    def write(self, new_inputs, window, ssm):
        i = self.layer_idx
        self.cache.conv_states[i].copy_(window)
        self.cache.ssm_states[i].copy_(ssm)


class _WindowLayers(LayerCache):
    def write(self, new_inputs, window, ssm):
        self.cache.update_conv_state(window, layer_idx=self.layer_idx)
        self.cache.update_recurrent_state(ssm, layer_idx=self.layer_idx)


class _TokenLayers(LayerCache):
    def write(self, new_inputs, window, ssm):
        self.cache.update_conv_state(new_inputs, self.layer_idx,
                                     conv_kernel_size=window.shape[-1])
        self.cache.update_recurrent_state(ssm, self.layer_idx)


def layer_cache(cache, layer_idx: int, cache_position=None) -> Optional[LayerCache]:
    """The view of `cache` for one layer, or None without a cache."""
    if cache is None:
        return None
    if hasattr(cache, "ssm_states") and hasattr(cache, "conv_states"):
        if not _continuing(cache_position):
            return _Legacy(cache, layer_idx, None, None)
        return _Legacy(cache, layer_idx, cache.conv_states[layer_idx],
                       cache.ssm_states[layer_idx])
    layers = getattr(cache, "layers", None)
    if layers is None or not hasattr(cache, "update_recurrent_state"):
        raise UnsupportedError(_unknown(cache))
    layer = layers[layer_idx]
    if _keeps_history(cache, layer, layer_idx):
        raise UnsupportedError(
            f"ssmc.integrations.transformers: the {type(cache).__name__} records the states "
            f"of layer {layer_idx} after each new token (assisted or speculative decoding); the "
            "patched mixers do not produce them. Generate without an assistant model, or "
            "unpatch the model first")
    per_state = isinstance(getattr(layer, "conv_states", None), dict)
    kind = _TokenLayers if per_state else _WindowLayers
    if hasattr(cache, "get_conv_state"):
        conv = cache.get_conv_state(layer_idx)
        ssm = cache.get_recurrent_state(layer_idx) if conv is not None else None
        return kind(cache, layer_idx, conv, ssm)
    if not cache.has_previous_state(layer_idx):
        return kind(cache, layer_idx, None, None)
    conv, ssm = layer.conv_states, layer.recurrent_states
    if per_state:
        conv, ssm = conv[0], ssm[0]
    return kind(cache, layer_idx, conv, ssm)


def _continuing(cache_position) -> bool:
    """Whether a forward with a Mamba2Cache / MambaCache continues from it. Under
    torch.compile the test must not read the tensor (a data-dependent branch): there a decode
    step is the call with one position (`generate` gives a prefill conv_kernel of them)."""
    if cache_position is None:
        return False
    if torch.compiler.is_compiling():
        return cache_position.shape[0] == 1
    return bool(cache_position[0] > 0)


def _keeps_history(cache, layer, layer_idx: int) -> bool:
    if not getattr(layer, "record_past", False):
        return False
    keep = getattr(cache, "get_recurrent_states_to_keep", None)
    count = keep(layer_idx) if keep is not None else getattr(layer, "recurrent_states_to_keep", 0)
    return bool(count)  # None (recording without a count) keeps none


def _unknown(cache) -> str:
    version = getattr(sys.modules.get("transformers"), "__version__", "unknown")
    return (f"ssmc.integrations.transformers: the cache {type(cache).__name__} (transformers "
            f"{version}) has neither 'conv_states'/'ssm_states' (Mamba2Cache, MambaCache) nor "
            "linear-attention layers with 'update_recurrent_state'; this layout is not supported")

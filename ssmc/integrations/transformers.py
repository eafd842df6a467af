"""Run a Hugging Face `transformers` Mamba2 or Mamba model's mixers on ssmc ops.

    from transformers import AutoModelForCausalLM
    from ssmc.integrations.transformers import patch, unpatch

    model = patch(AutoModelForCausalLM.from_pretrained("state-spaces/mamba2-130m"))
    out = model.generate(input_ids, max_new_tokens=20)      # prefill and decode on ssmc
    loss = model(input_ids, labels=input_ids).loss          # training: forward and backward
    compiled = torch.compile(model)                         # the ops trace as custom ops
    unpatch(model)                                          # back to transformers' mixers

`patch` changes the model in place (and returns it): every `Mamba2Mixer` and `MambaMixer`
becomes a subclass whose forward is `ssmc.integrations.hf_mixers`'s; parameters, the state
dict, `save_pretrained` and the generation cache are untouched, so a patched model saves,
loads and interleaves with an unpatched one. `transformers` itself is never imported here:
mixers are recognised by their class and module, so `import ssmc` does not need it.

Other models with Mamba-like mixers (FalconMamba, Bamba, Zamba, Jamba, NemotronH, ...) have
their own mixer classes and are refused by name.
"""
from __future__ import annotations

import importlib
import sys

from torch import nn

from ..errors import ArgumentError, ShapeError, UnsupportedError
from . import hf_mixers

__all__ = ["patch", "unpatch", "is_patched"]

_NAME = "ssmc.integrations.transformers"

# the transformers mixer classes, by module and name, and the kind of mixer each is
_SUPPORTED = {
    ("transformers.models.mamba2.modeling_mamba2", "Mamba2Mixer"): "mamba2",
    ("transformers.models.mamba.modeling_mamba", "MambaMixer"): "mamba",
}
_ATTRIBUTES = {
    "mamba2": ("in_proj", "conv1d", "act", "norm", "out_proj", "A_log", "D", "dt_bias",
               "num_heads", "head_dim", "n_groups", "ssm_state_size", "intermediate_size",
               "conv_dim", "time_step_limit", "layer_idx"),
    "mamba": ("in_proj", "conv1d", "act", "x_proj", "dt_proj", "out_proj", "A_log", "D",
              "ssm_state_size", "time_step_rank", "intermediate_size", "layer_idx"),
}
_FORWARD = {"mamba2": hf_mixers.mamba2_forward, "mamba": hf_mixers.mamba_forward}
_OP_KEY = {"mamba2": hf_mixers.mamba2_op_key, "mamba": hf_mixers.mamba_op_key}
_PATCHED: dict[type, type] = {}  # transformers mixer class -> its patched subclass


class _Patched:
    """Marks a patched mixer class; `_ssmc_base` is the transformers class it replaces."""

    _ssmc_base: type
    _ssmc_kind: str

    def forward(self, hidden_states, cache=None, attention_mask=None, **kwargs):
        return _FORWARD[self._ssmc_kind](self, hidden_states, cache, attention_mask, **kwargs)


def patch(model: nn.Module, *, backend: str = "auto", lowering: str = "auto") -> nn.Module:
    """Make every Mamba2/Mamba mixer of `model` run on ssmc, in place; returns `model`.

    `backend` (auto|triton|tvm|reference) and `lowering` (auto|scan|chunked|quadratic) choose
    the ssmc op as in `ssmc.compile`. Patching a patched model again changes them. Raises
    `UnsupportedError` when the model has no supported mixer or a mixer's configuration is
    one the patch cannot reproduce, before changing anything."""
    mixers = _mixers(model, "patch()")
    for path, mixer, kind in mixers:
        _check(path, mixer, kind)
    keys = [_OP_KEY[kind](mixer, backend, lowering) for _, mixer, kind in mixers]
    for key in set(keys):
        hf_mixers.op_for(key)  # built now, not on a first call that may be under torch.compile
    for (_, mixer, kind), key in zip(mixers, keys):
        mixer.__class__ = _patched_class(_base(mixer), kind)
        mixer._ssmc_op_key = key
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Give every patched mixer of `model` its transformers forward back; returns `model`.
    A model without patched mixers is returned as it is."""
    _require_module(model, "unpatch()")
    for module in model.modules():
        if isinstance(module, _Patched):
            module.__class__ = module._ssmc_base
            del module._ssmc_op_key
    return model


def is_patched(model: nn.Module) -> bool:
    """Whether any mixer of `model` runs on ssmc."""
    _require_module(model, "is_patched()")
    return any(isinstance(m, _Patched) for m in model.modules())


# ---------------------------------------------------------------------------- internals

def _require_module(model, fn: str) -> None:
    if not isinstance(model, nn.Module):
        raise ArgumentError(f"{_NAME}.{fn}: 'model' must be a torch.nn.Module (a transformers "
                            f"model), got {type(model).__name__}")


def _base(mixer) -> type:
    return mixer._ssmc_base if isinstance(mixer, _Patched) else type(mixer)


def _mixers(model, fn: str) -> list:
    """(path, module, kind) of each supported mixer; refuses a model with none."""
    _require_module(model, fn)
    found, others = [], []
    for path, module in model.named_modules():
        cls = _base(module)
        kind = _SUPPORTED.get((cls.__module__, cls.__name__))
        if kind is not None:
            found.append((path, module, kind))
        elif cls.__name__.endswith("Mixer") and cls.__module__.startswith("transformers."):
            others.append(cls.__name__)
    if not found:
        seen = (f"; its mixers are {', '.join(sorted(set(others)))}, which have their own "
                "computation" if others else "")
        raise UnsupportedError(
            f"{_NAME}.{fn}: {type(model).__name__} has no transformers Mamba2Mixer or "
            f"MambaMixer (transformers {_version()}){seen}. Supported: Mamba2 "
            "(Mamba2Model, Mamba2ForCausalLM) and Mamba (MambaModel, MambaForCausalLM)")
    return found


def _check(path: str, mixer, kind: str) -> None:
    where = f"{_NAME}.patch(): {path} ({_base(mixer).__name__})"
    missing = [a for a in _ATTRIBUTES[kind] if not hasattr(mixer, a)]
    if missing:
        raise UnsupportedError(
            f"{where} has no {', '.join(repr(a) for a in missing)}; this transformers release "
            f"({_version()}) lays the mixer out differently from the ones supported (4.44 "
            "to 5.x)")
    if isinstance(mixer.conv1d.padding, str):
        raise UnsupportedError(f"{where}: conv1d has padding={mixer.conv1d.padding!r}; "
                               "expected a number of zeros (transformers: kernel_size - 1)")
    if kind == "mamba2":
        want = mixer.intermediate_size + mixer.conv_dim + mixer.num_heads
        if mixer.in_proj.out_features != want:
            raise UnsupportedError(
                f"{where}: in_proj has {mixer.in_proj.out_features} outputs; expected "
                f"{want} (gate + conv_dim + heads); a gated-MLP part (d_mlp > 0) is not "
                "supported")
        if mixer.num_heads * mixer.head_dim != mixer.intermediate_size:
            raise ShapeError(
                f"{where}: num_heads * head_dim = {mixer.num_heads} * {mixer.head_dim} != "
                f"intermediate_size {mixer.intermediate_size} (expand * hidden_size)")
        if mixer.num_heads % mixer.n_groups:
            raise ShapeError(f"{where}: num_heads={mixer.num_heads} is not a multiple of "
                             f"n_groups={mixer.n_groups}")
    else:
        if mixer.A_log.is_complex():
            raise UnsupportedError(f"{where}: complex A_log is not supported (real SSMs only)")
        want = mixer.time_step_rank + 2 * mixer.ssm_state_size
        if mixer.x_proj.out_features != want:
            raise UnsupportedError(f"{where}: x_proj has {mixer.x_proj.out_features} outputs; "
                                   f"expected time_step_rank + 2 * state_size = {want}")


def _patched_class(base: type, kind: str) -> type:
    cls = _PATCHED.get(base)
    if cls is None:
        name = f"SSMC{base.__name__}"
        cls = type(name, (_Patched, base), {"_ssmc_base": base, "_ssmc_kind": kind,
                                            "__module__": __name__})
        # reachable by name, so a pickled patched model (torch.save) loads again
        setattr(sys.modules[__name__], name, cls)
        _PATCHED[base] = cls
    return cls


def __getattr__(name: str) -> type:
    """The patched class `name` (SSMCMamba2Mixer, SSMCMambaMixer), made on first use: a
    pickled patched model (torch.save) loads in a process that has not patched yet."""
    for (module, base_name), kind in _SUPPORTED.items():
        if name == f"SSMC{base_name}":
            return _patched_class(getattr(importlib.import_module(module), base_name), kind)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _version() -> str:
    return getattr(sys.modules.get("transformers"), "__version__", "not imported")

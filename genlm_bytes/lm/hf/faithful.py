"""Which forward a pass may run, so that it computes exactly what the user's model computes.

Three ways to run a pass, fastest first:

- ``"lean"``: :class:`~genlm_bytes.lm.lean.LeanDecoder` on the model's live parameters, then
  the model's output layer;
- ``"decoder"``: transformers' decoder stack, then the output layer (a model the lean
  decoder does not compute, or ``lean=False``);
- ``"model"``: the model's own top-level forward, logits included: whenever the model is
  not *pristine*.

A model is pristine when no forward or forward-pre hook is registered on any of its modules
(the top model and the output layer included) nor globally (``torch.nn.modules.module``'s
global hooks), no module has an instance ``forward``, and every module's class has the
forward of the library it comes from (transformers or torch; a PEFT/LoRA layer, a user
subclass overriding ``forward`` are not).

:class:`ModelWatch` keeps a fingerprint of what these depend on (hook dict sizes, the identity
of every submodule and parameter, the parameters' version counters and data pointers, instance
``forward`` attributes) and compares it before every pass: a few C-level maps over flat lists
built once, no walk of the module tree. When it differs, the watch decides again (and the
backend drops its cached results: they were computed by the model before the change). Hooks
are also caught between passes by a constant-time key (torch's hook-handle counter and the
global hook dicts), which the backend checks before serving a cached row.

Not detected: in-place changes through ``param.data`` (``p.data.mul_(2)``): torch gives them no
version counter. The fast path reads the live parameters, so passes stay exact, but results
cached before such a change stay cached: call ``clear_cache()`` after one.
"""

from __future__ import annotations

import logging
import operator
from itertools import chain, repeat

import torch
from torch.nn.modules import module as _torch_module
from torch.utils.hooks import RemovableHandle

logger = logging.getLogger(__name__)

_LIBRARIES = ("transformers.", "torch.")  # modules whose classes' forward is the library's own
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks")
_version = operator.attrgetter("_version")


def _global_hook_dicts() -> list[dict]:
    return [getattr(_torch_module, name) for name in _GLOBAL_HOOKS if hasattr(_torch_module, name)]


def _library_forward(module: torch.nn.Module) -> bool:
    fwd = getattr(type(module), "forward", None)
    return getattr(fwd, "__module__", "").startswith(_LIBRARIES)


class ModelWatch:
    """The forward a pass of ``model`` may run (:attr:`mode`), checked cheaply before each pass.

    Args:
        model: the user's transformers causal LM.
        lean: try the lean decoder for a pristine model.
        make_lean: ``model -> LeanDecoder | None`` (checks that it computes the model's function).
    """

    def __init__(self, model, lean: bool, make_lean):
        self.model, self.want_lean, self.make_lean = model, lean, make_lean
        self.lean = None  # the LeanDecoder while mode == "lean"
        self.mode = "decoder"
        self.pristine = True
        self._globals = _global_hook_dicts()
        self._quick = self._full = self._rope_buffers = None
        self.refresh()

    # ------------------------------------------------------------------ fingerprints
    def quick_key(self) -> tuple:
        """Changes when a hook is registered anywhere (constant time)."""
        return (RemovableHandle.next_id, *map(len, self._globals))

    def _snapshot(self) -> None:
        """The flat lists the fingerprint reads (rebuilt when the model changed)."""
        mods = list(self.model.modules())
        self._mods = mods
        self._dicts = [m.__dict__ for m in mods]
        self._hooks = [m._forward_hooks for m in mods] + [m._forward_pre_hooks for m in mods]
        self._children = [m._modules for m in mods]
        self._param_dicts = [m._parameters for m in mods]
        self._params = [p for m in mods for p in m._parameters.values() if p is not None]

    def full_key(self) -> tuple:
        """What a pass's faithfulness depends on (see the module docstring). Objects are compared
        by ``id`` (a tensor's ``==`` is elementwise)."""
        values, flat, params = dict.values, chain.from_iterable, self._params
        rope = self._rope_buffers
        return (tuple(map(len, self._hooks)), tuple(map(len, self._globals)),
                any(map(operator.contains, self._dicts, repeat("forward"))), tuple(map(type, self._mods)),
                tuple(map(len, self._children)), tuple(map(id, flat(map(values, self._children)))),
                tuple(map(len, self._param_dicts)), tuple(map(id, flat(map(values, self._param_dicts)))),
                tuple(map(_version, params)), tuple(map(torch.Tensor.data_ptr, params)),
                id(rope.get("inv_freq")) if rope is not None else None)

    def hooks_changed(self) -> bool:
        """Whether a hook was registered anywhere since the last :meth:`refresh` (constant time)."""
        return self.quick_key() != self._quick

    def stale(self) -> bool:
        """Whether the model changed since the last :meth:`refresh` (read only)."""
        return self.hooks_changed() or self.full_key() != self._full

    # ------------------------------------------------------------------ deciding
    def refresh(self) -> bool:
        """Check the model (before a pass, under the model's lock); decide the mode again if it
        changed. True when it changed since the last check (cached results are stale)."""
        if self._full is not None and self.full_key() == self._full:
            self._quick = self.quick_key()  # (a hook registered elsewhere: a tensor's, another model's)
            return False
        first = self._full is None
        self._snapshot()
        self._decide()
        self._quick, self._full = self.quick_key(), self.full_key()
        if not first:
            logger.debug("the model changed: passes run %r", self.mode)
        return not first

    def _decide(self) -> None:
        mods = self._mods
        hooked = any(self._hooks) or any(self._globals)
        overridden = [type(m).__name__ for m in mods if "forward" in m.__dict__ or not _library_forward(m)]
        self.pristine = not hooked and not overridden
        self.lean = self._rope_buffers = None
        if not self.pristine:
            self.mode = "model"
            why = "hooks" if hooked else f"forward of {overridden[0]}"
            logger.debug("passes run the model's own forward (%s)", why)
            return
        if self.want_lean:
            self.lean = self.make_lean(self.model)
        if self.lean is not None:  # (the lean decoder's rotary tables come from this buffer)
            self._rope_buffers = self.lean.body.rotary_emb._buffers
        self.mode = "lean" if self.lean is not None else "decoder"

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

:class:`ModelWatch` compares a fingerprint before every pass: torch's hook-handle counter (every
hook registration bumps it), a count of module and parameter registrations anywhere in the
process (torch's global registration hooks), instance ``forward`` attributes, module classes,
and the parameters' version counters and data pointers: C-level maps over flat lists built
once, no walk of the module tree. Only when it changed is the model itself compared (hook
dicts, the identity of every submodule and parameter); if that changed, the watch decides
again and the backend drops its cached results (computed by the model before the change).
Hooks registered (and, while the model has hooks, removed) are also seen before a cached row is
served (:meth:`ModelWatch.hooks_changed`: constant time on a pristine model); other changes are
seen by the next pass (a fresh request).

Not detected: in-place changes through ``param.data`` (``p.data.mul_(2)``: torch gives them no
version counter) and writes into a module's private dicts (``m._modules[k] = ...``). The fast
path reads the live parameters, but results and pasts cached before such a change stay cached:
call ``clear_cache()`` after one. Side effect: the first watch registers torch's global module
and parameter registration hooks (they count and change nothing).
"""

from __future__ import annotations

import functools
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


_REGISTRATIONS = [0]  # modules and parameters registered (or set) on any module since the first watch


def _count_registration(*args) -> None:
    _REGISTRATIONS[0] += 1


@functools.cache
def _watch_registrations() -> None:
    """Count every module and parameter registration in the process (``module.sub = other``,
    ``module.weight = Parameter(...)``, new modules): torch's global registration hooks, which
    return None and so change nothing registered. Once per process."""
    _torch_module.register_module_module_registration_hook(_count_registration)
    _torch_module.register_module_parameter_registration_hook(_count_registration)


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
        _watch_registrations()
        self.model, self.want_lean, self.make_lean = model, lean, make_lean
        self.lean = None  # the LeanDecoder while mode == "lean"
        self.mode = "decoder"
        self.pristine = True
        self._globals = _global_hook_dicts()
        self._next_id = self._hook_lens = self._full = self._model = self._rope_buffers = None
        self.pristine = False
        self._snapshot()
        self.refresh()

    # ------------------------------------------------------------------ fingerprints
    def _snapshot(self) -> None:
        """The flat lists the fingerprints read (rebuilt when the model changed)."""
        mods = list(self.model.modules())
        self._mods = mods
        self._dicts = [m.__dict__ for m in mods]
        self._hooks = [m._forward_hooks for m in mods] + [m._forward_pre_hooks for m in mods] + self._globals
        self._children = [m._modules for m in mods if m._modules]
        self._param_dicts = [m._parameters for m in mods if m._parameters]
        self._params = [p for d in self._param_dicts for p in d.values() if p is not None]

    def full_key(self) -> tuple:
        """Changes whenever what a pass computes may have (read before every pass): hooks
        registered (torch's handle counter; the per-module hook dicts too while hooks are
        registered, to see them removed), modules or parameters set anywhere
        (:func:`_watch_registrations`), instance ``forward`` attributes, module classes, the
        parameters' versions and data pointers, the lean decoder's rotary buffer."""
        params, rope = self._params, self._rope_buffers
        return (RemovableHandle.next_id, _REGISTRATIONS[0],
                None if self.pristine else tuple(map(len, self._hooks)),
                any(map(operator.contains, self._dicts, repeat("forward"))), tuple(map(type, self._mods)),
                tuple(map(_version, params)), tuple(map(torch.Tensor.data_ptr, params)),
                id(rope.get("inv_freq")) if rope is not None else None)

    def _model_key(self) -> tuple:
        """What this model's passes depend on, exactly (read only when :meth:`full_key` changed,
        which a registration elsewhere in the process does too): the hook dicts' sizes and
        the identity of every submodule and parameter, besides what :meth:`full_key` reads."""
        values, flat = dict.values, chain.from_iterable
        return (tuple(map(len, self._hooks)),
                tuple(map(id, flat(map(values, self._children)))), tuple(map(id, flat(map(values, self._param_dicts)))),
                self.full_key()[3:])

    def hooks_changed(self) -> bool:
        """Whether a hook was registered anywhere since the last :meth:`refresh` (constant time),
        or, while hooks are registered on the model, removed."""
        if RemovableHandle.next_id != self._next_id:
            return True
        return not self.pristine and tuple(map(len, self._hooks)) != self._hook_lens

    def stale(self) -> bool:
        """Whether the model may have changed since the last :meth:`refresh` (read only)."""
        return self.full_key() != self._full

    # ------------------------------------------------------------------ deciding
    def refresh(self) -> bool:
        """Check the model (before a pass, under the model's lock); decide the mode again if it
        changed. True when it changed since the last check (cached results are stale)."""
        key = self.full_key()
        if key == self._full:
            return False
        first = self._full is None
        if not first and self._model_key() == self._model:  # (a registration elsewhere)
            self._next_id, self._full = key[0], key
            return False
        self._snapshot()
        self._decide()
        self._model = self._model_key()
        self._full = self.full_key()
        self._next_id, self._hook_lens = self._full[0], tuple(map(len, self._hooks))
        if not first:
            logger.debug("the model changed: passes run %r", self.mode)
        return not first

    def _decide(self) -> None:
        mods = self._mods
        hooked = any(self._hooks)
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

"""A wrapper's method that shows the signature of the callable it passes its arguments to.

`PeftModel.forward(*args, **kwargs)` passes everything to the user's model, so Python sees no
argument names. Code around the model reads them: transformers' Trainer keeps only the data
columns named in ``inspect.signature(model.forward)`` (and drops ``input_ids`` from a forward that
names none). `ForwardingMethod` makes ``inspect.signature`` of the bound method say what the
wrapped model's forward takes, plus the wrapper's own keyword arguments; the call itself is the
wrapper's function, unchanged.
"""

from __future__ import annotations

import functools
import inspect
import types
from typing import Any, Callable

__all__ = ["ForwardingMethod", "combined_signature"]


def combined_signature(own: Callable, target: Callable) -> inspect.Signature | None:
    """``own``'s first parameter (self), then ``target``'s parameters, then ``own``'s keyword-only
    parameters that ``target`` does not name; None where Python cannot read ``target``'s."""
    try:
        theirs = list(inspect.signature(target).parameters.values())
    except (TypeError, ValueError):
        return None
    mine = list(inspect.signature(own).parameters.values())
    names = {p.name for p in theirs}
    extra = [p for p in mine[1:] if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in names]
    before = [p for p in theirs if p.kind is not inspect.Parameter.VAR_KEYWORD]
    after = [p for p in theirs if p.kind is inspect.Parameter.VAR_KEYWORD]
    if extra and not any(p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.KEYWORD_ONLY) for p in before):
        extra = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in extra]
    try:
        return inspect.Signature([mine[0], *before, *extra, *after])
    except ValueError:  # an order Python refuses (it should not happen): keep the wrapper's own
        return None


_SIGNED: dict[tuple[Callable, Callable], Callable] = {}
"""(function, the target's function) -> function's copy with the combined signature. The keys are
functions, never bound methods, so the cache keeps no model alive."""


def _signed(function: Callable, target: Callable) -> Callable:
    key = (function, getattr(target, "__func__", target))
    if key in _SIGNED:
        return _SIGNED[key]
    copy = types.FunctionType(function.__code__, function.__globals__, function.__name__,
                              function.__defaults__, function.__closure__)
    copy.__kwdefaults__ = function.__kwdefaults__
    functools.update_wrapper(copy, function)
    del copy.__wrapped__  # inspect must read __signature__, not follow the chain back to ``function``
    signature = combined_signature(function, target)
    if signature is not None:
        copy.__signature__ = signature
    if len(_SIGNED) >= 256:  # a bound on patched forwards made again and again
        _SIGNED.clear()
    _SIGNED[key] = copy
    return copy


class ForwardingMethod:
    """A method descriptor: ``obj.name`` is ``function`` bound to ``obj``, whose signature is that
    of ``target_of(obj)`` (the callable it forwards to) with ``function``'s own keyword-only
    arguments added. Computed once per target function and cached; no state on the instance, so
    copies and pickles of the object are unaffected."""

    def __init__(self, function: Callable, target_of: Callable[[Any], Callable]):
        self.function = function
        self.target_of = target_of
        functools.update_wrapper(self, function)

    def __get__(self, obj, owner=None):
        if obj is None:
            return self.function
        try:
            function = _signed(self.function, self.target_of(obj))
        except (AttributeError, TypeError):  # no target yet (half-built object) or not hashable
            function = self.function
        return types.MethodType(function, obj)

"""The dense-head registry: builders registered by name, created with keyword options.

A builder is a function whose name is the head's public name and whose keyword arguments are the
head's options (timm's `@register_model` habit), so `HeadCfg(name, options)` maps onto one call.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from typing import Any

from pipeline.config import DEFAULT_HEAD, HeadCfg

_BUILDERS: dict[str, Callable[..., Any]] = {}


def register_head(builder: Callable[..., Any]) -> Callable[..., Any]:
    """Register `builder` under its function name; registering a name again replaces it, with a warning."""
    name = builder.__name__
    if name in _BUILDERS:
        warnings.warn(f"dense head {name!r} is registered again: the new builder replaces the old one", stacklevel=2)
    _BUILDERS[name] = builder
    return builder


def list_heads() -> list[str]:
    return sorted(_BUILDERS)


def head_options(name: str) -> list[str]:
    """The option names a head accepts."""
    return list(inspect.signature(_builder(name)).parameters)


def labelling_head_name(head: HeadCfg, meta: dict[str, Any], model: str) -> str:
    """The head that labels with a model: `head.name` when the config names one, else the model's own
    (`meta`, its folder's meta.json `head`: a fine-tuned student's), else `DEFAULT_HEAD`.

    Raises:
        ValueError: the config names another head than the model's own, which is the only one that
            can label with it; the message names the model (`model`) and both heads.
    """
    own = str(meta["head"]) if meta.get("head") else None
    if not head.name:
        return own or DEFAULT_HEAD
    if own is not None and head.name != own:
        raise ValueError(
            f"model {model!r} labels with its own head {own!r}, not {head.name!r}: name no head (head.name "
            f"unset or null) or {own!r}"
        )
    return head.name


def create_head(name: str, **options: Any) -> Any:
    """Build head `name`; `None` options mean "default" and are dropped, unknown ones are an error."""
    builder = _builder(name)
    options = {key: value for key, value in options.items() if value is not None}
    allowed = head_options(name)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(
            f"head {name!r} has no option {', '.join(map(repr, unknown))}; allowed: {', '.join(allowed) or 'none'}"
        )
    return builder(**options)


def _builder(name: str) -> Callable[..., Any]:
    if name not in _BUILDERS:
        raise ValueError(f"unknown head {name!r}; available: {', '.join(list_heads())}")
    return _BUILDERS[name]

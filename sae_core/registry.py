"""Registry from the architecture name stored in ``cfg.json`` to its SAE class."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, TypeVar

if TYPE_CHECKING:
    from sae_core.saes.base import SAE

_ARCHITECTURES: dict[str, type["SAE"]] = {}
T = TypeVar("T", bound=type)


def register_architecture(name: str) -> Callable[[T], T]:
    """Class decorator: make ``name`` (as written in cfg.json) resolve to the class."""

    def decorate(cls: T) -> T:
        if name in _ARCHITECTURES and _ARCHITECTURES[name] is not cls:
            raise ValueError(f"architecture {name!r} is already registered to {_ARCHITECTURES[name].__name__}")
        if getattr(cls, "sparsity", None) not in ("k", "l1", "l0"):
            raise TypeError(f"architecture {name!r} ({cls.__name__}) must set sparsity to 'k', 'l1' or 'l0'")
        _ARCHITECTURES[name] = cls  # type: ignore[assignment]
        cls.architecture = name  # type: ignore[attr-defined]
        return cls

    return decorate


def get_architecture(name: str) -> type["SAE"]:
    """The SAE class registered under ``name``; a clear error lists the known names."""
    import sae_core.saes  # noqa: F401  (registers the built-in architectures)

    try:
        return _ARCHITECTURES[name]
    except KeyError:
        known = ", ".join(sorted(_ARCHITECTURES))
        raise KeyError(f"unknown SAE architecture {name!r}; known architectures: {known}") from None


def architectures() -> list[str]:
    """Names of all registered architectures."""
    import sae_core.saes  # noqa: F401

    return sorted(_ARCHITECTURES)


def architecture_sparsity(name: str) -> str:
    """How architecture ``name`` sets sparsity: "k" (active latents), "l1" or "l0" (penalty)."""
    return get_architecture(name).sparsity


def uses_k(name: str) -> bool:
    """Whether architecture ``name`` takes k, the active latents per token (TopK-type)."""
    return architecture_sparsity(name) == "k"


def check_architecture(name: str) -> str:
    """``name`` if it is registered; a ValueError listing the known ones otherwise (for validators)."""
    if name not in architectures():
        raise ValueError(f"unknown SAE architecture {name!r}; known architectures: {', '.join(architectures())}")
    return name


def add_architecture_enum(schema: dict) -> None:
    """Pydantic json_schema_extra: list the registered architectures (the Prefect UI shows a choice)."""
    schema["enum"] = architectures()

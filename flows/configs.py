"""YAML config file -> PipelineConfig, with errors that name the file, the section and the key."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ValidationError

from tasks.config import PipelineConfig


class ConfigError(ValueError):
    """A config file that cannot be turned into a PipelineConfig; the message says where and why."""


def _known_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """The field names allowed at ``loc`` (walking nested models), for 'did you mean' lists."""
    for part in loc[:-1]:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return sorted(model.model_fields)


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line per problem: ``file: section.key: what is wrong (got …)``."""
    lines = [f"error: config {source} is invalid ({err.error_count()} problem{'s' if err.error_count() > 1 else ''}):"]
    for e in err.errors():
        loc = tuple(e["loc"])
        where = ".".join(str(p) for p in loc) or "(top level)"
        section = f"section '{loc[0]}'" if loc and loc[0] != "name" else "top level"
        if e["type"] == "extra_forbidden":
            known = _known_keys(PipelineConfig, loc)
            hint = f"; known keys here: {', '.join(known)}" if known else ""
            lines.append(f"  {source}: {section}: unknown key {where!r} ({e['msg']}){hint}")
        else:
            got = e.get("input")
            shown = "" if isinstance(got, (dict, list)) else f" (got {got!r})"
            lines.append(f"  {source}: {section}: {where}: {e['msg']}{shown}")
    return "\n".join(lines)


def load_pipeline_config(path: str | Path) -> PipelineConfig:
    """Read a YAML config into a PipelineConfig; raises ConfigError naming file, section and key."""
    from tasks.config_sections import read_yaml_mapping

    file = Path(path)
    try:
        raw = read_yaml_mapping(file, "config file", "sections")
    except ValueError as err:
        raise ConfigError(f"error: {err}") from err
    for section, value in raw.items():
        if section != "name" and value is not None and not isinstance(value, dict):
            raise ConfigError(f"error: config {file} is invalid:\n  {file}: section '{section}' must be a mapping of keys, got {type(value).__name__}")
    raw = {k: v for k, v in raw.items() if v is not None}
    try:
        return PipelineConfig(**raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, str(file))) from err

"""DeepSpeed's own config schema, run early and reported by field: a typo or a bad value in the
JSON file fails at parse time, one line per problem with its path in the file, instead of as a
pydantic ``ValidationError`` from deep inside ``deepspeed.initialize``.

    check_sections(load_config("ds_configs/zero3.json"))   # zero_optimization, bf16, fp16
    "zero_optimization.stage" is 5: must be one of 0, 1, 2, 3
    "zero_optimization.stage3_prefech_bucket_size" is not a DeepSpeed setting in zero_optimization;
        did you mean 'stage3_prefetch_bucket_size'? (value 5)

DeepSpeed also ignores unknown top-level keys: ``check_top_level`` refuses a near-miss of a
setting it reads ("gradient_cliping" ran without clipping) and returns the rest as warnings.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import json

# DeepSpeed's pydantic models by class name (a ValidationError's title) -> the JSON section each
# reads and the module that defines it.
SECTION_MODELS = {
    "DeepSpeedZeroConfig": ("zero_optimization", "deepspeed.runtime.zero.config"),
    "DeepSpeedBF16Config": ("bf16", "deepspeed.runtime.precision_config"),
    "DeepSpeedFP16Config": ("fp16", "deepspeed.runtime.precision_config"),
    "CompileConfig": ("compile", "deepspeed.compile.config"),
    "HybridEngineConfig": ("hybrid_engine", "deepspeed.runtime.config"),
}
# Those checked before a run builds anything.
EARLY_MODELS = ("DeepSpeedZeroConfig", "DeepSpeedBF16Config", "DeepSpeedFP16Config")


def _model(name: str):
    """DeepSpeed's model class ``name`` (of ``SECTION_MODELS``), or None where this version lacks it."""
    try:
        return getattr(importlib.import_module(SECTION_MODELS[name][1]), name)
    except (ImportError, AttributeError):
        return None


def check_sections(config: dict, source: str = "the DeepSpeed config") -> None:
    """Run DeepSpeed's own schema (its pydantic models, e.g. ``DeepSpeedZeroConfig``) over the
    ``"zero_optimization"``, ``"bf16"`` and ``"fp16"`` sections now, before data and model are
    built, so a typo or a bad value fails in a second with the field's path in the JSON file
    instead of from deep inside ``deepspeed.initialize``. All their errors are reported at once."""
    import pydantic

    errors = []
    for name in EARLY_MODELS:
        section = SECTION_MODELS[name][0]
        value = config.get(section)
        if value is None or (section == "zero_optimization" and isinstance(value, bool)):  # absent, or the deprecated boolean form
            continue
        if not isinstance(value, dict):
            errors.append(f'"{section}" must be a JSON object, got {json.dumps(value)}')
            continue
        model = _model(name)
        if model is None:  # a DeepSpeed without this model: its own initialize checks the section
            continue
        try:
            model(**value)
        except pydantic.ValidationError as error:
            errors += _error_lines(error, (section,), model)
    if errors:
        raise _schema_value_error(errors, source)


def schema_error(error, source: str = "the DeepSpeed config", prefix: tuple = (), model=None) -> ValueError:
    """A ``ValueError`` for a pydantic ``ValidationError`` from a DeepSpeed config model: one line
    per error with the field's path in the JSON file, the value found and what is allowed.
    ``prefix`` is the path of the section ``model`` validated (empty: the whole config)."""
    return _schema_value_error(_error_lines(error, prefix, model), source)


def _schema_value_error(lines: list[str], source: str) -> ValueError:
    return ValueError(f"{source} has {len(lines)} invalid DeepSpeed setting{'s' if len(lines) != 1 else ''}:\n  "
                      + "\n  ".join(lines))


def _error_lines(error, prefix: tuple, model) -> list[str]:
    lines = []
    for item in error.errors():
        loc = tuple(str(part) for part in item.get("loc", ()))
        path = ".".join((*prefix, *loc)) or "(top level)"
        value = item.get("input")
        if item.get("type") == "extra_forbidden":
            known = _field_names(_submodel(model, loc[:-1])) if model is not None and loc else []
            close = difflib.get_close_matches(loc[-1], known, n=2, cutoff=0.7) if loc else []
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            where = ".".join((*prefix, *loc[:-1])) or "the top level"
            lines.append(f'"{path}" is not a DeepSpeed setting in {where}{hint} (value {value!r})')
            continue
        allowed = _allowed(model, loc) if model is not None else None
        message = item.get("msg", "invalid")
        if allowed:
            message = f"must be one of {allowed}"
        elif message.startswith("Input should be "):
            message = "must be " + message[len("Input should be "):]
        lines.append(f'"{path}" is {value!r}: {message}')
    return lines


def deepspeed_schema_error(error, source: str = "the DeepSpeed config") -> ValueError:
    """``schema_error`` for a ``ValidationError`` raised inside ``deepspeed.initialize``: the
    section is found from the model's name (its title); an unknown model's name stands for it."""
    title = getattr(error, "title", "") or ""
    section = SECTION_MODELS[title][0] if title in SECTION_MODELS else None
    model = _model(title) if section else None
    prefix = (section,) if section else ((f"<{title}>",) if title else ())
    return schema_error(error, source, prefix, model)


def _annotation_model(annotation):
    """The pydantic model class in a field annotation (``X``, ``X | None``, ``Optional[X]``), or None."""
    import typing

    import pydantic

    candidates = [annotation, *typing.get_args(annotation)]
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, pydantic.BaseModel):
            return candidate
    return None


def _submodel(model, loc: tuple):
    """The pydantic model reached from ``model`` through the field names (or aliases) in ``loc``."""
    for name in loc:
        if model is None:
            return None
        field = _field_by_name(model, name)
        model = _annotation_model(field.annotation) if field is not None else None
    return model


def _field_by_name(model, name: str):
    for field_name, field in model.model_fields.items():
        if name in (field_name, field.alias):
            return field
    return None


def _field_names(model) -> list[str]:
    """The keys a JSON section may use: each field's alias (what DeepSpeed's docs name) or name."""
    if model is None:
        return []
    return sorted({field.alias or name for name, field in model.model_fields.items()})


def _allowed(model, loc: tuple) -> str | None:
    """``"0, 1, 2, 3"`` for an enum field (distinct values: DeepSpeed's ZeRO stage enum repeats 3
    as max_stage), else None."""
    import enum
    import typing

    if not loc:
        return None
    parent = _submodel(model, loc[:-1])
    field = _field_by_name(parent, loc[-1]) if parent is not None else None
    if field is None:
        return None
    for candidate in (field.annotation, *typing.get_args(field.annotation)):
        if isinstance(candidate, type) and issubclass(candidate, enum.Enum):
            values = list(dict.fromkeys(member.value for member in candidate))
            return ", ".join(repr(v) if isinstance(v, str) else str(v) for v in values)
    return None


# Top-level settings whose misspelling DeepSpeed would ignore without a word, leaving the run
# without them (e.g. "gradient_cliping": no clipping at all): a key this close to one is an error.
CORE_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
             "optimizer", "scheduler", "zero_optimization", "bf16", "fp16", "activation_checkpointing", "tensorboard",
             "csv_monitor", "wandb", "comet", "steps_per_print", "zero_allow_untested_optimizer", "data_types", "checkpoint",
             "flops_profiler", "comms_logger", "communication_data_type", "prescale_gradients", "gradient_predivide_factor",
             "wall_clock_breakdown", "memory_breakdown", "torch_autocast", "compile", "aio", "cached")
# Modules whose UPPER_CASE string constants name the keys DeepSpeed reads (a superset of the top level)
KEY_MODULES = ("deepspeed.runtime.constants", "deepspeed.monitor.constants", "deepspeed.profiling.constants",
               "deepspeed.comm.constants", "deepspeed.runtime.data_pipeline.constants", "deepspeed.compression.constants",
               "deepspeed.autotuning.constants", "deepspeed.elasticity.constants", "deepspeed.nebula.constants",
               "deepspeed.runtime.swap_tensor.constants", "deepspeed.runtime.activation_checkpointing.config",
               "deepspeed.runtime.zero.constants", "deepspeed.checkpoint.constants", "deepspeed.runtime.precision_config",
               "deepspeed.runtime.config")
MONITOR_PACKAGES = {"wandb": "wandb", "comet": "comet_ml"}


def deepspeed_keys() -> set[str]:
    keys = set(CORE_KEYS)
    for name in KEY_MODULES:
        try:
            module = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a DeepSpeed without the module: fewer known keys, more warnings
            continue
        keys |= {value for key, value in vars(module).items() if key.isupper() and isinstance(value, str) and value.islower()}
    return keys


def check_top_level(config: dict, source: str = "the DeepSpeed config") -> list[str]:
    """Top-level keys DeepSpeed would ignore: an error where one is a near-miss of a setting it
    reads (``CORE_KEYS``), else returned as warnings; and a monitor whose package is missing,
    refused now rather than after data and model are built."""
    known, errors, warnings = deepspeed_keys(), [], []
    for key in config:
        if key in known:
            continue
        close = difflib.get_close_matches(key, CORE_KEYS, n=1, cutoff=0.8)
        if close:
            errors.append(f'"{key}" is not a DeepSpeed setting; did you mean "{close[0]}"? (DeepSpeed ignores unknown keys: as '
                          "written it has no effect)")
        else:
            warnings.append(f'{source}: "{key}" is not a setting this DeepSpeed version reads; it is ignored')
    for section, package in MONITOR_PACKAGES.items():
        if isinstance(config.get(section), dict) and config[section].get("enabled") and importlib.util.find_spec(package) is None:
            errors.append(f'"{section}" is enabled but its package is not installed: pip install {package}, or remove the section')
    if errors:
        raise _schema_value_error(errors, source)
    return warnings

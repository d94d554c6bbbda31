"""A job's flat settings: the names the tools, the CLI and the Python API take (``steps``, ``lora_rank``,
``split``), where each lives in a job spec, and the spec built from them (``training_spec``).

Nothing here declares a setting: every one is a field of the models in ``engine.contract.spec``, and a
field or a section added there is a setting everywhere (tool arguments, CLI flags, ``Trainer``'s
keywords, the resolved training plan).
"""

from __future__ import annotations

from collections.abc import Collection
from difflib import get_close_matches
from functools import cache
from inspect import Parameter
from typing import Annotated, Any, TypeVar, get_args, get_origin

from pydantic import BaseModel, Field
from pydantic.fields import FieldInfo

from engine.contract.spec import DatasetSettings, FinetuneSpec, SeriesSpec

Job = TypeVar("Job", FinetuneSpec, SeriesSpec)

# A section's fields (a field whose value is a settings model: lora, train, safety, the dataset) are settings
# under their own names, or with the section's prefix where _PREFIXES gives one.
_PREFIXES = {"lora": "lora_", "grpo": "grpo_"}  # lora_rank is lora.rank; grpo_beta (not dpo's beta) grpo.beta
# where a flat setting lives: its section (None: the job itself), its field's name there, the field
SettingHome = tuple[str | None, str, FieldInfo]


def _section_model(info: FieldInfo) -> type[BaseModel] | None:
    kind = info.annotation
    kind = get_args(kind)[0] if get_origin(kind) is list else kind  # a series' datasets
    return kind if isinstance(kind, type) and issubclass(kind, BaseModel) else None


def _not_a_setting(job: type[BaseModel], name: str) -> bool:
    # the job's kind and its data (training_spec's own argument, the tools' paths); a series holds out
    # heldout_fraction of every slice instead of an eval split
    return name in ("kind", "source", "path") or (name == "eval_fraction" and "datasets" in job.model_fields)


@cache
def _homes(job: type[BaseModel]) -> dict[str, SettingHome]:
    homes: dict[str, SettingHome] = {}
    for name, info in job.model_fields.items():
        model = _section_model(info)
        section = "dataset" if model is DatasetSettings else name
        fields = {name: info} if model is None else model.model_fields
        for field, field_info in fields.items():
            flat = field if model is None else _PREFIXES.get(name, "") + field
            if flat in homes:
                raise TypeError(
                    f"{job.__name__}: two settings named {flat!r}; give section {name!r} a prefix"
                )
            if not _not_a_setting(job, flat):
                homes[flat] = (None, flat, field_info) if model is None else (section, field, field_info)
    return homes


def settings_of(job: type[BaseModel]) -> list[str]:
    """The flat setting names of ``job``'s specs (besides the data), in the spec's order: the job's fields
    as declared, each section's fields in its place (``lora_rank``, ``steps``, ``split``, ...)."""
    return list(_homes(job))


def setting_home(name: str, job: type[BaseModel]) -> SettingHome:
    """Where the flat setting ``name`` lives in ``job``'s spec: its section (``lora``, ``train``, ``safety``,
    ``dataset``; None: the job itself), its field's name there, and the field."""
    return _homes(job)[name]


def setting_parameters(job: type[BaseModel], leave_out: Collection[str] = ()) -> list[Parameter]:
    """A keyword parameter per setting of ``job`` but ``leave_out``: the field's type, bounds and description
    (``Annotated``) and its default, for signatures made from the spec (the tools, ``Trainer``)."""
    return [_parameter(name, info) for name, (_, _, info) in _homes(job).items() if name not in leave_out]


def _parameter(name: str, info: FieldInfo) -> Parameter:
    field = Field(description=info.description)
    field.metadata = list(info.metadata)  # the bounds
    default = Parameter.empty if info.is_required() else info.get_default(call_default_factory=True)
    return Parameter(
        name, Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[info.annotation, field]
    )


def training_spec(job: type[Job], data: str | list[str], /, **settings: Any) -> Job:
    """A fine-tune (one dataset) or series spec from flat settings, as the tools, the CLI and the
    Python API take them: each goes where the spec declares it (``steps`` to ``train``, ``lora_rank``
    to ``lora.rank``, ``skip_bad_rows`` to every dataset, ``num_runs`` to the series); ``None``
    means 'not given', the spec's default. Raises TypeError for a name that is not a setting
    (``settings_of``) and pydantic's ValidationError for a bad value.
    """
    homes = _homes(job)
    given: dict[str | None, dict[str, Any]] = {}
    for name, value in settings.items():
        if name not in homes:
            close = get_close_matches(name, list(homes), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise TypeError(f"unknown setting {name!r}; {hint}known: {', '.join(homes)}")
        if value is not None:
            section, field, _ = homes[name]
            given.setdefault(section, {})[field] = value
    top, shared = given.pop(None, {}), given.pop("dataset", {})
    datasets = [{"path": path, **shared} for path in ([data] if isinstance(data, str) else data)]
    where_data = {"dataset": datasets[0]} if "dataset" in job.model_fields else {"datasets": datasets}
    return job.model_validate({**top, **given, **where_data})

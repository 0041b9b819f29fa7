"""One declaration per default: the base of every stage's options model.

Each stage (prep, train, merge, quantize, gate, scorecard) declares its options once, as a pydantic model in its
own package (``lorakit.<stage>.options``). Three things are built from that one declaration:

- the stage's ``lorakit`` sub-command options (:func:`lorakit.cli.options.stage_options`: name, type, choices,
  default and help of each ``--option`` come from the field, as mergekit builds its click options from its
  pydantic ``MergeOptions``);
- the run config section of the stage (``flows.config``: the section *is* the model, or a subclass that adds
  keys only a whole run has, such as a dataset's name);
- the defaults of the library function (``quantize_model(..., group_size=QUANTIZE.group_size)``), which a test
  compares with the model, field by field.

So a default changes in one place, and the CLI, a run config and a library call cannot disagree about it.
This module is light (pydantic only): reading a run config never imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from lorakit.errors import InputError


class StageOptions(BaseModel):
    """Options of one stage. Unknown keys are refused (a misspelt option must fail loudly, not fall back to its
    default) and values are frozen (an options object is a record of what a stage was asked to do)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def from_given(cls, given: dict[str, Any], *, flags: bool = False) -> StageOptions:
        """Validate the values a caller gave (the rest take their declared defaults). Problems become one
        :class:`InputError` naming every bad option, as ``--max-steps`` (``flags``) or as the key ``max_steps``."""
        try:
            return cls.model_validate(given)
        except ValidationError as exc:
            raise InputError(options_problems(exc, cls, flags=flags)) from None

    def given(self) -> dict[str, Any]:
        """The options as keyword arguments of the stage's library function."""
        return {name: getattr(self, name) for name in type(self).model_fields}


@dataclass(frozen=True)
class Cli:
    """How a field appears on the command line when ``--`` + its name does not say it well: put it in the field's
    ``Annotated[...]`` metadata. ``decls`` are click's parameter declarations (``"--sym/--asym"``, ``"-w"``).
    (Keys only a whole run has, such as a dataset's name, live in the run config's subclass, not here.)"""

    decls: tuple[str, ...] = ()


def cli_of(field: Any) -> Cli:
    """The :class:`Cli` marker of a pydantic field (a default one when the field has none)."""
    return next((m for m in field.metadata if isinstance(m, Cli)), Cli())


def option_flag(name: str, field: Any) -> str:
    """The long option of a field: its own declaration, else ``--`` + the name with dashes."""
    decls = [d for d in cli_of(field).decls if d.startswith("--")]
    return decls[0].split("/")[0] if decls else "--" + name.replace("_", "-")


def options_problems(exc: ValidationError, model: type[BaseModel], *, flags: bool) -> str:
    """Every problem of a validation as one line: ``--group-size: Input should be ...; --lr: ...``."""
    problems = []
    for error in exc.errors():
        loc = error["loc"]
        msg = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            msg = "unknown option"
        if not loc:
            problems.append(msg)
            continue
        head = str(loc[0])
        field = model.model_fields.get(head)
        where = option_flag(head, field) if flags and field is not None else ".".join(str(p) for p in loc)
        problems.append(f"{where}: {msg}")
    return "; ".join(problems)


__all__ = ["Cli", "StageOptions", "cli_of", "option_flag", "options_problems"]

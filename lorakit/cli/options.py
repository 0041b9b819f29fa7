"""Options that several sub-commands share, declared once so their meaning and help cannot drift apart."""

from __future__ import annotations

import click

from lorakit.compute import DTYPE_CHOICES
from lorakit.runtime import DEFAULT_DEVICE

# Every stage resolves it with lorakit.runtime.resolve_device.
device_option = click.option("--device", default=DEFAULT_DEVICE, show_default=True,
                             help="auto (CUDA when present), cpu or cuda[:N].")


def gen_batch_size_option(f):
    """``--gen-batch-size``: prompts per greedy-generation batch (scorecard, ``eval --tasks``)."""
    from lorakit.evaluate.accuracy import DEFAULT_GEN_BATCH_SIZE, KV_CACHE_BUDGET

    return click.option("--gen-batch-size", type=int, default=DEFAULT_GEN_BATCH_SIZE, show_default=True,
                        help=f"Prompts per generation batch, at most: a batch is also cut so its KV cache stays "
                             f"within {KV_CACHE_BUDGET / 2**30:g} GiB (a large model gets fewer). Answers do not "
                             f"depend on it.")(f)


# What `auto` means per stage (lorakit.compute.POLICY), in the words --help shows.
_AUTO_MEANS = {
    "fastest": "bfloat16 where it is fast here (CUDA with bf16; a CPU whose bf16 matmul a short, cached probe "
               "finds faster than float32), else float32",
    "float32": "float32, so results compare across machines",
}


def compute_dtype_option(stage: str | None):
    """``--compute-dtype`` for ``stage``; every stage resolves it with lorakit.compute.resolve_compute_dtype.
    ``stage=None``: the whole pipeline (``lorakit run``), where it overrides the run config's key."""
    from lorakit.compute import EXACT_STAGES, POLICY

    if stage is None:
        return click.option("--compute-dtype", type=click.Choice(DTYPE_CHOICES), default=None,
                            help="Overrides compute_dtype of the run config. auto: train and quantize in bfloat16 "
                                 "only where it is fast here, gate in float32; the merge always computes in float32.")
    if stage in EXACT_STAGES:  # every choice is accepted here so that the resolver's refusal explains why
        text = f"auto = float32, the only dtype of the {stage}: it is exact, so reduced precision is refused."
    else:
        text = f"Dtype the model computes in. auto = {_AUTO_MEANS[POLICY[stage]]}."
    return click.option("--compute-dtype", type=click.Choice(DTYPE_CHOICES), default="auto", show_default=True,
                        help=text)


# --- stage options: click options built from a stage's options model (lorakit.options) ---------------------------

class _GivenNone:
    """A value the user typed as ``none``: the option was given, and its value is None (not "left out")."""

    def __repr__(self) -> str:
        return "none"


GIVEN_NONE = _GivenNone()


class _OrNone(click.ParamType):
    """An optional field's type on the command line: its own type, or ``none``/``null`` for None."""

    def __init__(self, inner: click.ParamType):
        self.inner = inner
        self.name = inner.name

    def convert(self, value, param, ctx):
        if isinstance(value, str) and value.strip().lower() in ("none", "null"):
            return GIVEN_NONE
        return self.inner.convert(value, param, ctx)

    def get_metavar(self, param, ctx=None):
        inner = self.inner.get_metavar(param, ctx) if ctx is not None else None
        return f"{inner or self.name.upper()}|none"


def _parts(annotation) -> tuple[object, bool]:
    """``X | None`` -> (X, True); ``X`` -> (X, False)."""
    import types
    import typing

    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), True
    return annotation, False


def _click_type(inner) -> tuple[click.ParamType, bool]:
    """(click type, is a comma-separated list) of a field's non-None type."""
    import typing

    origin = typing.get_origin(inner)
    if origin is typing.Annotated:  # e.g. FiniteFloat = Annotated[float, ...]
        return _click_type(typing.get_args(inner)[0])
    if origin is list:
        item, _ = _click_type(typing.get_args(inner)[0])
        return item, True
    if origin is typing.Literal:
        values = typing.get_args(inner)
        if all(isinstance(v, str) for v in values):
            return click.Choice(list(values)), False
        return click.Choice([str(v) for v in values]), False
    for py, ct in ((bool, click.BOOL), (int, click.INT), (float, click.FLOAT), (str, click.STRING)):
        if inner is py:
            return ct, False
    return click.STRING, False


def stage_options(model, *, prefix_help: str = ""):
    """A decorator adding one click option per field of ``model`` (a :class:`lorakit.options.StageOptions`):
    ``--group-size``, its type or choices, its description as help and its declared default shown. Booleans
    become ``--x/--no-x``; optional fields accept ``none``; lists are comma-separated. Read the values back with
    :func:`take_stage_options`, which passes on only the options the user gave, so the model's own defaults and
    validators decide the rest."""
    from pydantic_core import PydanticUndefined

    from lorakit.options import cli_of

    def decorate(f):
        for name in reversed(list(model.model_fields)):
            field = model.model_fields[name]
            marker = cli_of(field)
            inner, optional = _parts(field.annotation)
            ptype, is_list = _click_type(inner)
            default = field.get_default(call_default_factory=True) if field.default is not PydanticUndefined or \
                field.default_factory is not None else None
            text = field.description or ""
            help_text = prefix_help + (text[:1].lower() + text[1:] if prefix_help else text)
            long = "--" + name.replace("_", "-")
            # The declared default is click's default too, so --help shows it; take_stage_options passes on only
            # what the user typed (click's parameter source), so the model's own validators see "left out".
            shown = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else default
            if ptype is click.BOOL:
                decls = list(marker.decls) or [f"{long}/--no-{name.replace('_', '-')}"]
                option = click.option(*decls, name, default=shown, help=help_text, show_default=default is not None)
            else:
                if is_list:
                    ptype = _CommaList(ptype)
                if optional:
                    ptype = _OrNone(ptype)
                decls = list(marker.decls) or [long]
                option = click.option(*decls, name, type=ptype, default=shown, help=help_text,
                                      show_default=default is not None)
            f = option(f)
        return f

    return decorate


class _CommaList(click.ParamType):
    """``a,b`` -> ["a", "b"], each item converted by the field's item type."""

    def __init__(self, item: click.ParamType):
        self.item = item
        self.name = "list"

    def get_metavar(self, param, ctx=None):
        if isinstance(self.item, click.Choice):
            return f"{'|'.join(self.item.choices)}[,...]"
        return f"{self.item.name.upper()}[,...]"

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        try:
            return [self.item.convert(v.strip(), param, ctx) for v in str(value).split(",") if v.strip()]
        except click.BadParameter as exc:
            if isinstance(self.item, click.Choice):
                self.fail(exc.message, param, ctx)
            self.fail(f"{value!r} is not a comma-separated list of {self.item.name} values ({exc.message})", param, ctx)


def take_stage_options(model, kwargs: dict):
    """Remove ``model``'s options from a command's ``kwargs`` and validate the ones the user gave (the rest take
    their declared defaults); a bad value is one :class:`InputError` naming ``--the-option``."""
    from click.core import ParameterSource

    ctx = click.get_current_context()
    given = {}
    for name, field in model.model_fields.items():
        value = kwargs.pop(name, None)
        if ctx.get_parameter_source(name) in (None, ParameterSource.DEFAULT):
            continue  # left out: the model's declared default applies
        if value is GIVEN_NONE:
            given[name] = None
        else:
            given[name] = int(value) if _is_int_literal(field.annotation) and value is not None else value
    return model.from_given(given, flags=True)


def _is_int_literal(annotation) -> bool:
    import typing

    inner, _ = _parts(annotation)
    return typing.get_origin(inner) is typing.Literal and all(isinstance(v, int) for v in typing.get_args(inner))

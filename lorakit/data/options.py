"""The options of the prep stage, declared once (:mod:`lorakit.options`): ``lorakit prep``, each entry of the run
config's ``datasets:`` list and ``lorakit.data.prepare_dataset`` take their defaults from :class:`PrepOptions`."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from lorakit.options import Cli, StageOptions

FORMATS = ("text", "instruction", "chat")  # lorakit.data.formats renders each


class PrepOptions(StageOptions):
    """How raw task data becomes a prepared-data folder: rendered, tokenized, prompts masked, split, packed."""

    format: Annotated[Literal[("auto", *FORMATS)], Cli(decls=("--format",))] = Field(  # type: ignore[valid-type]
        "auto", description="How examples are read; auto detects it from the fields and says which.")
    max_length: int = Field(512, gt=0, description="Tokens per example and per packed row; longer examples are "
                            "truncated and counted (512 is what the training sweep measured).")
    pack: bool = Field(True, description="Pack several examples per row (no attention across them) or pad one "
                       "example per row.")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="Share of example inputs held out as the validation "
                                "split (read by the gate and any search).")
    test_fraction: float = Field(0.1, ge=0, lt=1, description="Share of example inputs held out as the test split, "
                                 "which only the final scorecard reads (0: none; reports then fall back to val).")
    seed: int = Field(0, description="Seed of the train/validation/test split.")
    drop_long: bool = Field(False, description="Leave out examples longer than max_length instead of truncating.")


PREP = PrepOptions()

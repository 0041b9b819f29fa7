"""Training rows from a prepared-data folder, and the deterministic order they are visited in.

The order is a pure function of (seed, epoch): microbatch ``m`` of the whole run is found without replaying the
run, so ``--resume`` lands on exactly the batches an uninterrupted run would have used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit.data.prep import rows_path
from lorakit.errors import InputError


@dataclass
class Rows:
    input_ids: torch.Tensor  # [N, L] int64
    labels: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None  # None for packed rows
    tokens: torch.Tensor  # [N] real tokens per row

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def load_rows(prep_dir: Path, split: str = "train") -> Rows:
    import pyarrow.parquet as pq

    path = rows_path(prep_dir, split)
    if not path.exists():
        raise InputError(f"{path} is missing; re-create the prepared-data folder with `lorakit prep`")
    table = pq.read_table(path)

    def col(name: str) -> torch.Tensor:
        return torch.tensor(table.column(name).to_pylist(), dtype=torch.long)

    if table.num_rows == 0:
        raise InputError(f"{path} holds no rows; the {split} split is empty")
    mask = col("attention_mask") if "attention_mask" in table.column_names else None
    return Rows(col("input_ids"), col("labels"), col("position_ids"), mask, col("tokens").view(-1))


@dataclass
class Schedule:
    """Which rows each optimizer step uses: microbatches of ``batch_size`` rows, ``grad_accum`` per step."""

    n_rows: int
    batch_size: int
    grad_accum: int
    seed: int

    @property
    def micro_per_epoch(self) -> int:
        return math.ceil(self.n_rows / self.batch_size)

    def steps_for_epochs(self, epochs: float) -> int:
        return max(1, math.ceil(epochs * self.micro_per_epoch / self.grad_accum))

    def epoch_order(self, epoch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n_rows, generator=gen)

    def step_microbatches(self, step: int) -> list[torch.Tensor]:
        """Row indices of each microbatch of optimizer step ``step`` (0-based)."""
        out = []
        for m in range(step * self.grad_accum, (step + 1) * self.grad_accum):
            epoch, k = divmod(m, self.micro_per_epoch)
            order = self.epoch_order(epoch)
            out.append(order[k * self.batch_size:(k + 1) * self.batch_size])
        return out

    def epoch_at(self, step: int) -> float:
        return (step + 1) * self.grad_accum / self.micro_per_epoch


def model_inputs(rows: Rows, idx: torch.Tensor, device: str) -> dict[str, torch.Tensor]:
    """Forward kwargs for a microbatch. Packed rows: position_ids and NO attention mask, which transformers turns
    into a block-diagonal causal mask (no attention across documents); padded rows: a 2D attention mask."""
    batch = {"input_ids": rows.input_ids[idx].to(device), "position_ids": rows.position_ids[idx].to(device)}
    if rows.attention_mask is not None:
        batch["attention_mask"] = rows.attention_mask[idx].to(device)
    return batch

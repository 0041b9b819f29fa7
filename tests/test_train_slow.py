"""The real embedded SmolLM2-135M-Instruct trains a few QLoRA (NF4) steps on CPU and passes the sanity gate."""

from __future__ import annotations

import pytest

from lorakit.adapters import load_adapter
from lorakit.data.prep import prepare_dataset
from lorakit.models.embedded import MODEL_ID
from lorakit.models.folder import weights_digest
from lorakit.train import read_train_record, train_adapter


@pytest.mark.slow
def test_real_smollm2_qlora_few_steps(real_base, tmp_path):
    prep = tmp_path / "prep"
    prepare_dataset(["bundled:number-words"], prep, max_length=128, progress=False)
    res = train_adapter(prep, tmp_path / "adapter", quant="nf4", max_steps=4, lr=1e-3, batch_size=2, grad_accum=1, r=8, alpha=16,
                        progress=False, checkpoint_every=None)
    record = read_train_record(res.output)
    assert record.base == MODEL_ID and record.base_digest == weights_digest(real_base)
    from lorakit.compute import dtype_name, resolve_compute_dtype

    assert record.compute_dtype == dtype_name(resolve_compute_dtype("auto", "train", "cpu"))
    assert record.first_batch_loss_after < record.first_batch_loss_before
    adapter = load_adapter(res.output)
    assert adapter.base_name == MODEL_ID and len(adapter.modules) == 30 * 7

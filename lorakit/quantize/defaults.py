"""The quantization configuration the release flow uses by default (the embedded SmolLM2-135M release).

Measured on the default release itself (``lorakit run configs/default.yaml``: the merged model of the two
bundled-task QLoRA adapters, calibrated on their train splits prepared together, scored on their val splits with
the gate's method): GPTQ 4-bit, group 64, symmetric, 64 x 256 calibration tokens passes the 5% gate at +3.4% on
the worse of the two checks, with a 115 MB weights file (43% of the 269 MB bf16 size) in the standard GPTQ layout
that plain transformers loads (bench/results/pipeline.json). AWQ 4-bit g64 asym measured +1.9% on adapters
trained for 30 steps (bench/results/release_quality.json) but +5.2% on the default release's longer-trained
adapters, so it is not the default. Group 128 does not divide SmolLM2's hidden size 576. For other data or
models, set ``target_degradation`` and let the search measure (``lorakit.quantize.search.quantize_to_target``).
``flows.config.QuantizeConfig``'s defaults equal these values (tested).
"""

RELEASE_QUANTIZE = {"method": "gptq", "bits": 4, "group_size": 64, "sym": True, "desc_act": False,
                    "n_samples": 64, "seq_len": 256, "seed": 0}
RELEASE_TARGET_DEGRADATION = 0.05  # the gate's default; a run config's `target_degradation` turns the search on

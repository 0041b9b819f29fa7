"""The quantization configuration the release flow uses by default (the embedded SmolLM2-135M release).

Why GPTQ 4-bit g64 sym: a ``lorakit run configs/default.yaml`` with GPTQ 4-bit passed the 5% gate
(bench/results/pipeline.json, ``verdict``; that file predates the current training defaults and does not record
the group size), and GPTQ 4-bit g64 makes SmolLM2-135M 115 MB (bf16: 269 MB) in the standard GPTQ layout plain
transformers loads (bench/results/quantize.json ``runs.lorakit-gptq-4b-g64-sym.size_mb``, ``runs.fp32.size_mb``). AWQ is not the default: no result file measures it on the
current default release. Group 128 does not divide SmolLM2's hidden size 576. For other data or
models, set ``target_degradation`` and let the search measure (``lorakit.quantize.search.quantize_to_target``).
``flows.config.QuantizeConfig``'s defaults equal these values (tested).
"""

RELEASE_QUANTIZE = {"method": "gptq", "bits": 4, "group_size": 64, "sym": True, "desc_act": False,
                    "n_samples": 64, "seq_len": 256, "seed": 0,
                    "calib_general": "default", "calib_general_fraction": 0.5}
RELEASE_TARGET_DEGRADATION = 0.05  # the gate's default; a run config's `target_degradation` turns the search on

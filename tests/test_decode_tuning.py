"""The decode kernel's per-shape launch choices: lookup in a stored sweep, and the stored file's form."""

from __future__ import annotations

import json

from pallas_kernels.decode_tuning import DEFAULT, TABLE, DecodeConfig, choose

ENTRIES = [
    {"device_kind": "NVIDIA H200", "q_heads": 32, "kv_heads": 8, "head_dim": 128, "batch": 32, "context": 2048,
     "config": DecodeConfig(4, 1, 4, 4, 1, True).to_dict()},
    {"device_kind": "NVIDIA H200", "q_heads": 32, "kv_heads": 8, "head_dim": 128, "batch": 8, "context": 512,
     "config": DecodeConfig(2, 4, 1, 8, 1, False).to_dict()},
    {"device_kind": "NVIDIA H100", "q_heads": 32, "kv_heads": 8, "head_dim": 128, "batch": 32, "context": 2048,
     "config": DecodeConfig(8, 2, 1, 4, 2, False).to_dict()},
]


def test_a_swept_shape_takes_its_own_entry():
    assert choose(ENTRIES, "NVIDIA H200", 32, 8, 128, 32, 2048) == DecodeConfig(4, 1, 4, 4, 1, True)
    assert choose(ENTRIES, "NVIDIA H100", 32, 8, 128, 32, 2048) == DecodeConfig(8, 2, 1, 4, 2, False)


def test_another_shape_takes_the_nearest_entry_with_as_many_programs():
    # batch 4 is nearest to batch 8 (context 512): its 4 splits over 8 x 8 programs become 8 over 4 x 8
    assert choose(ENTRIES, "NVIDIA H200", 32, 8, 128, 4, 512) == DecodeConfig(2, 8, 1, 8, 1, False)
    # batch 64 at context 4096 is nearest to (32, 2048): one split stays one
    assert choose(ENTRIES, "NVIDIA H200", 32, 8, 128, 64, 4096).splits == 1


def test_an_unswept_device_or_head_layout_takes_the_default():
    assert choose(ENTRIES, "NVIDIA A100", 32, 8, 128, 32, 2048) == DEFAULT
    assert choose(ENTRIES, "NVIDIA H200", 40, 40, 128, 32, 2048) == DEFAULT
    assert choose([], "NVIDIA H200", 32, 8, 128, 32, 2048) == DEFAULT


def test_the_stored_table_holds_valid_configs():
    assert TABLE.exists(), f"the sweep table {TABLE} is missing from the package"
    entries = json.loads(TABLE.read_text())["entries"]
    assert entries, "the stored table has no entries"
    for e in entries:
        cfg = DecodeConfig(**e["config"])
        assert cfg.pages_per_block >= 1 and cfg.num_warps in (1, 2, 4, 8, 16) and cfg.heads_per_program >= 1
        assert e["kv_heads"] % cfg.heads_per_program == 0 and e["q_heads"] % e["kv_heads"] == 0

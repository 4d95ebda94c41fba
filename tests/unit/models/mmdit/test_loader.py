"""The MMDiT weight loader: single file, sharded folder, plain folder, and its report of problems."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from opensora_core.errors import InputError
from opensora_core.models.mmdit import (
    IncompatibleWeights,
    build_mmdit,
    load_mmdit_weights,
    prepare_img_ids,
    prepare_txt_ids,
)
from opensora_core.models.mmdit.loader import INDEX_FILE, checkpoint_files


def _random_model(seed: int):
    torch.manual_seed(seed)
    model = build_mmdit("tiny")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    return model


def _plain_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def _save_sharded(state: dict[str, torch.Tensor], folder: Path, num_shards: int, index: bool = True) -> None:
    """Write ``state`` as ``num_shards`` safetensors files (+ the index that names each key's shard)."""
    folder.mkdir(parents=True, exist_ok=True)
    keys = list(state)
    weight_map = {}
    for i in range(num_shards):
        name = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {k: state[k] for k in keys[i::num_shards]}
        save_file(part, str(folder / name))
        weight_map.update(dict.fromkeys(part, name))
    if index:
        (folder / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_round_trip_through_one_safetensors_file(tmp_path):
    source = _random_model(0)
    save_file(_plain_state_dict(source), str(tmp_path / "mmdit.safetensors"))
    target = _random_model(1)
    report = load_mmdit_weights(target, tmp_path / "mmdit.safetensors", strict=True)
    assert report.ok
    assert sorted(report.loaded) == sorted(source.state_dict())
    _assert_same_weights(source, target)
    assert "loaded" in str(report) and "0 missing" in str(report)
    # the loaded model computes what the saved one did
    inputs = {
        "img": torch.randn(1, 4, 32),
        "img_ids": prepare_img_ids(1, 2, 2),
        "txt": torch.randn(1, 3, 384),
        "txt_ids": prepare_txt_ids(1, 3),
        "timesteps": torch.rand(1),
        "y_vec": torch.randn(1, 384),
        "cond": torch.randn(1, 4, 36),
    }
    with torch.no_grad():
        torch.testing.assert_close(target(**inputs), source(**inputs), rtol=0, atol=0)


@pytest.mark.parametrize("with_index", [True, False])
def test_round_trip_through_a_sharded_folder(tmp_path, with_index):
    source = _random_model(0)
    _save_sharded(_plain_state_dict(source), tmp_path / "ckpt", num_shards=3, index=with_index)
    # a stray file beside an index is not read: the index names the shards
    if with_index:
        save_file({"stray": torch.zeros(1)}, str(tmp_path / "ckpt" / "zz-other.safetensors"))
    assert len(checkpoint_files(tmp_path / "ckpt")) == 3
    target = _random_model(1)
    report = load_mmdit_weights(target, tmp_path / "ckpt", strict=True)
    assert report.ok and len(report.files) == 3
    _assert_same_weights(source, target)


def test_report_lists_missing_unexpected_and_mismatched_keys(tmp_path):
    source = _random_model(0)
    state = _plain_state_dict(source)
    del state["double_blocks.0.img_attn.q_proj.weight"]
    state["double_blocks.9.img_attn.q_proj.weight"] = torch.zeros(4, 4)
    state["final_layer.linear.weight"] = torch.zeros(7, 128)
    save_file(state, str(tmp_path / "partial.safetensors"))

    target = _random_model(1)
    before = _plain_state_dict(target)
    # strict: raises with the report, and the model is left as it was
    with pytest.raises(IncompatibleWeights) as excinfo:
        load_mmdit_weights(target, tmp_path / "partial.safetensors", strict=True)
    assert excinfo.value.exit_code == 2
    assert "double_blocks.9.img_attn.q_proj.weight" in str(excinfo.value)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())

    report = load_mmdit_weights(target, tmp_path / "partial.safetensors")
    assert not report.ok
    assert report.missing == ["double_blocks.0.img_attn.q_proj.weight"]
    assert report.unexpected == ["double_blocks.9.img_attn.q_proj.weight"]
    assert report.mismatched == [("final_layer.linear.weight", (7, 128), (32, 128))]
    text = str(report)
    assert "1 missing, 1 unexpected, 1 shape-mismatched" in text
    assert "final_layer.linear.weight: (7, 128) vs (32, 128)" in text
    # everything else was loaded; the missing and mismatched tensors kept their values
    sd = target.state_dict()
    assert torch.equal(
        sd["double_blocks.0.img_attn.k_proj.weight"], state["double_blocks.0.img_attn.k_proj.weight"]
    )
    assert torch.equal(
        sd["double_blocks.0.img_attn.q_proj.weight"], before["double_blocks.0.img_attn.q_proj.weight"]
    )
    assert torch.equal(sd["final_layer.linear.weight"], before["final_layer.linear.weight"])


def test_wrapper_prefixes_are_stripped_and_dtypes_cast(tmp_path):
    source = _random_model(0)
    state = {f"module.{k}": v.to(torch.bfloat16) for k, v in _plain_state_dict(source).items()}
    save_file(state, str(tmp_path / "ddp.safetensors"))
    target = _random_model(1)
    assert load_mmdit_weights(target, tmp_path / "ddp.safetensors", strict=True).ok
    for key, value in target.state_dict().items():
        assert value.dtype == torch.float32
        assert torch.equal(value, source.state_dict()[key].to(torch.bfloat16).float()), key


def test_meta_model_gets_real_tensors(tmp_path):
    source = _random_model(0)
    save_file(_plain_state_dict(source), str(tmp_path / "mmdit.safetensors"))
    target = build_mmdit("tiny", device="meta")
    report = load_mmdit_weights(target, tmp_path / "mmdit.safetensors", strict=True)
    assert report.ok
    assert not any(p.is_meta for p in target.parameters())
    assert all(p.requires_grad for p in target.parameters())
    _assert_same_weights(source, target)


def test_bad_paths_are_input_errors(tmp_path):
    model = build_mmdit("tiny", device="meta")
    with pytest.raises(InputError, match="no checkpoint"):
        load_mmdit_weights(model, tmp_path / "absent.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"no \*\.safetensors"):
        load_mmdit_weights(model, tmp_path / "empty")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / INDEX_FILE).write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    with pytest.raises(InputError, match=r"gone\.safetensors"):
        load_mmdit_weights(model, tmp_path / "broken")

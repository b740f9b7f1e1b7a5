"""Backbone loading (configs, weights from files/URLs/folders), positional embeddings, precision."""

from __future__ import annotations

import json
import logging
import tempfile

import fsspec
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from tiny_models import CONFIGS, blocky_uint8, fresh_backbone, tiny_backbone

from pipeline.config import ModelCfg, load_config
from pipeline.models import backbone as backbone_mod
from pipeline.models.backbone import RANDOM_INIT_WEIGHTS, interpolate_pos_embed, load_backbone
from pipeline.models.precision import _probe_cpu, probe_cpu, resolve_device, resolve_dtype
from pipeline.stages.infer import DenseLabeler
from pipeline.vocab import Vocabulary


def _state(bb):
    return {k: v.detach().clone().contiguous() for k, v in bb.model.state_dict().items()}


def _same_weights(a, b) -> bool:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_config_json_builds_vit_and_resnet():
    vit, rn = tiny_backbone("vit"), tiny_backbone("resnet")
    assert (vit.kind, vit.stride, vit.native_grid, vit.embed_dim) == ("vit", 8, (8, 8), 32)
    assert (rn.kind, rn.stride, rn.native_grid, rn.embed_dim) == ("resnet", 32, (2, 2), 32)
    assert vit.dtype == torch.float32 and vit.device == torch.device("cpu") and vit.name == "tiny-vit"
    emb = vit.encode_text(["a photo of a cat.", "a dog"])
    assert emb.shape == (2, 32) and emb.dtype == torch.float32
    assert torch.allclose(emb.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_positional_embedding_native_grid_is_the_parameter_and_others_are_cached():
    vit = fresh_backbone("vit")
    param = vit.visual.positional_embedding
    assert vit.positional_embedding((8, 8)) is param
    wide = vit.positional_embedding((6, 10))
    assert wide.shape == (1 + 60, 64) and vit.positional_embedding((6, 10)) is wide
    assert torch.equal(wide[0], param[0])  # the [CLS] row is kept
    same = interpolate_pos_embed(param.detach(), (8, 8), (8, 8))
    assert torch.allclose(same, param, atol=1e-5)  # interpolation to the native grid is the identity
    rn = fresh_backbone("resnet")
    assert rn.positional_embedding((3, 4)).shape == (1 + 12, 256)


@pytest.mark.parametrize("fmt", ["safetensors", "pt-state_dict", "memory-url"])
def test_weights_load_from_files_and_urls(tmp_path, fmt, monkeypatch):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where a remote file's local copy goes
    source = fresh_backbone("vit", seed=1)
    state = _state(source)
    if fmt == "safetensors":
        url = str(tmp_path / "w.safetensors")
        save_file(state, url)
    elif fmt == "pt-state_dict":
        url = str(tmp_path / "w.pt")
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, url)
    else:
        url = "memory://clipdense-test/weights/w.safetensors"
        local = tmp_path / "w.safetensors"
        save_file(state, str(local))
        with fsspec.open(url, "wb") as f:
            f.write(local.read_bytes())
    loaded = fresh_backbone("vit", seed=2, pretrained=url)
    assert loaded.pretrained == url and _same_weights(loaded, source)
    assert not _same_weights(fresh_backbone("vit", seed=2), source)
    assert list(scratch.iterdir()) == []  # a downloaded copy is removed once loaded


def _folder(tmp_path, meta: dict | None = None, seed: int = 3):
    folder = tmp_path / "mini-clip"
    folder.mkdir()
    (folder / "config.json").write_text(open(CONFIGS["vit"]).read())
    save_file(_state(fresh_backbone("vit", seed=seed)), str(folder / "weights.safetensors"))
    if meta is not None:
        (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def test_shipped_folder_layout_loads_weights_and_meta(tmp_path, monkeypatch):
    meta = {"background_offset": 0.05, "logit_scale": 55.0, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    folder = _folder(tmp_path, meta)
    by_path = load_backbone(ModelCfg(name=str(folder), precision="fp32"))
    assert by_path.name == "mini-clip" and by_path.meta == meta
    assert by_path.mean == (0.5, 0.5, 0.5) and by_path.std == (0.25, 0.25, 0.25)
    assert _same_weights(by_path, fresh_backbone("vit", seed=3))
    monkeypatch.setattr(backbone_mod, "SHIPPED_DIR", tmp_path)  # as if installed in pipeline/models/shipped/
    by_name = load_backbone(ModelCfg(name="mini-clip", precision="fp32"))
    assert _same_weights(by_name, by_path)
    random = load_backbone(ModelCfg(name="mini-clip", pretrained=RANDOM_INIT_WEIGHTS, precision="fp32", seed=9))
    assert not _same_weights(random, by_path) and random.meta == meta


def test_bad_names_and_weights_fail_with_a_reason(tmp_path):
    with pytest.raises(ValueError, match="unknown model 'no-such-model'"):
        load_backbone(ModelCfg(name="no-such-model"))
    with pytest.raises(FileNotFoundError, match="no such weights file"):
        load_backbone(ModelCfg(name=CONFIGS["vit"], pretrained=str(tmp_path / "missing.safetensors")))
    wrong = tmp_path / "rn.safetensors"
    save_file(_state(tiny_backbone("resnet")), str(wrong))
    with pytest.raises(ValueError, match="do not fit model tiny-vit"):
        load_backbone(ModelCfg(name=CONFIGS["vit"], pretrained=str(wrong)))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"embed_dim": 8}))
    with pytest.raises(ValueError, match="needs the keys"):
        load_backbone(ModelCfg(name=str(bad)))


def test_openai_weights_without_quickgelu_warn(tmp_path, caplog):
    weights = tmp_path / "openai-vit.safetensors"
    save_file(_state(tiny_backbone("vit")), str(weights))
    with caplog.at_level(logging.WARNING, logger="pipeline.models.backbone"):
        load_backbone(ModelCfg(name=CONFIGS["vit"], pretrained=str(weights), precision="fp32"))
    assert any("quick_gelu" in r.getMessage() for r in caplog.records)
    quick = tmp_path / "quick.json"
    quick.write_text(json.dumps({**json.loads(open(CONFIGS["vit"]).read()), "quick_gelu": True}))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.models.backbone"):
        load_backbone(ModelCfg(name=str(quick), pretrained=str(weights), precision="fp32"))
    assert not any("quick_gelu" in r.getMessage() for r in caplog.records)


def test_auto_precision_on_cpu_is_the_faster_by_a_probe_cached_per_machine(tmp_path, monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("CLIPDENSE_CACHE", str(tmp_path))
    _probe_cpu.cache_clear()
    try:
        rates = probe_cpu()
        assert set(rates) == {"fp32", "bf16"} and min(rates.values()) > 0
        cached = json.loads((tmp_path / "precision.json").read_text())
        assert list(cached.values()) == [rates]  # one entry: this machine, torch version and thread count
        assert resolve_dtype("auto", cpu) == (torch.bfloat16 if rates["bf16"] > 1.05 * rates["fp32"] else torch.float32)
        for measured, chosen in [
            ({"fp32": 30.0, "bf16": 90.0}, torch.bfloat16),
            ({"fp32": 30.0, "bf16": 31.0}, torch.float32),
        ]:
            (tmp_path / "precision.json").write_text(json.dumps({next(iter(cached)): measured}))
            _probe_cpu.cache_clear()
            assert resolve_dtype("auto", cpu) == chosen  # read from the cache, not measured again
            assert probe_cpu() == measured
    finally:
        _probe_cpu.cache_clear()


def test_device_and_dtype_resolution():
    cpu = torch.device("cpu")
    assert resolve_dtype("fp32", cpu) == torch.float32 and resolve_dtype("bf16", cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="model.precision 'fp64'"):
        resolve_dtype("fp64", cpu)
    assert resolve_device("cpu") == cpu
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda")
    bf16 = tiny_backbone("vit", "bf16")
    assert bf16.dtype == torch.bfloat16 and bf16.visual.conv1.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("head", ["maskclip", "clip", "sclip", "clearclip", "naclip", "clsclip"])
def test_bf16_labels_agree_with_fp32(head):
    """Casting the model to bf16 changes at most 2% of the pixel labels of the same model."""
    vocab = Vocabulary.from_entries(["red circle", "blue square", "green triangle", "yellow star", "purple cross"])
    cfg = load_config(None, [f"head.name={head}", "infer.short_side=128", "prompts.templates=single"])
    images = blocky_uint8(3, 128, 160, seed=4)
    labels = {
        p: np.concatenate(
            [r.labels.ravel() for r in DenseLabeler(cfg, vocab, backbone=tiny_backbone("vit", p))(images)]
        )
        for p in ("fp32", "bf16")
    }
    shares = np.bincount(labels["fp32"], minlength=len(vocab)) / labels["fp32"].size
    assert (shares > 0.05).sum() >= 3, f"degenerate labels, cannot compare: {shares}"
    assert (labels["fp32"] == labels["bf16"]).mean() >= 0.98


def test_random_init_is_the_same_in_every_process():
    """Each Ray actor builds its own model: without weights they must still agree."""
    cfg = ModelCfg(name=CONFIGS["vit"], pretrained=RANDOM_INIT_WEIGHTS, precision="fp32", device="cpu", seed=7)
    torch.manual_seed(123)
    first = load_backbone(cfg).model.state_dict()
    torch.manual_seed(456)
    second = load_backbone(cfg).model.state_dict()
    other = load_backbone(ModelCfg(name=CONFIGS["vit"], precision="fp32", device="cpu", seed=8)).model.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)

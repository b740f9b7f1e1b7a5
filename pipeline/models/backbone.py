"""Backbones: an open_clip CLIP model plus what the dense engine needs around it.

A model is named in `ModelCfg.name` as one of (first match wins):
- a shipped model, `pipeline/models/shipped/<name>/` (`config.json`, `weights.safetensors`, optional
  `meta.json`), whose own weights are used when `ModelCfg.pretrained` is empty;
- a model-config JSON (path or fsspec URL): an open_clip config dict (`embed_dim`, `vision_cfg`,
  `text_cfg`), bare or under a `model_cfg` key;
- an open_clip architecture (`open_clip.list_models()`, e.g. `ViT-B-16`, `RN50`), or `hf-hub:org/repo`;
- a folder (path or URL) laid out like a shipped model.

Weights (`ModelCfg.pretrained`) are an open_clip tag (downloaded by open_clip), or a local path or
fsspec URL of a `.safetensors` / `.pt` / `.bin` state dict or an open_clip checkpoint with a
`state_dict` key. Empty means random init, except for folders, which carry their weights;
`RANDOM_INIT_WEIGHTS` ("random") means random init for every model (the untrained baseline).

Positional embeddings are interpolated here (bicubic, on the parameter, cached per patch grid) so
any input size works without forking open_clip's forward.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from open_clip.pretrained import download_pretrained, get_pretrained_cfg
from open_clip.tokenizer import HFTokenizer, SimpleTokenizer
from open_clip.transformer import VisionTransformer
from torch import nn

from pipeline.config import ModelCfg
from pipeline.io import fs
from pipeline.models.precision import resolve_device, resolve_dtype

logger = logging.getLogger(__name__)

SHIPPED_DIR = Path(__file__).resolve().parent / "shipped"
RANDOM_INIT_WEIGHTS = "random"  # `ModelCfg.pretrained` value: random init even for a model that ships weights
_CONFIG_KEYS = ("embed_dim", "vision_cfg", "text_cfg")
_SCHEMAS = ("hf-hub:", "local-dir:")


@dataclass(eq=False)
class Backbone:
    """An open_clip model in eval mode on its device and dtype, with its tokenizer and preprocessing.

    `mean`/`std` normalise RGB images scaled to [0, 1]. `meta` holds the model's calibrated extras
    (`background_offset`, `logit_scale`, `templates`) when it ships them.
    """

    model: nn.Module
    tokenizer: Callable[[list[str]], torch.Tensor]
    name: str
    pretrained: str  # where the weights came from; "" = random init
    device: torch.device
    dtype: torch.dtype
    mean: tuple[float, float, float] = open_clip.OPENAI_DATASET_MEAN
    std: tuple[float, float, float] = open_clip.OPENAI_DATASET_STD
    meta: dict[str, Any] = field(default_factory=dict)
    folder: str = ""  # the model folder (shipped or a URL) the weights and meta.json came from; "" = none
    storage_options: dict[str, Any] | None = field(default=None, repr=False)  # to read more of `folder`
    kind: str = field(init=False)  # "vit" or "resnet", from the vision tower
    _pos_cache: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        visual = self.model.visual
        if isinstance(visual, VisionTransformer) and visual.attn_pool is None:
            self.kind = "vit"
        elif isinstance(visual, ModifiedResNet):
            self.kind = "resnet"
        else:
            raise ValueError(
                f"model {self.name!r}: its vision tower ({type(visual).__name__}) is not supported by the dense "
                "heads; use a ViT (open_clip VisionTransformer without attentional pooling) or a ModifiedResNet"
            )

    @property
    def visual(self) -> nn.Module:
        return self.model.visual

    @property
    def image_size(self) -> tuple[int, int]:
        size = self.visual.image_size
        return (size, size) if isinstance(size, int) else tuple(size)

    @property
    def stride(self) -> int:
        """Pixels per cell of the dense output grid: the patch size of a ViT, 32 for a ResNet."""
        return self.visual.patch_size[0] if self.kind == "vit" else 32

    @property
    def native_grid(self) -> tuple[int, int]:
        return tuple(s // self.stride for s in self.image_size)

    @property
    def embed_dim(self) -> int:
        return self.visual.output_dim

    def positional_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        """Positional embedding (1 + gh*gw, width) for a patch grid; the parameter itself at the native grid.

        For a ResNet this is the attention pool's embedding (1 + gh*gw, 32*width).
        """
        param = self.visual.positional_embedding if self.kind == "vit" else self.visual.attnpool.positional_embedding
        grid = tuple(grid)
        if grid == self.native_grid:
            return param
        if grid not in self._pos_cache:
            self._pos_cache[grid] = interpolate_pos_embed(param.detach(), self.native_grid, grid)
        return self._pos_cache[grid]

    @torch.inference_mode()
    def encode_text(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """L2-normalised text embeddings, (len(texts), embed_dim) float32."""
        out = []
        for i in range(0, len(texts), batch_size):
            tokens = self.tokenizer(texts[i : i + batch_size]).to(self.device)
            out.append(F.normalize(self.model.encode_text(tokens).float(), dim=-1))
        return torch.cat(out)


def interpolate_pos_embed(pos: torch.Tensor, src: tuple[int, int], dst: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize of a (1 + h*w, C) embedding whose first row is the [CLS] (or pooled) token."""
    prefix, grid = pos[:1], pos[1:]
    grid = grid.float().reshape(1, src[0], src[1], -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=dst, mode="bicubic", align_corners=False, antialias=True)
    grid = grid.permute(0, 2, 3, 1).reshape(dst[0] * dst[1], -1)
    return torch.cat([prefix, grid.to(pos.dtype)])


@dataclass(frozen=True)
class _Source:
    name: str  # display name
    config: dict[str, Any] | None  # open_clip model config; None for hf-hub/local-dir names
    folder: str = ""  # shipped-style folder holding weights.safetensors and meta.json
    builtin: bool = False  # an open_clip architecture name (pretrained tags apply)


def model_meta(name: str, storage_options: dict | None = None) -> dict[str, Any]:
    """The `meta.json` of the model folder `name` names (shipped or a path/URL), without building the
    model; {} for other models. Raises ValueError for a name that is no model (as `load_backbone`)."""
    return _folder_meta(_resolve_source(name, storage_options).folder, storage_options)


def _folder_meta(folder: str, storage_options: dict | None) -> dict[str, Any]:
    url = fs.join(folder, "meta.json") if folder else ""
    return dict(fs.read_json(url, storage_options)) if url and fs.exists(url, storage_options) else {}


def load_backbone(cfg: ModelCfg, storage_options: dict | None = None) -> Backbone:
    """Build the model named by `cfg`, load its weights, move and cast it (see module docstring)."""
    source = _resolve_source(cfg.name, storage_options)  # a bad name fails before the precision probe runs
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.precision, device)
    meta: dict[str, Any] = {}
    preprocess: dict[str, Any] = {}
    if source.config is None:
        # hf-hub: / local-dir: names carry their own config and weights; open_clip resolves both.
        weights = "" if cfg.pretrained == RANDOM_INIT_WEIGHTS else cfg.name
        with _seeded(cfg.seed):
            model = open_clip.create_model(cfg.name, load_weights=bool(weights))
        tokenizer = open_clip.get_tokenizer(cfg.name)
        preprocess = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    else:
        with _seeded(cfg.seed):
            model = _build_clip(source.config, source.name)
        tokenizer = open_clip.get_tokenizer(cfg.name) if source.builtin else _tokenizer(source.config)
        weights = cfg.pretrained or (fs.join(source.folder, "weights.safetensors") if source.folder else "")
        if weights == RANDOM_INIT_WEIGHTS:
            weights = ""
        meta = _folder_meta(source.folder, storage_options)
        if weights:
            preprocess = _load_weights(model, source, weights, storage_options)
        else:
            logger.warning("model %s: random init, no weights loaded", source.name)
        _check_quick_gelu(source, weights, preprocess)
    model = model.eval().requires_grad_(False).to(device=device, dtype=dtype)
    mean = tuple(meta.get("mean") or preprocess.get("mean") or open_clip.OPENAI_DATASET_MEAN)
    std = tuple(meta.get("std") or preprocess.get("std") or open_clip.OPENAI_DATASET_STD)
    logger.info("loaded %s (weights: %s) on %s as %s", source.name, weights or "random", device, dtype)
    return Backbone(
        model, tokenizer, source.name, weights, device, dtype, mean, std, meta, source.folder, storage_options
    )


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Build under `model.seed`, not the process's random state: a random-init model is then the
    same in every process (each Ray actor builds its own), so a random baseline labels a dataset
    consistently and reproducibly."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def model_config(name: str, storage_options: dict | None = None) -> dict[str, Any]:
    """The open_clip model config (`embed_dim`, `vision_cfg`, `text_cfg`) of a model name, as `load_backbone`
    resolves it (ValueError for hf-hub:/local-dir: names, whose config open_clip keeps to itself)."""
    config = _resolve_source(name, storage_options).config
    if config is None:
        raise ValueError(f"model {name!r}: its config is not readable here; name an open_clip architecture or a folder")
    return copy.deepcopy(config)


def _resolve_source(name: str, storage_options: dict | None) -> _Source:
    if not name:
        raise ValueError("model.name is empty: name a shipped model, a model-config JSON or an open_clip model")
    shipped = SHIPPED_DIR / name
    if "/" not in name and (shipped / "config.json").is_file():
        return _folder_source(str(shipped), name, storage_options)
    if name.startswith(_SCHEMAS):
        return _Source(name, None)
    if name.endswith(".json"):
        return _Source(Path(name.rstrip("/")).stem, _read_model_config(name, storage_options))
    builtin = open_clip.get_model_config(name)
    if builtin is not None:
        return _Source(name, builtin, builtin=True)
    if fs.exists(fs.join(name, "config.json"), storage_options):
        return _folder_source(name, Path(name.rstrip("/")).name, storage_options)
    shipped_names = sorted(p.parent.name for p in SHIPPED_DIR.glob("*/config.json"))
    raise ValueError(
        f"unknown model {name!r}: not a shipped model ({', '.join(shipped_names) or 'none installed'}), "
        "a model-config .json, an open_clip architecture (see open_clip.list_models()) or a model folder"
    )


def _folder_source(folder: str, name: str, storage_options: dict | None) -> _Source:
    return _Source(name, _read_model_config(fs.join(folder, "config.json"), storage_options), folder=folder)


def _read_model_config(url: str, storage_options: dict | None) -> dict[str, Any]:
    data = fs.read_json(url, storage_options)
    if isinstance(data, dict) and "model_cfg" in data:
        data = data["model_cfg"]
    if not isinstance(data, dict) or not all(key in data for key in _CONFIG_KEYS):
        raise ValueError(f"{url}: a model config needs the keys {', '.join(_CONFIG_KEYS)}")
    return data


def _build_clip(config: dict[str, Any], name: str) -> nn.Module:
    config = copy.deepcopy(config)
    if "multimodal_cfg" in config:
        raise ValueError(f"model {name!r} is a CoCa model; the dense heads need a plain CLIP model")
    text_cfg = config["text_cfg"]
    custom_text = config.pop("custom_text", False) or "hf_model_name" in text_cfg
    if "hf_model_name" in text_cfg:
        text_cfg["hf_model_pretrained"] = False  # the CLIP checkpoint holds the text weights
    cls = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    try:
        return cls(**config)
    except (TypeError, AssertionError, ValueError) as exc:
        raise ValueError(f"model config of {name!r} is invalid: {exc}") from None


def _tokenizer(config: dict[str, Any]) -> Callable[[list[str]], torch.Tensor]:
    text_cfg = config["text_cfg"]
    context_length = text_cfg.get("context_length", 77)
    kwargs = dict(text_cfg.get("tokenizer_kwargs") or {})
    if text_cfg.get("hf_tokenizer_name"):
        return HFTokenizer(text_cfg["hf_tokenizer_name"], context_length=context_length, **kwargs)
    return SimpleTokenizer(context_length=context_length, **kwargs)


def _load_weights(model: nn.Module, source: _Source, weights: str, storage_options: dict | None) -> dict:
    """Load `weights` into `model` (strict); return the tag's preprocessing config when it is a tag."""
    tag_cfg = get_pretrained_cfg(source.name, weights) if source.builtin else {}
    if not tag_cfg and source.builtin and "/" not in weights and "." not in weights:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(source.name)) or "none"
        raise ValueError(f"pretrained {weights!r} is not an open_clip tag of {source.name} (tags: {tags}) nor a file")
    checkpoint = (
        contextlib.nullcontext(download_pretrained(tag_cfg)) if tag_cfg else _local_copy(weights, storage_options)
    )
    with checkpoint as path:
        try:
            open_clip.load_checkpoint(model, path, strict=True)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise ValueError(f"weights {weights} do not fit model {source.name}: {first}") from None
    return tag_cfg


@contextlib.contextmanager
def _local_copy(url: str, storage_options: dict | None) -> Iterator[str]:
    """A local file holding `url` while the context lasts (a remote file is downloaded to a temporary
    folder, removed afterwards: a long-lived process such as a retrain step loads many models)."""
    fsys, path = fs.url_to_fs(url, storage_options)
    if not fsys.exists(path):
        raise FileNotFoundError(f"no such weights file: {url}")
    protocol = fsys.protocol if isinstance(fsys.protocol, str) else fsys.protocol[0]
    if protocol in ("file", "local"):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="clipdense-weights-") as folder:
        local = os.path.join(folder, os.path.basename(path))
        fsys.get(path, local)
        yield local


def _check_quick_gelu(source: _Source, weights: str, tag_cfg: dict) -> None:
    """OpenAI weights were trained with QuickGELU: a model without it runs, but its features are off."""
    quick = bool(source.config.get("quick_gelu", False))
    if tag_cfg:
        expected = bool(tag_cfg.get("quick_gelu", False))
    elif "openai" in weights.lower():
        expected = True
    else:
        return
    if expected != quick:
        if source.builtin:
            hint = f"use {source.name}-quickgelu" if expected else "use the architecture without -quickgelu"
        else:
            hint = f'set "quick_gelu": {str(expected).lower()} in its model config'
        logger.warning(
            "model %s has quick_gelu=%s but weights %s were trained with quick_gelu=%s; %s",
            source.name,
            quick,
            weights,
            expected,
            hint,
        )

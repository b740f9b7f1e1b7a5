"""Run configuration: frozen dataclasses loaded from YAML plus dotted `key=value` overrides.

Every job reads the same `RunCfg`, so a value set for `label` means the same thing in `segment`,
`eval` and the fine-tuning job. Unknown keys and wrong types fail before any work starts, with a
message naming the key and what it accepts: a typo in a config must never silently fall back to a
default on a thousand-GPU-hour run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

Precision = Literal["auto", "fp32", "bf16", "fp16"]
# Field metadata of list keys that refuse a plain string. Elsewhere a string stands for a one-element
# list (`input: s3://bkt/x.tar`); here "red circle, blue square" looks like a list and is one entry.
LIST_ONLY = {"list_only": True}


class ConfigError(ValueError):
    """A config key is unknown, has the wrong type, or an invalid value."""


@dataclass(frozen=True, slots=True)
class ModelCfg:
    name: str = "shapes-clip"  # open_clip architecture, path to a model-config JSON, or a shipped model name
    pretrained: str = ""  # open_clip tag, local path or fsspec URL of weights; "" = the shipped model's own
    precision: Precision = "auto"  # auto = bf16 on GPUs; on a CPU the faster of fp32 and bf16, measured
    device: str = "auto"  # auto = cuda when present, else cpu; or cpu, cuda, cuda:N
    seed: int = 0  # seed of the weights a model starts from before loading (decides random-init models)


@dataclass(frozen=True, slots=True)
class StudentCfg:
    """The options of a DenseCLIP student (`pipeline.models.student`): the fine-tune's `student` keys,
    saved in its exported folder's meta.json `student`. Defaults from the official DenseCLIP recipe,
    scaled down where they must fit a CPU. Here, not beside the model, so that configs load without torch."""

    n_contexts: int = 8  # learnable context vectors before each class name
    context_init: str = ""  # a phrase of n_contexts tokens they start from (e.g. "a photo of a"); "" = random
    dense: str = "attention"  # dense embedding path: attention (DenseCLIP) | value (MaskCLIP's, the teacher's)
    patch_stride: int = 0  # ViT: pixels between patches; 0 = the patch size, half of it = overlapping patches
    residual: bool = False  # the FPN's output is added to the dense CLIP embedding (zero at the start)
    decoder_width: int = 256  # context decoder width
    decoder_layers: int = 3
    decoder_heads: int = 4
    gamma_init: float = 1e-4  # initial scale of the context decoder's text update
    fpn_levels: Literal[2, 3, 4] = 4  # FPN levels decoded, finest dropped first: 4 = all (reference), 3 = 2x coarser
    fpn_width: int = 256  # semantic FPN neck channels
    fpn_head_width: int = 128  # semantic FPN head channels
    dropout: float = 0.1
    tau: float = 0.07  # temperature of the score map: its auxiliary loss, and its mix of text embeddings into the FPN


DEFAULT_HEAD = "maskclip"  # the head of models without one of their own (plain CLIP)


@dataclass(frozen=True, slots=True)
class HeadCfg:
    name: str | None = None  # a name from pipeline.models.heads.list_heads(); null or "" = the model's own
    #   head (a fine-tuned student's, named by its meta.json), else DEFAULT_HEAD
    options: dict[str, Any] = field(default_factory=dict)  # keyword options of that head (e.g. ks_thresh)


@dataclass(frozen=True, slots=True)
class VocabCfg:
    # One entry per class; "tv, monitor" = synonyms. A list only: the string "cat, dog" would be one class.
    classes: list[str] = field(default_factory=list, metadata=LIST_ONLY)
    file: str = ""  # vocabulary file (vocabulary.json or one class per line); "" = beside the input shards
    background: list[str] = field(default_factory=list, metadata=LIST_ONLY)  # words for an explicit background class
    background_threshold: float = 0.0  # > 0: pixels whose best class probability is below become background
    background_offset: float = 0.0  # added to the background logit (calibrated per model)


@dataclass(frozen=True, slots=True)
class PromptCfg:
    templates: str = "openai80"  # openai80 | maskclip85 | single | path or URL of a file, one template per line


@dataclass(frozen=True, slots=True)
class InferCfg:
    short_side: int = 0  # resize so the short side is this many pixels; 0 = the model's input size
    crop: int = 0  # sliding-window crop in pixels; 0 = whole image in one pass
    stride: int = 0  # sliding-window stride; 0 = crop // 2
    shifts: int | None = None  # n > 1: also run every window shifted by multiples of patch/n pixels
    #   (n x n passes, a map on an n-times finer grid); null = the model's recommendation, else 1
    batch_size: int = 16  # images per forward batch (all their windows run together)
    logit_scale: float = 40.0  # temperature of the softmax that turns cosine scores into probabilities
    conf_threshold: float = 0.0  # pixels whose max class probability is below become ignore
    pamr_steps: int | None = None  # pixel-adaptive mask refinement iterations on the upsampled logits;
    #   0 = off; null = the model's recommendation, else 0


@dataclass(frozen=True, slots=True)
class ZoomCfg:
    enabled: bool = False  # re-infer small or uncertain regions at higher resolution
    max_regions: int = 4  # per-image budget of crops
    min_area: float = 0.03  # components below this fraction of the image are proposed
    min_confidence: float = 0.3  # components with mean confidence below this are proposed (and are never protected)
    margin: float = 1.0  # grow each proposal by this fraction of its size on every side (CLIP needs context)
    use_boxes: bool = True  # also propose the `boxes` of the sample's json
    grid: int = 0  # > 0: also propose a fixed grid of grid x grid tiles
    merge_iou: float = 0.5  # proposals overlapping more than this are merged
    blend: Literal["confidence", "replace"] = "confidence"  # how crop logits go back into the image
    protect: bool = True  # crops leave the first pass's large, confident objects alone


@dataclass(frozen=True, slots=True)
class DistributeCfg:
    address: str = ""  # Ray address to join; "" = start an embedded local Ray instance
    num_actors: int = 0  # 0 = one per GPU, else one per `num_cpus` CPUs of the cluster
    num_cpus: float = 1.0  # CPUs per actor
    num_gpus: float = -1.0  # GPUs per actor; -1 = 1 when the cluster has GPUs, else 0
    max_retries: int = 2  # attempts after the first before a shard is recorded as failed
    read_retry_s: float = 60.0  # seconds a failing read of an input shard is resumed before the attempt fails
    max_pixels: int = 100_000_000  # images with more pixels are recorded as failed, never decoded
    prefetch: int = 2  # batches each actor decodes ahead of the model (and may write behind it)
    log_interval: float = 30.0  # seconds between progress log lines when the output is not a terminal


@dataclass(frozen=True, slots=True)
class RunCfg:
    input: list[str] = field(default_factory=list)  # shard URLs, brace patterns, globs or folders
    output: str = ""  # output URL (FORMAT.md layout)
    # fsspec options (endpoint_url, profile, ...); may hold credentials, so never in a repr
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)
    model: ModelCfg = field(default_factory=ModelCfg)
    head: HeadCfg = field(default_factory=HeadCfg)
    vocab: VocabCfg = field(default_factory=VocabCfg)
    prompts: PromptCfg = field(default_factory=PromptCfg)
    infer: InferCfg = field(default_factory=InferCfg)
    zoom: ZoomCfg = field(default_factory=ZoomCfg)
    distribute: DistributeCfg = field(default_factory=DistributeCfg)


# Keys that change how a run executes but never what it writes: a resume may differ in them.
EXECUTION_KEYS = ("output", "storage_options", "distribute")


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = (), cls: type = RunCfg) -> Any:
    """Build a config from an optional YAML file, then `a.b=value` overrides (values parsed as YAML)."""
    data: dict[str, Any] = {}
    if path:
        from pipeline.io.fs import read_text

        loaded = _yaml(read_text(path), path) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a config file must be a mapping of keys, got {type(loaded).__name__}")
        data = loaded
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        hint = f" (a list is [a, b]; a string that starts with {{ or [ needs quotes: {key}='\"{raw}\"')"
        _set_dotted(data, key.strip(), _yaml(raw, f"override {item!r}", hint) if raw.strip() else "")
    return from_dict(cls, data)


def _yaml(text: str, where: str, hint: str = "") -> Any:
    """Parsed YAML; a syntax error is a ConfigError on one line naming `where` and the position."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ConfigError(f"{where}: not valid YAML{at}: {problem}{hint}") from None


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass `cls` from plain data, rejecting unknown keys and mistyped values."""
    if dataclasses.is_dataclass(data) and isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping of {cls.__name__} keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in known:
            raise ConfigError(f"unknown config key {_join(where, key)!r}; allowed keys: {', '.join(known)}")
    for f in dataclasses.fields(cls):
        if f.metadata.get("list_only") and isinstance(data.get(f.name), str):
            raise ConfigError(_string_for_list(_join(where, f.name), data[f.name]))
    kwargs = {key: _coerce(hints[key], value, _join(where, key)) for key, value in data.items()}
    return cls(**kwargs)


def _string_for_list(key: str, value: str) -> str:
    parts = [p.strip() for p in value.split(",") if p.strip()]
    listed = ", ".join(f'"{p}"' if ":" in p else p for p in parts)
    fix = f"{key}='[{listed}]' (in YAML: {key.rsplit('.', 1)[-1]}: [{listed}])"
    if len(parts) < 2:
        return f"{key}: got the string {value!r}, expected a list: write {fix}"
    return (
        f"{key}: got the string {value!r}, expected a list. For {len(parts)} entries write {fix}; "
        f"for one entry whose names are synonyms, {key}='[\"{value}\"]'"
    )


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else str(key)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value if value is not None else {}, where)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if not any(value == a and type(value) is type(a) for a in allowed):  # 3.0 is not 3, nor True 1
            raise ConfigError(f"{where}: {value!r} is not allowed; choose one of {', '.join(map(str, allowed))}")
        return value
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(tp):
            try:
                return _coerce(arm, value, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} matches none of {tp}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str) and item_tp is str:
            return [value] if value else []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(item_tp, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{where}: expected null, got {value!r}")
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is float:
        number = value
        if isinstance(value, str):  # YAML 1.1 (PyYAML) reads exponents without a dot, 1e-4, as text
            try:
                number = float(value)
            except ValueError:
                raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(number):  # YAML's .nan / .inf too: no key means anything by them
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return float(number)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected a whole number, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{where}: unsupported config type {tp}")


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config (YAML- and JSON-ready)."""
    return dataclasses.asdict(cfg)


# Entries of a `storage_options` mapping whose name holds one of these words are credentials.
_SECRET = re.compile(r"key|secret|token|password|credential|session", re.IGNORECASE)
REDACTED = "***"


def without_secrets(data: Any, mask: str | None = None) -> Any:
    """`data` (plain nested dicts and lists) with the credentials of every `storage_options` mapping
    in it, at any depth, replaced by `mask`, or dropped when `mask` is None."""
    if isinstance(data, list):
        return [without_secrets(v, mask) for v in data]
    if not isinstance(data, dict):
        return data
    return {k: hide_secrets(v, mask) if k == "storage_options" else without_secrets(v, mask) for k, v in data.items()}


def hide_secrets(options: Any, mask: str | None = None) -> Any:
    """Storage options with every credential entry (nested ones too) replaced by `mask`, or dropped."""
    if not isinstance(options, dict):
        return options
    hidden = {}
    for key, value in options.items():
        if not _SECRET.search(str(key)):
            hidden[key] = hide_secrets(value, mask)
        elif mask is not None:
            hidden[key] = mask
    return hidden


def dump_yaml(cfg: Any) -> str:
    """YAML of a config, credentials shown as `***` (what `config show` prints; files drop them)."""
    return yaml.safe_dump(without_secrets(to_dict(cfg), REDACTED), sort_keys=False)


def hashed_fields(cfg: RunCfg) -> dict[str, Any]:
    """What `config_hash` hashes: the config without `EXECUTION_KEYS`, an unset head as `DEFAULT_HEAD`."""
    data = {k: v for k, v in to_dict(cfg).items() if k not in EXECUTION_KEYS}
    if not data["head"]["name"]:
        # Unnamed and DEFAULT_HEAD label alike (a model with a head of its own refuses any other), and
        # outputs written while DEFAULT_HEAD was the default keep their hash, so they still resume.
        data["head"]["name"] = DEFAULT_HEAD
    return data


def config_hash(cfg: RunCfg) -> str:
    """Hash of everything that decides what a run writes (input, model, head, vocabulary, ...)."""
    return hashlib.sha256(json.dumps(hashed_fields(cfg), sort_keys=True, default=str).encode()).hexdigest()[:16]


def diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two configs (or two nested dicts)."""
    da = to_dict(a) if dataclasses.is_dataclass(a) else a
    db = to_dict(b) if dataclasses.is_dataclass(b) else b
    keys = sorted(set(da) | set(db))
    out: list[str] = []
    for key in keys:
        va, vb = da.get(key), db.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += diff_keys(va, vb, _join(prefix, key))
        elif va != vb:
            out.append(_join(prefix, key))
    return out

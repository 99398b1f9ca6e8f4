"""Typed configuration: the single source of truth for a run.

One tree of dataclasses, filled from a YAML file plus ``key=value`` overrides. The same tree is what
``cacr train --help`` lists, what Ray Tune samples over (dotted keys) and what a checkpoint records.
Unknown keys, wrong types and impossible values raise :class:`ConfigError` with the dotted key in the
message, before Ray starts.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from cacr.archs import ARCHS, HEADS, NORMS
from cacr.augment_config import AugmentConfig
from pipeline.errors import CacrError


class ConfigError(CacrError, ValueError):
    """A user mistake in a config file or override; the message names the key."""


def _choice(default: str, choices: tuple[str, ...], help: str) -> Any:
    return field(default=default, metadata={"choices": choices, "help": help})


def _f(default: Any, help: str) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class StorageConfig:
    """How to reach object storage. Credentials are NOT config: they come from the standard AWS
    variables, shared config/credentials files, or the instance profile, and are never logged."""

    endpoint_url: str | None = _f(None, "S3 endpoint for MinIO-style stores (else AWS_ENDPOINT_URL / AWS)")
    region: str | None = _f(None, "S3 region (else AWS_REGION / AWS_DEFAULT_REGION / profile)")
    profile: str | None = _f(None, "named AWS profile from ~/.aws/config")
    anonymous: bool = _f(False, "unsigned requests, for public buckets")
    retry_deadline_s: float = _f(120.0, "an S3 request that gets no answer (endpoint down) or a "
                                        "5xx is retried with backoff for this long, then fails")


@dataclass
class DataConfig:
    # str | list: a YAML list of shard URLs is joined with '::' by Config.validate (always a str after).
    url: str | list[str] = _f(
        "./data/digits", "the training shards: a folder (local dir or s3://bucket/prefix) written by "
        "`cacr prepare` or holding any .tar shards, or shard URLs with brace patterns, joined by "
        "'::' or as a YAML list (s3://b/imagenet1k-train-{0000..1023}.tar)")
    val_url: str | list[str] | None = _f(
        None, "labelled shards for the kNN monitor (and `cacr evaluate`), given like data.url; "
        "unset: the data.val_split split under data.url")
    label_key: str | None = _f(
        None, "labels from this field of each sample's .json member (dotted for nested: meta.label); "
        "unset: from the .cls member; a set with neither is unlabelled (no kNN monitor)")
    source: str | None = _f(
        "auto", "if `url` holds no shards yet, `cacr train` prepares them from this source first "
        "(digits | image folder | cifar10:PATH). auto: only the default url ./data/digits is "
        "prepared, from digits; any other url must already hold shards (`cacr prepare`). "
        "null: never prepare")
    image_size: int = _f(32, "decoded image size (square, uint8) handed to the train workers")
    val_split: str = _f("val", "split used for kNN monitoring; '' to disable")
    knn_k: int = _f(20, "neighbours for the per-epoch kNN monitor")
    decode_num_cpus: float = _f(1.0, "logical CPUs per Ray Data decode task (fractions start more "
                                     "decode processes than Ray keeps alive between epochs)")
    data_resource: str | None = _f(
        None, "custom Ray resource that decode tasks require (pin decoding to CPU-only data nodes)")
    decode: str = _choice("cpu_tasks", ("cpu_tasks", "worker"),
                          "where images are decoded: Ray Data CPU tasks, or the train worker's device "
                          "(torchvision decode_jpeg; nvjpeg on a GPU) from the encoded bytes")
    cache_budget_mb: float = _f(1024.0, "materialise the train set once in the object store when it "
                                        "fits this many MB (decoded, or encoded with decode=worker) "
                                        "and shuffle its samples per epoch: no per-epoch Ray Data "
                                        "start-up; 0 = stream every epoch")
    imbalance: str | None = _f(
        None, "long-tail profile of the training split when `cacr train` prepares the shards "
              "(exp:R | linear:R | linear | none; see `cacr prepare --imbalance`)")


@dataclass
class ModelConfig:
    arch: str = _choice("narrow_resnet", ARCHS, "encoder architecture (cacr.archs.ARCHS)")
    small_images: bool = _f(True, "small-image stem: 3x3 stride-1 conv, no max-pool")
    width: int = _f(16, "base width of narrow_resnet")
    norm: str = _choice("batch", NORMS, "normalisation layers of the encoder")
    head_hidden: int = _f(512, "hidden width of the projection head")
    head_out: int = _f(128, "embedding dimension D")
    head_layers: int = _f(2, "layers of the projection head (1 = linear)")
    sync_batchnorm: bool = _f(False, "SyncBatchNorm across workers")
    head: str = _choice("mlp", HEADS, "heads: mlp (the symmetric loss's projection head) | moco "
                        "(projector + predictor of the momentum setup, cacr.heads; needed by cacr_moco)")
    predictor_hidden: int = _f(4096, "hidden width of the predictor (model.head=moco)")
    freeze_patch_embed: bool = _f(False, "ViT: freeze the patch projection (stop-grad conv1)")
    zero_init_residual: bool = _f(True, "ResNet in cacr_moco: zero-init the last BN of each residual block")
    vit_depth: int = _f(0, "ViT blocks (0: the arch's 12; smaller only for tests / benchmarks)")


#: ``loss.name`` choices (methods registered in cacr.methods; cacr_queue is the queue setup's slot)
LOSS_NAMES = ("cacr", "infonce", "cacr_moco", "cacr_queue")


@dataclass
class MomentumConfig:
    """Momentum (EMA) target network of ``loss.name=cacr_moco``."""

    base: float = _f(0.99, "m0: EMA momentum at the start (authors: 0.996 ResNet-50, 0.99 ViT)")
    cosine: bool = _f(True, "cosine schedule m = 1 - (1 + cos(pi t)) (1 - m0) / 2, t = progress, to 1")


@dataclass
class LossConfig:
    name: str = _choice("cacr", LOSS_NAMES, "method: symmetric CACR, the InfoNCE baseline, or "
                        "momentum-encoder CACR (cacr_moco)")
    num_positives: int = _f(4, "K, positive views per query; V = K + 1 views per image")
    alpha: float = _f(1.0, "weight of contrastive attraction")
    beta: float = _f(1.0, "weight of contrastive repulsion")
    tau_pos: float = _f(1.0, "attraction sharpness tau+ (multiplies the distance)")
    tau_neg: float = _f(0.9, "repulsion sharpness tau- (0.9 CIFAR-10-like, 2.0 CIFAR-100 / STL-10)")
    detach_weights: bool = _f(False, "stop gradients through the attraction/repulsion weights")
    same_view_negatives: bool = _f(False, "also use same-view views of other images as negatives")
    temperature: float = _f(0.2, "temperature of infonce and cacr_moco (authors: 1.0 ResNet-50, 0.2 ViT)")
    targets: str = _choice("light", ("light", "full"), "cacr_moco targets: light = the 2 global crops, "
                           "full = every view")
    queue_size: int = _f(65536, "cacr_queue: keys kept in the queue (M); negatives of every query")
    queue_momentum: float = _f(0.999, "cacr_queue: constant EMA momentum m of the key encoder")
    queue_bn_splits: int = _f(4, "cacr_queue: key-encoder shuffle-BN sub-batches per worker (1: off)")


@dataclass
class OptimConfig:
    name: str = _choice("sgd", ("sgd", "lars", "adamw"), "optimiser")
    base_lr: float = _f(0.12, "learning rate per 256 images of global batch (lr = base_lr * N / 256)")
    momentum: float = _f(0.9, "SGD/LARS momentum")
    weight_decay: float = _f(1e-4, "weight decay")
    warmup_epochs: float = _f(1.0, "linear warm-up length, then cosine decay by step")
    min_lr_ratio: float = _f(0.0, "final lr as a fraction of the peak")


@dataclass
class CheckpointConfig:
    every_steps: int = _f(0, "also checkpoint every N global steps inside an epoch (0: at epoch ends "
                             "only); a resume continues at the exact sample where it was taken")


@dataclass
class Config:
    """A training run. Dotted keys (``optim.base_lr``) address nested fields."""

    name: str | None = _f(None, "run name; re-running with the same name resumes it (default: timestamped)")
    storage_path: str = _f("./runs", "where runs live: checkpoints, TensorBoard, exports (local or s3://)")
    epochs: int = _f(12, "passes over the training shards")
    batch_size: int = _f(128, "images per worker per step (global batch N = batch_size * num_workers)")
    num_workers: int = _f(2, "Ray Train workers (data-parallel)")
    use_gpu: bool = _f(False, "one GPU per worker (bf16 autocast, nccl)")
    cpus_per_worker: float = _f(1.0, "logical CPUs reserved by each train worker")
    torch_threads: int = _f(0, "intra-op threads per worker (0: cores / workers)")
    seed: int = _f(0, "seed for shard order, augmentation and initialisation")
    channels_last: bool = _f(True, "channels_last memory format (on the CPU not for nets with a "
                                   "strided 1x1 conv of < 8 channels: a torch CPU bug)")
    keep_checkpoints: int = _f(2, "checkpoints kept (newest)")
    max_failures: int = _f(2, "worker-group restarts from the last checkpoint before the run fails")
    log_every_steps: int = _f(10, "TensorBoard scalar interval (steps)")
    log_level: str = _choice("warning", ("debug", "info", "warning", "error"),
                             "console level of Ray Train's and Ray Data's own logs (info: every "
                             "report, checkpoint and dataset execution)")
    trace_ids_dir: str | None = _f(None, "debug: each worker appends the sample ids of every step it "
                                         "trains to a file here (tests the exactly-once resume)")
    fail_at_step: int | None = _f(None, "debug: raise once in the last worker (rank num_workers - 1) at "
                                       "this global step (tests recovery)")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    # The embedded default trains on digits: no mirror flips (a flipped digit is another glyph)
    # and milder crops than the paper's CIFAR recipe (AugmentConfig() is that recipe, unchanged).
    augment: AugmentConfig = field(default_factory=lambda: AugmentConfig(scale=(0.4, 1.0), flip_p=0.0))
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    momentum: MomentumConfig = field(default_factory=MomentumConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def validate(self) -> "Config":
        from pipeline.data.urls import join

        for key in ("url", "val_url"):  # a YAML list of shard URLs -> one '::'-joined value
            if isinstance(getattr(self.data, key), (list, tuple)):
                setattr(self.data, key, join(getattr(self.data, key)))
        _check_tree(self, "")
        checks = [
            ("epochs", self.epochs >= 1, "must be >= 1"),
            ("batch_size", self.batch_size >= 2, "must be >= 2 (negatives need other images)"),
            ("num_workers", self.num_workers >= 1, "must be >= 1"),
            ("cpus_per_worker", self.cpus_per_worker > 0, "must be > 0"),
            ("keep_checkpoints", self.keep_checkpoints >= 1, "must be >= 1"),
            ("checkpoint.every_steps", self.checkpoint.every_steps >= 0, "must be >= 0 (0: per epoch)"),
            ("max_failures", self.max_failures >= 0, "must be >= 0"),
            ("log_every_steps", self.log_every_steps >= 1, "must be >= 1"),
            ("torch_threads", self.torch_threads >= 0, "must be >= 0"),
            ("data.image_size", self.data.image_size >= 8, "must be >= 8"),
            ("data.knn_k", self.data.knn_k >= 1, "must be >= 1"),
            ("data.decode_num_cpus", self.data.decode_num_cpus > 0, "must be > 0"),
            ("data.url", bool(str(self.data.url).strip()), "must name a folder or shard URLs"),
            ("data.label_key", self.data.label_key is None or bool(re.fullmatch(
                r"[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*", self.data.label_key)),
             "must be a JSON field name (dotted for nested fields), or null for .cls labels"),
            ("model.width", self.model.width >= 4, "must be >= 4"),
            ("model.head_out", self.model.head_out >= 2, "must be >= 2"),
            ("model.head_hidden", self.model.head_hidden >= 1, "must be >= 1"),
            ("model.head_layers", self.model.head_layers >= 1, "must be >= 1"),
            ("loss.num_positives", self.loss.num_positives >= 1, "must be >= 1 (V = K + 1 >= 2 views)"),
            ("loss.alpha", self.loss.alpha >= 0, "must be >= 0"),
            ("loss.beta", self.loss.beta >= 0, "must be >= 0"),
            ("loss.tau_pos", self.loss.tau_pos >= 0, "must be >= 0"),
            ("loss.tau_neg", self.loss.tau_neg >= 0, "must be >= 0"),
            ("loss.temperature", self.loss.temperature > 0, "must be > 0"),
            ("optim.base_lr", self.optim.base_lr > 0, "must be > 0"),
            ("optim.momentum", 0 <= self.optim.momentum < 1, "must be in [0, 1)"),
            ("optim.weight_decay", self.optim.weight_decay >= 0, "must be >= 0"),
            ("optim.warmup_epochs", 0 <= self.optim.warmup_epochs <= self.epochs,
             "must be in [0, epochs]"),
            ("optim.min_lr_ratio", 0 <= self.optim.min_lr_ratio <= 1, "must be in [0, 1]"),
            ("momentum.base", 0 <= self.momentum.base <= 1, "must be in [0, 1]"),
            ("model.predictor_hidden", self.model.predictor_hidden >= 1, "must be >= 1"),
            ("model.vit_depth", self.model.vit_depth >= 0, "must be >= 0 (0: the arch's depth)"),
            ("model.head", self.loss.name != "cacr_moco" or self.model.head == "moco",
             "loss.name=cacr_moco needs model.head=moco"),
            ("data.cache_budget_mb", self.data.cache_budget_mb >= 0, "must be >= 0 (0 = never cache)"),
            ("storage.retry_deadline_s", self.storage.retry_deadline_s >= 0, "must be >= 0 (0 = no retries)"),
        ]
        for key, ok, msg in checks:
            if not ok:
                raise ConfigError(f"config key '{key}' = {get_key(self, key)!r}: {msg}")
        if self.augment.crop_size > self.data.image_size:
            raise ConfigError(f"config key 'augment.crop_size' = {self.augment.crop_size}: must be <= "
                              f"data.image_size ({self.data.image_size})")
        try:
            self.augment.validate()
        except ValueError as e:
            raise ConfigError(f"config key 'augment': {e}") from None
        if self.fail_at_step is not None and self.fail_at_step < 1:
            raise ConfigError(f"config key 'fail_at_step' = {self.fail_at_step}: must be >= 1 or null")
        self._validate_longtail()
        return self

    def _validate_longtail(self) -> None:
        """data.imbalance parses; the queue holds at least one key and m is a proper momentum."""
        from pipeline.data.imbalance import parse_profile

        try:
            parse_profile(self.data.imbalance)
        except ValueError as e:
            raise ConfigError(f"config key 'data.imbalance': {e}") from None
        if self.loss.queue_size < 1:
            raise ConfigError(f"config key 'loss.queue_size' = {self.loss.queue_size}: must be >= 1")
        if self.loss.queue_bn_splits < 1:
            raise ConfigError(f"config key 'loss.queue_bn_splits' = {self.loss.queue_bn_splits}: must be >= 1")
        if not 0 <= self.loss.queue_momentum < 1:
            raise ConfigError(f"config key 'loss.queue_momentum' = {self.loss.queue_momentum}: "
                              "must be in [0, 1)")

    @property
    def num_views(self) -> int:
        return self.loss.num_positives + 1

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.num_workers


# ---------------------------------------------------------------------------------------------
# Typed (de)serialisation

def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert one leaf value against its annotated type; raise ConfigError naming key."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"config key '{key}': bad value {value!r}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' = {value!r}: expected a list like [a, b]")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"config key '{key}' = {value!r}: expected {len(args)} values")
            return tuple(_coerce(v, a, key) for v, a in zip(value, args))
        inner = args[0] if args else Any
        out = [_coerce(v, inner, key) for v in value]
        return tuple(out) if origin is tuple else out
    if tp is Any:
        return value
    if tp is dict or origin is dict:
        if isinstance(value, dict):
            return value
        raise ConfigError(f"config key '{key}' = {value!r}: expected a mapping")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' = {value!r}: expected true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"config key '{key}' = {value!r}: expected an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"config key '{key}' = {value!r}: expected a number")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key '{key}' = {value!r}: expected a string")
    raise ConfigError(f"config key '{key}': unsupported type {tp}")


def leaf_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted leaf key of dataclass ``cls`` (``optim.base_lr``, ``augment.scale``, ...)."""
    out = []
    hints = _field_types(cls)
    for f in dataclasses.fields(cls):
        if _is_dataclass_type(hints[f.name]):
            out.extend(leaf_keys(hints[f.name], prefix + f.name + "."))
        else:
            out.append(prefix + f.name)
    return out


def suggest_key(key: str, known: list[str]) -> str | None:
    """The known dotted key the user most likely meant: same leaf in another section
    (``base_lr`` -> ``optim.base_lr``), else the closest spelling of the whole key or its leaf."""
    leaf = key.rsplit(".", 1)[-1]
    same_leaf = [k for k in known if k.rsplit(".", 1)[-1] == leaf]
    if same_leaf:
        return (difflib.get_close_matches(key, same_leaf, n=1, cutoff=0) or same_leaf)[0]
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
    if close:
        return close[0]
    by_leaf = {}
    for k in known:
        by_leaf.setdefault(k.rsplit(".", 1)[-1], k)
    close = difflib.get_close_matches(leaf, list(by_leaf), n=1)
    return by_leaf[close[0]] if close else None


def _unknown(key: str, root: type | None = None, what: str = "config key",
             help_cmd: str = "cacr train --help") -> ConfigError:
    close = suggest_key(key, leaf_keys(root or Config))
    hint = f" (did you mean '{close}'?)" if close else ""
    return ConfigError(f"unknown {what} '{key}'{hint}; `{help_cmd}` lists the keys")


def from_dict(cls: type, data: dict[str, Any] | None, prefix: str = "", root: type | None = None) -> Any:
    """Build dataclass ``cls`` from a nested dict, checking every key and type. ``root``: the
    class of the whole tree (for "did you mean" across sections; default ``cls``)."""
    root = root or cls
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.') or '<root>'}': expected a mapping, got {data!r}")
    hints = _field_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        if k not in hints or k not in names:
            raise _unknown(prefix + str(k), root)
        tp = hints[k]
        if _is_dataclass_type(tp):
            kwargs[k] = from_dict(tp, v, prefix + k + ".", root)
        else:
            kwargs[k] = _coerce(v, tp, prefix + k)
    return cls(**kwargs)


def to_dict(obj: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) — YAML/JSON friendly and round-trips via from_dict."""
    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        return v
    return conv(obj)


def _check_tree(obj: Any, prefix: str) -> None:
    """Re-check types of a tree built in code (e.g. by Tune sampling) and check choices."""
    hints = _field_types(type(obj))
    for f in dataclasses.fields(obj):
        key = prefix + f.name
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            _check_tree(v, key + ".")
            continue
        setattr(obj, f.name, _coerce(v, hints[f.name], key))
        choices = f.metadata.get("choices")
        if choices and v not in choices:
            raise ConfigError(f"config key '{key}' = {v!r}: must be one of {', '.join(choices)}")


def get_key(cfg: Any, key: str) -> Any:
    obj = cfg
    for part in key.split("."):
        if not dataclasses.is_dataclass(obj) or part not in {f.name for f in dataclasses.fields(obj)}:
            raise _unknown(key, type(cfg))
        obj = getattr(obj, part)
    return obj


def set_key(cfg: Any, key: str, value: Any) -> None:
    """Set a dotted key with type checking (the value may be a YAML-ish string or a Python value)."""
    parts = key.split(".")
    obj = cfg
    for i, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(obj)]
        if part not in names:
            raise _unknown(key, type(cfg))
        if i == len(parts) - 1:
            tp = _field_types(type(obj))[part]
            if _is_dataclass_type(tp):
                if not isinstance(value, dict):
                    raise ConfigError(f"config key '{key}' is a section; set its fields ('{key}.<field>')")
                setattr(obj, part, from_dict(tp, {**to_dict(getattr(obj, part)), **value}, key + ".",
                                             type(cfg)))
            else:
                setattr(obj, part, _coerce(value, tp, key))
        else:
            obj = getattr(obj, part)
            if not dataclasses.is_dataclass(obj):
                raise ConfigError(f"config key '{'.'.join(parts[:i + 1])}' is not a section")


def parse_override(text: str) -> tuple[str, Any]:
    """``a.b=value`` -> (key, value parsed as YAML: numbers, true/false, null, [lists])."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def load_yaml(path: str | Path, storage: StorageConfig | None = None) -> dict[str, Any]:
    """A YAML mapping from a local file or an ``s3://`` URL (``storage``: how to reach it).
    Syntax errors name ``file:line:column``."""
    from pipeline import storage as st

    path = str(path)
    text = st.read_text(path, storage)
    if text is None:
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else path
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config file {where}: not valid YAML ({problem})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of keys")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                cls: type = None) -> Config:
    """YAML file (optional) + ``key=value`` overrides -> validated :class:`Config`."""
    cls = cls or Config
    parsed = [parse_override(ov) for ov in overrides]
    data = {}
    if path:
        # A config on s3:// is read with the storage.* overrides given next to it (else the env).
        reach = StorageConfig()
        for k, v in parsed:
            if k.startswith("storage."):
                set_key(reach, k[len("storage."):], v)
        data = load_yaml(path, reach)
    cfg = from_dict(cls, data)
    for k, v in parsed:
        set_key(cfg, k, v)
    return cfg.validate()


def apply_flat(cfg: Config, flat: dict[str, Any]) -> Config:
    """Copy of ``cfg`` with dotted keys set (Tune's sampled values), validated."""
    new = from_dict(type(cfg), to_dict(cfg))
    for k, v in flat.items():
        set_key(new, k, v)
    return new.validate()


# Help for the augment.* keys: cacr/augment_config.py is plain data without field metadata; a
# field's own ``metadata["help"]`` wins when it has one.
AUGMENT_HELP = {
    "crop_size": "side of each random-resized crop (px); also the eval center crop",
    "scale": "random-resized-crop area range, as fractions of the image",
    "ratio": "random-resized-crop aspect-ratio range",
    "flip_p": "probability of a horizontal flip",
    "jitter_p": "probability of colour jitter",
    "brightness": "colour-jitter brightness strength",
    "contrast": "colour-jitter contrast strength",
    "saturation": "colour-jitter saturation strength",
    "hue": "colour-jitter hue strength (<= 0.5)",
    "jitter_random_order": "apply the four jitter operations in a random order",
    "grayscale_p": "probability of converting a view to grayscale",
    "blur_p": "probability of Gaussian blur",
    "blur_sigma": "Gaussian-blur sigma range (px)",
    "blur_kernel_size": "Gaussian-blur kernel size (0: ~10% of crop_size, odd, >= 3)",
    "solarize_p": "probability of solarization",
    "solarize_threshold": "solarization threshold (fraction of full scale)",
    "antialias": "antialiased resizing in the crop",
    "mean": "per-channel normalisation mean (RGB)",
    "std": "per-channel normalisation std (RGB)",
}


def _help_of(f: dataclasses.Field, owner: type) -> str:
    help_ = f.metadata.get("help")
    if help_ is None and owner is AugmentConfig:
        help_ = AUGMENT_HELP.get(f.name, "")
    return help_ or ""


def describe_keys(cls: type = Config, prefix: str = "", inst: Any = None) -> list[tuple[str, str, str]]:
    """(dotted key, default, help) for every leaf, for ``--help``. Defaults are those of a
    ``cls()`` tree as a whole (a section's default inside ``Config`` may differ from the
    section class's own, e.g. ``augment``)."""
    rows = []
    inst = cls() if inst is None else inst
    for f in dataclasses.fields(inst):
        v = getattr(inst, f.name)
        if dataclasses.is_dataclass(v):
            rows.extend(describe_keys(type(v), prefix + f.name + ".", v))
        else:
            help_ = _help_of(f, type(inst))
            if f.metadata.get("choices"):
                help_ += f" [{' | '.join(f.metadata['choices'])}]"
            shown = list(v) if isinstance(v, tuple) else v
            rows.append((prefix + f.name, yaml.safe_dump(shown, default_flow_style=True).strip()
                         .removesuffix("...").strip(), help_))
    return rows


def keys_help(cls: type = Config, title: str = "config keys (set as key=value; nested keys are dotted):") -> str:
    """The key table of a ``--help`` epilog: one line per dotted key, help text, default."""
    rows = describe_keys(cls)
    width = max(len(k) for k, _, _ in rows)
    return "\n".join([title, *(f"  {k:<{width}}  {h} (default: {d})" for k, d, h in rows)])

"""The cluster's configuration: one frozen dataclass per role, validated once at construction.

Part of the light base: the router and the CLI import it, so it pulls in neither torch nor
ray. Every error names the field with its role, e.g. ``decode.max_num_seqs=0 is invalid``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from pdserve.checkpoint_files import read_json

KV_TRANSFER_DTYPES = ("fp8", "auto")
KV_CACHE_DTYPES = ("auto", "fp8")
DISAGG_MODES = ("conditional", "always", "never")
MODEL_DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = (None, "cpu", "cuda")
LOG_LEVELS = ("debug", "info", "warning", "error")


def check_wire(kv_transfer_dtype: str, prefill_kv_cache_dtype: str,
               decode_kv_cache_dtype: str) -> None:
    """Refuse a combination the table in ``kvtransfer/wire.py`` does not list, naming the field."""
    if kv_transfer_dtype not in KV_TRANSFER_DTYPES:
        raise ValueError(f"kv_transfer_dtype must be one of {KV_TRANSFER_DTYPES}, "
                         f"got {kv_transfer_dtype!r}")
    for field, value in (("prefill kv_cache_dtype", prefill_kv_cache_dtype),
                         ("decode kv_cache_dtype", decode_kv_cache_dtype)):
        if value not in KV_CACHE_DTYPES:
            raise ValueError(f"{field} must be one of {KV_CACHE_DTYPES}, got {value!r}")
        if kv_transfer_dtype == "auto" and value != "auto":
            raise ValueError(f"kv_transfer_dtype='auto' (lossless) needs both pools in the "
                             f"model dtype, but {field}={value!r}: use kv_transfer_dtype='fp8'")


@dataclass(frozen=True, slots=True)
class DecodeConfig:
    """The decode role: workers that run the token-by-token batch.

    ``disagg_mode`` says where a prompt is prefilled: ``never`` always on the decode worker,
    ``always`` always on a prefill worker, ``conditional`` locally when it is short
    (``max_local_prefill_tokens``) and remotely otherwise.
    """

    num_workers: int = 1
    tensor_parallel_size: int = 1
    kv_cache_dtype: str = "auto"
    num_blocks: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True
    disagg_mode: str = "conditional"
    max_local_prefill_tokens: int = 256
    max_prefill_queue: int = 16
    max_remote_reserved_blocks: int | None = None  # None: no cap beyond the pool
    remote_prefill_timeout_s: float = 30.0
    staging_blocks: int = 256  # an fp8 wire into a pool in the model dtype lands here
    cpus_per_rank: float = 0.5  # Ray resources per tensor-parallel rank
    gpus_per_rank: float = 0.0  # set 1 on GPU clusters
    pin_cpus: list[int] | None = None  # cores for the ranks, worker-major, wrapping (benchmarks)

    def __post_init__(self) -> None:
        _check_role_fields("decode", self, min_workers=1)
        _check_choice("decode.disagg_mode", self.disagg_mode, DISAGG_MODES)
        _check_int("decode.max_local_prefill_tokens", self.max_local_prefill_tokens, 0)
        _check_int("decode.max_prefill_queue", self.max_prefill_queue, 0)
        _check_int("decode.max_remote_reserved_blocks", self.max_remote_reserved_blocks, 0,
                   optional=True)
        _check_number("decode.remote_prefill_timeout_s", self.remote_prefill_timeout_s, 0,
                      strict=True)
        _check_int("decode.staging_blocks", self.staging_blocks, 1)


@dataclass(frozen=True, slots=True)
class PrefillConfig:
    """The prefill role: workers that batch prompts (chunking long ones) and send the KV out.

    ``num_workers=0`` runs without prefill workers: every prompt is prefilled locally.
    """

    num_workers: int = 1
    tensor_parallel_size: int = 1
    kv_cache_dtype: str = "auto"
    num_blocks: int | None = None
    max_num_seqs: int = 16  # jobs batched per step
    max_num_batched_tokens: int = 2048  # token budget per step; longer prompts are chunked
    enable_prefix_caching: bool = True
    send_buffer_blocks: int = 256  # a pool in the model dtype is quantized here for fp8
    cpus_per_rank: float = 0.5
    gpus_per_rank: float = 0.0
    pin_cpus: list[int] | None = None

    def __post_init__(self) -> None:
        _check_role_fields("prefill", self, min_workers=0)
        _check_int("prefill.send_buffer_blocks", self.send_buffer_blocks, 1)


@dataclass(frozen=True, slots=True)
class RouterConfig:
    """The HTTP front door: where it listens, how much it admits, how it picks a worker.

    Up to ``max_running`` requests are in flight to the workers (None: every decode worker's
    ``max_num_seqs``); up to ``max_queue`` more wait in a priority queue; beyond that a
    request is answered 429. ``kv_weight`` weighs the blocks a worker would have to prefill
    against the blocks its running requests hold (0: load only).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    max_running: int | None = None
    max_queue: int = 256
    kv_weight: float = 1.0
    drain_timeout_s: float = 30.0
    tokenizer_threads: int = 2
    served_model_name: str | None = None  # None: the model directory's name
    retry_after_s: int = 1
    max_request_bytes: int = 4 * 1024 * 1024  # a larger HTTP body is answered 413

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host:
            _fail("router.host", self.host, "a host name or address")
        _check_int("router.port", self.port, 0)
        if self.port > 65535:
            _fail("router.port", self.port, "<= 65535")
        _check_int("router.max_running", self.max_running, 1, optional=True)
        _check_int("router.max_queue", self.max_queue, 0)
        _check_number("router.kv_weight", self.kv_weight, 0, strict=False)
        _check_number("router.drain_timeout_s", self.drain_timeout_s, 0, strict=False)
        _check_int("router.tokenizer_threads", self.tokenizer_threads, 1)
        if self.served_model_name is not None and (
                not isinstance(self.served_model_name, str) or not self.served_model_name):
            _fail("router.served_model_name", self.served_model_name, "a non-empty string")
        _check_int("router.retry_after_s", self.retry_after_s, 0)
        _check_int("router.max_request_bytes", self.max_request_bytes, 1)


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """The whole cluster: both roles plus what must agree across it (block size, wire, model).

    ``address`` is ``local`` (start a Ray cluster here), ``auto`` (join the running one),
    a ``ray://`` client URL or a head node's ``host:port``.
    """

    model_dir: str
    decode: DecodeConfig = dataclasses.field(default_factory=DecodeConfig)
    prefill: PrefillConfig = dataclasses.field(default_factory=PrefillConfig)
    router: RouterConfig = dataclasses.field(default_factory=RouterConfig)
    kv_transfer_dtype: str = "fp8"
    block_size: int = 16  # one value across the cluster: blocks move between pools as-is
    dtype: str = "auto"
    device: str | None = None
    max_model_len: int | None = None
    address: str = "local"
    placement_timeout_s: float = 60.0
    num_threads: int = 1  # torch threads per rank
    seed: int = 0
    log_level: str = "info"

    def __post_init__(self) -> None:
        if not isinstance(self.model_dir, str) or not self.model_dir:
            _fail("model_dir", self.model_dir, "a non-empty string: the model directory")
        _check_section("decode", self.decode, DecodeConfig)
        _check_section("prefill", self.prefill, PrefillConfig)
        _check_section("router", self.router, RouterConfig)
        _check_choice("kv_transfer_dtype", self.kv_transfer_dtype, KV_TRANSFER_DTYPES)
        _check_int("block_size", self.block_size, 1)
        _check_choice("dtype", self.dtype, MODEL_DTYPES)
        _check_choice("device", self.device, DEVICES)
        _check_int("max_model_len", self.max_model_len, 1, optional=True)
        if not _is_ray_address(self.address):
            _fail("address", self.address, "'local', 'auto', 'ray://...' or 'host:port'")
        _check_number("placement_timeout_s", self.placement_timeout_s, 0, strict=True)
        _check_int("num_threads", self.num_threads, 1)
        _check_int("seed", self.seed, 0)
        _check_choice("log_level", self.log_level, LOG_LEVELS)
        check_wire(self.kv_transfer_dtype, self.prefill.kv_cache_dtype,
                   self.decode.kv_cache_dtype)
        if self.decode.disagg_mode == "always" and self.prefill.num_workers == 0:
            raise ValueError("decode.disagg_mode='always' needs prefill workers, but "
                             "prefill.num_workers=0: add some or use 'conditional'")

    def check_model(self) -> None:
        """Refuse a tensor-parallel size that cannot split the model's heads evenly.

        Reads only ``config.json``; a role without workers is not checked.
        """
        num_heads, num_kv_heads = _read_head_counts(Path(self.model_dir) / "config.json")
        sizes = [("decode", self.decode.tensor_parallel_size)]
        if self.prefill.num_workers:
            sizes.append(("prefill", self.prefill.tensor_parallel_size))
        for role, size in sizes:
            name = f"{role}.tensor_parallel_size={size}"
            if num_heads % size:
                raise ValueError(f"{name} does not divide num_attention_heads={num_heads}")
            if num_kv_heads % size and size % num_kv_heads:
                raise ValueError(f"{name} neither divides nor is a multiple of "
                                 f"num_key_value_heads={num_kv_heads}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClusterConfig:
        """From plain data (parsed YAML) with ``decode``, ``prefill`` and ``router`` as nested
        mappings."""
        values = _known_keys(cls, data, "")
        if "model_dir" not in values:
            raise ValueError("cluster config needs model_dir: the model checkpoint directory")
        for role, role_class in (("decode", DecodeConfig), ("prefill", PrefillConfig),
                                 ("router", RouterConfig)):
            if role in values:
                values[role] = role_class(**_known_keys(role_class, values[role], f"{role}."))
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | Path) -> ClusterConfig:
        """From a YAML file; every error names the file."""
        import yaml  # only the CLI reads files; the light base stays import-free

        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"cannot read cluster config {path}: {error}") from error
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ValueError(f"{path} is not valid YAML: {error}") from error
        try:
            return cls.from_dict(data)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from error

    def to_dict(self) -> dict[str, Any]:
        """Plain data that ``from_dict`` turns back into an equal config."""
        return dataclasses.asdict(self)


def _fail(name: str, value: Any, expected: str) -> NoReturn:
    raise ValueError(f"{name}={value!r} is invalid: must be {expected}")


def _check_int(name: str, value: Any, minimum: int, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    # bool is an int subclass, but `num_workers: true` in a YAML file is a mistake
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(name, value, f"an integer >= {minimum}" + (" or None" if optional else ""))
    if value < minimum:
        _fail(name, value, f">= {minimum}")


def _check_number(name: str, value: Any, minimum: float, *, strict: bool) -> None:
    is_finite = (isinstance(value, int) and not isinstance(value, bool)
                 or isinstance(value, float) and math.isfinite(value))
    if not is_finite or not (value > minimum if strict else value >= minimum):
        _fail(name, value, f"a finite number {'>' if strict else '>='} {minimum}")


def _check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        _fail(name, value, f"one of {choices}")


def _check_role_fields(role: str, config: DecodeConfig | PrefillConfig, *,
                       min_workers: int) -> None:
    """The fields both roles share; a worker is ``tensor_parallel_size`` engine ranks."""
    _check_int(f"{role}.num_workers", config.num_workers, min_workers)
    _check_int(f"{role}.tensor_parallel_size", config.tensor_parallel_size, 1)
    _check_choice(f"{role}.kv_cache_dtype", config.kv_cache_dtype, KV_CACHE_DTYPES)
    _check_int(f"{role}.num_blocks", config.num_blocks, 1, optional=True)
    _check_int(f"{role}.max_num_seqs", config.max_num_seqs, 1)
    _check_int(f"{role}.max_num_batched_tokens", config.max_num_batched_tokens, 1)
    if not isinstance(config.enable_prefix_caching, bool):
        _fail(f"{role}.enable_prefix_caching", config.enable_prefix_caching, "true or false")
    _check_number(f"{role}.cpus_per_rank", config.cpus_per_rank, 0, strict=True)
    _check_number(f"{role}.gpus_per_rank", config.gpus_per_rank, 0, strict=False)
    cpus = config.pin_cpus
    if cpus is not None and (not isinstance(cpus, (list, tuple)) or not cpus or any(
            isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in cpus)):
        _fail(f"{role}.pin_cpus", cpus, "null or a non-empty list of core numbers")


def _check_section(role: str, value: Any, role_class: type) -> None:
    if not isinstance(value, role_class):
        raise ValueError(f"{role} must be a {role_class.__name__}, got {type(value).__name__}: "
                         f"use ClusterConfig.from_dict for plain data")


def _is_ray_address(address: Any) -> bool:
    if not isinstance(address, str):
        return False
    if address in ("local", "auto"):
        return True
    if address.startswith("ray://"):
        return len(address) > len("ray://")
    host, colon, port = address.rpartition(":")
    return bool(colon and host) and port.isascii() and port.isdigit()


def _known_keys(cls: type, data: Any, prefix: str) -> dict[str, Any]:
    """``data`` as keyword arguments for ``cls``, refusing a non-mapping or an unknown key."""
    if not isinstance(data, dict):
        where = prefix.rstrip(".") or "the top level"
        raise ValueError(f"cluster config: {where} must be a mapping, "
                         f"got {type(data).__name__}")
    known = sorted(item.name for item in dataclasses.fields(cls))
    for key in data:
        if key not in known:
            raise ValueError(f"unknown key '{prefix}{key}' in cluster config; known: {known}")
    return dict(data)


def _read_head_counts(path: Path) -> tuple[int, int]:
    """``num_attention_heads`` and ``num_key_value_heads`` (the former when absent)."""
    try:
        model = read_json(path)
    except OSError as error:
        raise ValueError(f"{path} cannot be read ({type(error).__name__}): model_dir must be "
                         f"a model directory with a config.json") from error
    num_heads = model.get("num_attention_heads")
    num_kv_heads = model.get("num_key_value_heads")
    if num_kv_heads is None:
        num_kv_heads = num_heads
    for name, value in (("num_attention_heads", num_heads),
                        ("num_key_value_heads", num_kv_heads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{path}: {name}={value!r} must be a positive integer")
    return num_heads, num_kv_heads

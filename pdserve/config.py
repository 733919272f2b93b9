"""The cluster's configuration: one frozen dataclass per role, validated once at construction.

Part of the light base: the router and the CLI import it, so it pulls in neither torch nor
ray. Every field is a ``setting`` (``pdserve/choices.py``): bounds, choices and its
`pdserve serve` flag, if any, are written at the field, and ``check_fields`` validates them.
An error names the field's path and value: ``decode.max_num_seqs: 0 is invalid, must be >= 1``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from pdserve.checkpoint_files import read_json
from pdserve.choices import (
    ATTENTION_BACKENDS,
    DEVICES,
    FIELD_ERROR,
    KV_CACHE_DTYPES,
    KV_TRANSFER_DTYPES,
    LOG_LEVELS,
    MODEL_DTYPES,
    QUANTIZATIONS,
    DisaggMode,
    FieldSpec,
    KVChecksum,
    check_fields,
    field_specs,
    setting,
)
from pdserve.quant_config import resolve_scheme


def lands_in_staging(kv_transfer_dtype: str, pool_kv_cache_dtype: str) -> bool:
    """Whether an fp8 wire meets a pool in the model dtype: the wire bytes then live apart
    from the pool, in a staging area (landing, dequantized on arrival, so lossy) or a send
    buffer (leaving, quantized)."""
    return kv_transfer_dtype == "fp8" and pool_kv_cache_dtype == "auto"


def check_wire(kv_transfer_dtype: str, prefill_kv_cache_dtype: str,
               decode_kv_cache_dtype: str) -> None:
    """Refuse a combination the table in ``kvtransfer/wire.py`` does not list, naming the field."""
    _check_value("kv_transfer_dtype", kv_transfer_dtype, field_specs(ClusterConfig))
    pools = (("prefill", prefill_kv_cache_dtype, PrefillConfig),
             ("decode", decode_kv_cache_dtype, DecodeConfig))
    for role, value, role_class in pools:
        _check_value("kv_cache_dtype", value, field_specs(role_class), f"{role}.")
        if kv_transfer_dtype == "auto" and value != "auto":
            raise ValueError(f"{role}.kv_cache_dtype: {value!r} is invalid, must be 'auto' when "
                             f"kv_transfer_dtype is 'auto' (a lossless wire needs both pools "
                             f"in the model dtype); or use kv_transfer_dtype 'fp8'")


@dataclass(frozen=True, slots=True)
class DecodeConfig:
    """The decode role: workers that run the token-by-token batch.

    ``disagg_mode`` says where a prompt is prefilled: ``never`` always on the decode worker,
    ``always`` always on a prefill worker, ``conditional`` locally when it is short
    (``max_local_prefill_tokens``) and remotely otherwise.
    """

    num_workers: int = setting(1, minimum=1, flag="--decode-workers", help="decode workers")
    tensor_parallel_size: int = setting(1, minimum=1, flag="--decode-tp",
                                        help="tensor-parallel ranks per decode worker")
    kv_cache_dtype: str = setting("auto", choices=KV_CACHE_DTYPES, flag="--kv-cache-dtype",
                                  help="both roles' KV pools")
    num_blocks: int | None = setting(None, minimum=1)
    max_num_seqs: int = setting(64, minimum=1)
    max_num_batched_tokens: int = setting(2048, minimum=1)
    enable_prefix_caching: bool = setting(True)
    disagg_mode: DisaggMode = setting(DisaggMode.CONDITIONAL, flag="--disagg-mode",
                                      help="where prompts are prefilled")
    max_local_prefill_tokens: int = setting(
        256, minimum=0, flag="--max-local-prefill-tokens",
        help="a decode worker prefills prompts with up to this many uncached tokens itself")
    max_prefill_queue: int = setting(16, minimum=0)
    max_remote_reserved_blocks: int | None = setting(None, minimum=0)  # None: no cap but the pool
    remote_prefill_timeout_s: float = setting(30.0, exclusive_minimum=0)
    staging_blocks: int = setting(256, minimum=1)  # where fp8 lands in a model-dtype pool
    cpus_per_rank: float = setting(0.5, exclusive_minimum=0)  # Ray resources per TP rank
    gpus_per_rank: float = setting(0.0, minimum=0)  # set 1 on GPU clusters
    pin_cpus: list[int] | None = setting(None, minimum=0)  # ranks' cores, worker-major, wrapping

    def __post_init__(self) -> None:
        check_fields(self, "decode.")


@dataclass(frozen=True, slots=True)
class PrefillConfig:
    """The prefill role: workers that batch prompts (chunking long ones) and send the KV out.

    ``num_workers=0`` runs without prefill workers: every prompt is prefilled locally.
    """

    num_workers: int = setting(1, minimum=0, flag="--prefill-workers",
                               help="prefill workers, 0 to prefill every prompt on decode")
    tensor_parallel_size: int = setting(1, minimum=1, flag="--prefill-tp",
                                        help="tensor-parallel ranks per prefill worker")
    kv_cache_dtype: str = setting("auto", choices=KV_CACHE_DTYPES, flag="--kv-cache-dtype")
    num_blocks: int | None = setting(None, minimum=1)
    max_num_seqs: int = setting(16, minimum=1)  # jobs batched per step
    max_num_batched_tokens: int = setting(2048, minimum=1)  # longer prompts are chunked
    enable_prefix_caching: bool = setting(True)
    send_buffer_blocks: int = setting(256, minimum=1)  # where a model-dtype pool goes fp8
    cpus_per_rank: float = setting(0.5, exclusive_minimum=0)
    gpus_per_rank: float = setting(0.0, minimum=0)
    pin_cpus: list[int] | None = setting(None, minimum=0)

    def __post_init__(self) -> None:
        check_fields(self, "prefill.")


_ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s]+")


def _is_origin_list(origins: Any) -> bool:
    """A browser's ``Origin`` is ``scheme://host[:port]``: a path or a slash never matches."""
    if not isinstance(origins, list):
        return False
    if origins == ["*"]:
        return True
    return all(isinstance(origin, str) and _ORIGIN.fullmatch(origin) for origin in origins)


@dataclass(frozen=True, slots=True)
class RouterConfig:
    """The HTTP front door: where it listens, how much it admits, how it picks a worker.

    Up to ``max_running`` requests are in flight to the workers (None: every decode worker's
    ``max_num_seqs``); up to ``max_queue`` more wait in a priority queue; beyond that a
    request is answered 429. ``kv_weight`` weighs the blocks a worker would have to prefill
    against the blocks its running requests hold (0: load only). ``cors_allow_origins`` lists
    the web origins whose pages may call the API from a browser; empty, no CORS headers go out.
    """

    host: str = setting("127.0.0.1", expected="a host name or address", flag="--host",
                        help="address to bind")
    port: int = setting(8000, minimum=0, maximum=65535, flag="--port", help="HTTP port")
    max_running: int | None = setting(None, minimum=1)
    max_queue: int = setting(256, minimum=0, flag="--max-queue",
                             help="requests that may wait before the server answers 429")
    kv_weight: float = setting(1.0, minimum=0, flag="--kv-weight",
                               help="routing: weight of blocks to prefill against load, "
                                    "0 for load only")
    drain_timeout_s: float = setting(30.0, minimum=0)
    tokenizer_threads: int = setting(2, minimum=1)
    served_model_name: str | None = setting(None)  # None: the model directory's name
    retry_after_s: int = setting(1, minimum=0)
    max_request_bytes: int = setting(4 * 1024 * 1024, minimum=1)  # larger: answered 413
    max_migrations: int = setting(3, minimum=0)  # moves of a streaming request off dead workers
    # A streamed response's client that reads too slowly is cancelled (slot and blocks freed):
    # when one write to it waits longer than this, or when more token chunks than the cap
    # wait for it at the router.
    stream_write_timeout_s: float = setting(30.0, exclusive_minimum=0)
    stream_max_unsent_chunks: int = setting(4096, minimum=1)
    # Origins whose web pages may call the API from a browser; empty: no CORS headers at all
    cors_allow_origins: list[str] = setting(
        factory=list, accepts=_is_origin_list,
        expected="a list of origins (scheme://host[:port], no path, e.g. "
                 "'https://app.example.com'), or ['*'] for any")

    def __post_init__(self) -> None:
        check_fields(self, "router.")


_SECTION = "a %s (ClusterConfig.from_dict builds one from plain data)"


def _is_ray_address(address: Any) -> bool:
    if not isinstance(address, str):
        return False
    if address in ("local", "auto"):
        return True
    if address.startswith("ray://"):
        return len(address) > len("ray://")
    host, colon, port = address.rpartition(":")
    return bool(colon and host) and port.isascii() and port.isdigit()


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """The whole cluster: both roles plus what must agree across it (block size, wire, model).

    ``address`` is ``local`` (start a Ray cluster here), ``auto`` (join the running one),
    a ``ray://`` client URL or a head node's ``host:port``.
    """

    model_dir: str = setting(expected="a non-empty string: the model directory",
                             flag="--model", help="checkpoint directory; default: the "
                                                  "embedded model, built once and cached")
    decode: DecodeConfig = setting(factory=DecodeConfig, expected=_SECTION % "DecodeConfig")
    prefill: PrefillConfig = setting(factory=PrefillConfig, expected=_SECTION % "PrefillConfig")
    router: RouterConfig = setting(factory=RouterConfig, expected=_SECTION % "RouterConfig")
    kv_transfer_dtype: str = setting("fp8", choices=KV_TRANSFER_DTYPES,
                                     flag="--kv-transfer-dtype", help="KV on the wire")
    # Prefill digests the KV bytes it wrote, decode verifies them on landing (a mismatch
    # falls back to a local prefill). Both roles read it; see docs/kvtransfer.md.
    kv_transfer_checksum: KVChecksum = setting(
        KVChecksum.OFF, flag="--kv-transfer-checksum",
        expected="one of ('off', 'sample', 'all') (quote \"off\" in YAML, where a bare off "
                 "is false)",
        help="verify KV on the wire: off, sample (a few blocks per request) or all")
    block_size: int = setting(16, minimum=1)  # one value across the cluster
    dtype: str = setting("auto", choices=MODEL_DTYPES, flag="--dtype",
                         help="model dtype; auto is float32 on CPU, bfloat16 on CUDA")
    attention_backend: str = setting("auto", choices=ATTENTION_BACKENDS,
                                     flag="--attention-backend",
                                     help="auto: paged where a kernel runs, else reference")
    quantization: str = setting("auto", choices=QUANTIZATIONS, flag="--quantization",
                                help="layer weights: int8, fp8 (quantized on load), or auto "
                                     "(the checkpoint's own quantization_config, else none)")
    device: str | None = setting(None, choices=DEVICES)  # None: cuda if present, else cpu
    max_model_len: int | None = setting(None, minimum=1)
    address: str = setting("local", accepts=_is_ray_address,
                           expected="'local', 'auto', 'ray://...' or 'host:port'",
                           flag="--address",
                           help="Ray: 'local' (start one here) or 'auto' (join `ray start`)")
    placement_timeout_s: float = setting(60.0, exclusive_minimum=0)
    num_threads: int = setting(1, minimum=1)  # torch threads per rank
    seed: int = setting(0, minimum=0)
    log_level: str = setting("info", choices=LOG_LEVELS)

    def __post_init__(self) -> None:
        check_fields(self)
        check_wire(self.kv_transfer_dtype, self.prefill.kv_cache_dtype,
                   self.decode.kv_cache_dtype)
        if self.decode.disagg_mode is DisaggMode.ALWAYS and self.prefill.num_workers == 0:
            raise ValueError("decode.disagg_mode: 'always' is invalid, must be 'conditional' or "
                             "'never' when prefill.num_workers is 0; or add prefill workers")

    @property
    def is_lossy_wire(self) -> bool:
        """Whether KV a prefill worker writes into decode arrives lossy (an fp8 wire into a
        pool in the model dtype): decode keeps such blocks out of its prefix cache."""
        return lands_in_staging(self.kv_transfer_dtype, self.decode.kv_cache_dtype)

    def check_model(self) -> None:
        """Refuse a tensor-parallel size that cannot split the model's heads evenly.

        Reads only ``config.json``; a role without workers is not checked. The weight
        quantization is resolved too, so an unsupported checkpoint is refused here.
        """
        num_heads, num_kv_heads = _read_head_counts(Path(self.model_dir) / "config.json")
        resolve_scheme(self.quantization, self.model_dir)
        sizes = [("decode", self.decode.tensor_parallel_size)]
        if self.prefill.num_workers:
            sizes.append(("prefill", self.prefill.tensor_parallel_size))
        for role, size in sizes:
            invalid = f"{role}.tensor_parallel_size: {size} is invalid"
            if num_heads % size:
                raise ValueError(f"{invalid}, must divide num_attention_heads ({num_heads})")
            if num_kv_heads % size and size % num_kv_heads:
                raise ValueError(f"{invalid}, must divide num_key_value_heads ({num_kv_heads}) "
                                 f"or be a multiple of it")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClusterConfig:
        """From plain data (parsed YAML) with ``decode``, ``prefill`` and ``router`` as nested
        mappings."""
        values = _known_keys(cls, data, "")
        if "model_dir" not in values:
            raise ValueError("cluster config needs model_dir: the model checkpoint directory")
        for name, spec in field_specs(cls).items():
            if spec.is_section and name in values:
                values[name] = spec.kind(**_known_keys(spec.kind, values[name], f"{name}."))
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
        """Plain data (an Enum as its value) that ``from_dict`` turns back into an equal
        config."""
        return dataclasses.asdict(self, dict_factory=_plain_dict)


def cluster_fields(cls: type = ClusterConfig,
                   prefix: str = "") -> Iterator[tuple[str, FieldSpec]]:
    """Every field of the cluster config but the sections, by path: ``decode.num_workers``."""
    for name, spec in field_specs(cls).items():
        if spec.is_section:
            yield from cluster_fields(spec.kind, f"{prefix}{name}.")
        else:
            yield prefix + name, spec


def _check_value(name: str, value: Any, specs: dict[str, FieldSpec], prefix: str = "") -> None:
    expected = specs[name].problem(value)
    if expected is not None:
        raise ValueError(FIELD_ERROR.format(name=prefix + name, value=value, expected=expected))


def _plain_dict(items: list[tuple[str, Any]]) -> dict[str, Any]:
    return {key: value.value if isinstance(value, Enum) else value for key, value in items}


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
            raise ValueError(f"{path}: {name}: {value!r} is invalid, must be an integer >= 1")
    return num_heads, num_kv_heads

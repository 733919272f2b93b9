"""The cluster config: defaults, one error per bad field, the tables it shares with the
engine, the wire rule, loading, the `pdserve serve` flags, and the model check."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.config import EngineConfig
from pdserve import choices
from pdserve.choices import DisaggMode, KVChecksum, field_specs, setting
from pdserve.cli import build_parser, cluster_config, config_flags
from pdserve.config import (
    ClusterConfig,
    DecodeConfig,
    PrefillConfig,
    RouterConfig,
    check_wire,
    lands_in_staging,
)


def test_defaults_are_valid():
    config = ClusterConfig("/models/tiny")
    assert config.decode == DecodeConfig() and config.prefill == PrefillConfig()
    assert (config.kv_transfer_dtype, config.block_size, config.address) == ("fp8", 16, "local")
    assert config.decode.disagg_mode is DisaggMode.CONDITIONAL
    assert config.kv_transfer_checksum is KVChecksum.OFF
    assert config.prefill.max_num_seqs == 16


# One per kind of check: a bound each way, a choice, a type (bool is not an int), finiteness,
# None where it is not allowed, a list, a string, a rule of its own, a section.
@pytest.mark.parametrize("make,message", [
    (lambda: DecodeConfig(max_num_seqs=0), "decode.max_num_seqs: 0 is invalid, must be >= 1"),
    (lambda: RouterConfig(port=70000), "router.port: 70000 is invalid, must be <= 65535"),
    (lambda: RouterConfig(port=-1), "router.port: -1 is invalid, must be >= 0"),
    (lambda: DecodeConfig(disagg_mode="sometimes"),
     "decode.disagg_mode: 'sometimes' is invalid, must be one of "
     "('conditional', 'always', 'never')"),
    (lambda: PrefillConfig(num_workers=True),
     "prefill.num_workers: True is invalid, must be an integer >= 0"),
    (lambda: RouterConfig(port="80"),
     "router.port: '80' is invalid, must be an integer in [0, 65535]"),
    (lambda: DecodeConfig(remote_prefill_timeout_s=float("inf")),
     "decode.remote_prefill_timeout_s: inf is invalid, must be a finite number > 0"),
    (lambda: DecodeConfig(remote_prefill_timeout_s=0),
     "decode.remote_prefill_timeout_s: 0 is invalid, must be > 0"),
    (lambda: DecodeConfig(max_remote_reserved_blocks="8"),
     "decode.max_remote_reserved_blocks: '8' is invalid, must be an integer >= 0 or None"),
    (lambda: DecodeConfig(gpus_per_rank=None),
     "decode.gpus_per_rank: None is invalid, must be a finite number >= 0"),
    (lambda: PrefillConfig(enable_prefix_caching=1),
     "prefill.enable_prefix_caching: 1 is invalid, must be true or false"),
    (lambda: PrefillConfig(pin_cpus=[0, -1]),
     "prefill.pin_cpus: [0, -1] is invalid, must be a non-empty list of integers >= 0 "
     "or None"),
    (lambda: RouterConfig(served_model_name=""),
     "router.served_model_name: '' is invalid, must be a non-empty string or None"),
    (lambda: RouterConfig(host=""), "router.host: '' is invalid, must be a host name or address"),
    (lambda: ClusterConfig(""),
     "model_dir: '' is invalid, must be a non-empty string: the model directory"),
    (lambda: ClusterConfig("/m", device="tpu"),
     "device: 'tpu' is invalid, must be one of ('cpu', 'cuda', 'cuda:N') or None"),
    (lambda: ClusterConfig("/m", address="localhost"),
     "address: 'localhost' is invalid, must be 'local', 'auto', 'ray://...' or 'host:port'"),
    (lambda: ClusterConfig("/m", log_level="INFO"),
     "log_level: 'INFO' is invalid, must be one of ('debug', 'info', 'warning', 'error')"),
    (lambda: ClusterConfig("/m", decode={"num_workers": 2}),
     "decode: {'num_workers': 2} is invalid, must be a DecodeConfig "
     "(ClusterConfig.from_dict builds one from plain data)"),
])
def test_each_kind_of_check_names_the_path_and_the_value(make, message):
    with pytest.raises(ValueError) as error:
        make()
    assert str(error.value) == message


@pytest.mark.parametrize("name,value", [
    ("num_workers", 0), ("num_workers", True), ("num_workers", "2"), ("num_workers", 1.0),
    ("tensor_parallel_size", 0), ("kv_cache_dtype", "bf16"), ("kv_cache_dtype", None),
    ("num_blocks", 0), ("num_blocks", False), ("max_num_seqs", 0),
    ("max_num_batched_tokens", 0), ("enable_prefix_caching", 1),
    ("enable_prefix_caching", "yes"), ("disagg_mode", "sometimes"),
    ("max_local_prefill_tokens", -1), ("max_prefill_queue", -1),
    ("max_remote_reserved_blocks", -1), ("max_remote_reserved_blocks", "8"),
    ("remote_prefill_timeout_s", 0), ("remote_prefill_timeout_s", float("nan")),
    ("remote_prefill_timeout_s", float("inf")), ("remote_prefill_timeout_s", "30"),
    ("remote_prefill_timeout_s", True), ("staging_blocks", 0), ("cpus_per_rank", 0),
    ("gpus_per_rank", -1), ("gpus_per_rank", None), ("pin_cpus", []), ("pin_cpus", [True]),
    ("pin_cpus", "0"), ("pin_cpus", [0, 1.0]),
])
def test_bad_decode_field_is_named(name, value):
    with pytest.raises(ValueError) as error:
        DecodeConfig(**{name: value})
    assert str(error.value).startswith(f"decode.{name}: {value!r} is invalid, must be ")


@pytest.mark.parametrize("name,value", [
    ("num_workers", -1), ("num_workers", True), ("tensor_parallel_size", 0),
    ("tensor_parallel_size", "1"), ("kv_cache_dtype", "int8"), ("num_blocks", 0),
    ("max_num_seqs", 0), ("max_num_batched_tokens", 0), ("max_num_batched_tokens", 2048.0),
    ("enable_prefix_caching", None), ("send_buffer_blocks", 0), ("cpus_per_rank", -0.5),
    ("gpus_per_rank", -1), ("gpus_per_rank", True),
])
def test_bad_prefill_field_is_named(name, value):
    with pytest.raises(ValueError) as error:
        PrefillConfig(**{name: value})
    assert str(error.value).startswith(f"prefill.{name}: {value!r} is invalid, must be ")


@pytest.mark.parametrize("name,value", [
    ("model_dir", ""), ("model_dir", None), ("model_dir", Path("/m")),
    ("kv_transfer_dtype", "bf16"), ("block_size", 0), ("block_size", True),
    ("block_size", "16"), ("dtype", "fp16"), ("device", "tpu"), ("device", "cuda:"),
    ("device", "cuda:x"), ("device", "cuda:N"), ("device", "cpu:0"), ("device", "CUDA"),
    ("max_model_len", 0), ("address", ""), ("address", "localhost"),
    ("address", "head:port"), ("address", "ray://"), ("address", 6379),
    ("placement_timeout_s", 0), ("placement_timeout_s", -1.0), ("num_threads", 0),
    ("seed", -1), ("seed", "0"), ("log_level", "INFO"), ("log_level", "trace"),
    ("kv_transfer_checksum", "some"), ("kv_transfer_checksum", None),
])
def test_bad_cluster_field_is_named(name, value):
    values = {"model_dir": "/m", name: value}
    with pytest.raises(ValueError) as error:
        ClusterConfig(**values)
    assert str(error.value).startswith(f"{name}: {value!r} is invalid, must be ")


@pytest.mark.parametrize("address", ["local", "auto", "ray://head:10001", "10.0.0.1:6379"])
def test_addresses_accepted(address):
    assert ClusterConfig("/m", address=address).address == address


def test_edge_values_accepted():
    decode = DecodeConfig(max_local_prefill_tokens=0, max_prefill_queue=0,
                          max_remote_reserved_blocks=0, remote_prefill_timeout_s=5,
                          gpus_per_rank=1, pin_cpus=[0, 0])
    config = ClusterConfig("/m", decode, PrefillConfig(num_workers=0), device="cuda",
                           max_model_len=1, dtype="bfloat16", log_level="debug")
    assert config.decode.remote_prefill_timeout_s == 5 and config.prefill.num_workers == 0
    assert RouterConfig(port=0).port == 0 and RouterConfig(port=65535).port == 65535


@pytest.mark.parametrize("device", [None, "cpu", "cuda", "cuda:0", "cuda:1", "cuda:12"])
def test_engine_and_cluster_agree_on_devices(device):
    assert ClusterConfig("/m", device=device).device == device
    assert EngineConfig(device=device).device == device


def test_engine_and_cluster_refuse_the_same_device_each_in_its_form():
    expected = "one of ('cpu', 'cuda', 'cuda:N') or None"
    with pytest.raises(ValueError) as cluster_error:
        ClusterConfig("/m", device="cuda:x")
    with pytest.raises(ValueError) as engine_error:
        EngineConfig(device="cuda:x")
    assert str(cluster_error.value) == f"device: 'cuda:x' is invalid, must be {expected}"
    assert str(engine_error.value) == f"device='cuda:x' is invalid: must be {expected}"


@pytest.mark.parametrize("make,message", [
    (lambda: EngineConfig(max_num_seqs=0), "max_num_seqs=0 is invalid: must be >= 1"),
    (lambda: EngineConfig(block_size=True),
     "block_size=True is invalid: must be an integer >= 1"),
    (lambda: EngineConfig(kv_cache_memory_fraction=1.5),
     "kv_cache_memory_fraction=1.5 is invalid: must be <= 1"),
    (lambda: EngineConfig(kv_cache_memory_fraction=0),
     "kv_cache_memory_fraction=0 is invalid: must be > 0"),
    (lambda: EngineConfig(kv_cache_dtype="int4"),
     "kv_cache_dtype='int4' is invalid: must be one of ('auto', 'fp8')"),
    (lambda: EngineConfig(num_threads=0), "num_threads=0 is invalid: must be >= 1"),
])
def test_engine_errors_name_the_bare_field(make, message):
    with pytest.raises(ValueError) as error:
        make()
    assert str(error.value) == message


@pytest.mark.parametrize("field,table", [("kv_cache_dtype", choices.KV_CACHE_DTYPES),
                                         ("dtype", choices.MODEL_DTYPES),
                                         ("device", choices.DEVICES)])
def test_engine_and_cluster_check_against_one_table(field, table):
    cluster_class = DecodeConfig if field == "kv_cache_dtype" else ClusterConfig
    assert field_specs(EngineConfig)[field].choices is table
    assert field_specs(cluster_class)[field].choices is table


def test_the_flags_choices_are_the_tables():
    flags = config_flags()
    assert flags["--kv-cache-dtype"].spec.choices is choices.KV_CACHE_DTYPES
    assert flags["--kv-transfer-dtype"].spec.choices is choices.KV_TRANSFER_DTYPES
    assert flags["--disagg-mode"].spec.choices is DisaggMode


def test_every_field_must_say_what_it_accepts():
    @dataclasses.dataclass(frozen=True)
    class Unchecked:
        checked: int = setting(1, minimum=0)
        unchecked: int = 2

    with pytest.raises(RuntimeError, match=r"Unchecked.unchecked is not a setting\(\)"):
        field_specs(Unchecked)


def test_disagg_mode_is_stored_as_the_enum():
    assert DecodeConfig(disagg_mode="always").disagg_mode is DisaggMode.ALWAYS
    assert DecodeConfig(disagg_mode=DisaggMode.NEVER).disagg_mode is DisaggMode.NEVER
    assert DecodeConfig(disagg_mode="never") == DecodeConfig(disagg_mode=DisaggMode.NEVER)


@pytest.mark.parametrize("prefill,decode", [("fp8", "fp8"), ("fp8", "auto"), ("auto", "fp8"),
                                            ("auto", "auto")])
def test_fp8_wire_takes_any_pools(prefill, decode):
    ClusterConfig("/m", DecodeConfig(kv_cache_dtype=decode),
                  PrefillConfig(kv_cache_dtype=prefill))


@pytest.mark.parametrize("prefill,decode,path", [("fp8", "auto", "prefill.kv_cache_dtype"),
                                                 ("auto", "fp8", "decode.kv_cache_dtype")])
def test_lossless_wire_refuses_an_fp8_pool(prefill, decode, path):
    with pytest.raises(ValueError) as error:
        ClusterConfig("/m", DecodeConfig(kv_cache_dtype=decode),
                      PrefillConfig(kv_cache_dtype=prefill), kv_transfer_dtype="auto")
    assert str(error.value) == (f"{path}: 'fp8' is invalid, must be 'auto' when "
                                f"kv_transfer_dtype is 'auto' (a lossless wire needs both pools "
                                f"in the model dtype); or use kv_transfer_dtype 'fp8'")


@pytest.mark.parametrize("wire,pool,is_staged", [("fp8", "auto", True), ("fp8", "fp8", False),
                                                 ("auto", "auto", False)])
def test_the_wire_rule(wire, pool, is_staged):
    assert lands_in_staging(wire, pool) is is_staged
    config = ClusterConfig("/m", DecodeConfig(kv_cache_dtype=pool), kv_transfer_dtype=wire)
    assert config.is_lossy_wire is is_staged


def test_lossy_wire_asks_the_decode_pool_only():
    config = ClusterConfig("/m", DecodeConfig(kv_cache_dtype="fp8"),
                           PrefillConfig(kv_cache_dtype="auto"))
    assert not config.is_lossy_wire  # prefill quantizes into its send buffer; decode stores fp8


def test_always_disaggregated_needs_prefill_workers():
    with pytest.raises(ValueError) as error:
        ClusterConfig("/m", DecodeConfig(disagg_mode="always"), PrefillConfig(num_workers=0))
    assert str(error.value) == ("decode.disagg_mode: 'always' is invalid, must be 'conditional' "
                                "or 'never' when prefill.num_workers is 0; or add prefill "
                                "workers")


def test_wire_rule_is_the_one_in_kvtransfer():
    import kvtransfer.wire

    assert kvtransfer.wire.check_wire is check_wire
    assert kvtransfer.wire.lands_in_staging is lands_in_staging


def _custom() -> ClusterConfig:
    return ClusterConfig(
        "/models/tiny", DecodeConfig(num_workers=2, disagg_mode="always", num_blocks=512,
                                     max_remote_reserved_blocks=64),
        PrefillConfig(num_workers=3, tensor_parallel_size=2, kv_cache_dtype="fp8"),
        device="cpu", max_model_len=4096, address="ray://head:10001", seed=7,
        kv_transfer_checksum="sample")


def test_dict_round_trip():
    config = _custom()
    data = config.to_dict()
    assert data["decode"]["disagg_mode"] == "always" and data["prefill"]["num_workers"] == 3
    assert data["address"] == "ray://head:10001" and data["decode"]["num_blocks"] == 512
    assert json.loads(json.dumps(data)) == data  # plain data: the Enum as its value
    assert ClusterConfig.from_dict(data) == config
    assert ClusterConfig.from_dict(data).decode.disagg_mode is DisaggMode.ALWAYS
    assert data["kv_transfer_checksum"] == "sample"
    assert ClusterConfig.from_dict(data).kv_transfer_checksum is KVChecksum.SAMPLE
    assert ClusterConfig.from_dict({"model_dir": "/m"}) == ClusterConfig("/m")


def _known(cls: type) -> list[str]:
    return sorted(item.name for item in dataclasses.fields(cls))


@pytest.mark.parametrize("data,key,cls", [
    ({"model_dir": "/m", "foo": 1}, "foo", ClusterConfig),
    ({"model_dir": "/m", "decode": {"foo": 1}}, "decode.foo", DecodeConfig),
    ({"model_dir": "/m", "prefill": {"send_buffer": 1}}, "prefill.send_buffer", PrefillConfig),
])
def test_unknown_key_is_named_with_its_section(data, key, cls):
    with pytest.raises(ValueError) as error:
        ClusterConfig.from_dict(data)
    assert str(error.value) == f"unknown key '{key}' in cluster config; known: {_known(cls)}"


def test_from_dict_refuses_a_bad_shape():
    with pytest.raises(ValueError) as error:
        ClusterConfig.from_dict({"model_dir": "/m", "prefill": [1]})
    assert str(error.value) == "cluster config: prefill must be a mapping, got list"
    with pytest.raises(ValueError, match="cluster config: the top level must be a mapping"):
        ClusterConfig.from_dict(["model_dir"])
    with pytest.raises(ValueError, match="cluster config needs model_dir"):
        ClusterConfig.from_dict({"decode": {}})


def test_from_yaml(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text("model_dir: /models/tiny\ndevice: cpu\nmax_model_len: 4096\n"
                    "address: ray://head:10001\nseed: 7\nkv_transfer_checksum: sample\n"
                    "decode:\n  num_workers: 2\n  disagg_mode: always\n  num_blocks: 512\n"
                    "  max_remote_reserved_blocks: 64\n"
                    "prefill:\n  num_workers: 3\n  tensor_parallel_size: 2\n"
                    "  kv_cache_dtype: fp8\n")
    assert ClusterConfig.from_yaml(path) == _custom()
    assert ClusterConfig.from_yaml(str(path)) == _custom()


@pytest.mark.parametrize("text,message", [
    ("model_dir: /m\ndecode:\n  foo: 1\n", "unknown key 'decode.foo' in cluster config"),
    ("model_dir: /m\ndecode: [1, 2\n", "is not valid YAML"),
    ("- model_dir\n- /m\n", "the top level must be a mapping, got list"),
    ("model_dir: /m\nblock_size: 0\n", "block_size: 0 is invalid, must be >= 1"),
    # YAML 1.1 reads a bare off as false: the error says to quote it
    ("model_dir: /m\nkv_transfer_checksum: off\n", "kv_transfer_checksum: False is invalid, "
     "must be one of ('off', 'sample', 'all') (quote \"off\" in YAML, where a bare off is "
     "false)"),
])
def test_from_yaml_names_the_file(tmp_path, text, message):
    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as error:
        ClusterConfig.from_yaml(path)
    assert str(error.value).startswith(str(path)) and message in str(error.value)


def test_from_yaml_missing_file(tmp_path):
    path = tmp_path / "absent.yaml"
    with pytest.raises(ValueError) as error:
        ClusterConfig.from_yaml(path)
    assert str(error.value).startswith(f"cannot read cluster config {path}: ")


def _model_dir(tmp_path: Path, **heads: int) -> str:
    (tmp_path / "config.json").write_text(json.dumps(heads))
    return str(tmp_path)


def _tp(model_dir: str, decode: int, prefill: int, num_prefill_workers: int = 1) -> ClusterConfig:
    return ClusterConfig(model_dir, DecodeConfig(tensor_parallel_size=decode),
                         PrefillConfig(num_workers=num_prefill_workers,
                                       tensor_parallel_size=prefill))


@pytest.mark.parametrize("size", [1, 2, 4])
def test_check_model_accepts_sizes_that_split_the_heads(tmp_path, size):
    model_dir = _model_dir(tmp_path, num_attention_heads=4, num_key_value_heads=2)
    _tp(model_dir, size, size).check_model()


@pytest.mark.parametrize("decode,prefill,message", [
    (3, 1, "decode.tensor_parallel_size: 3 is invalid, must divide num_attention_heads (4)"),
    (1, 3, "prefill.tensor_parallel_size: 3 is invalid, must divide num_attention_heads (4)"),
    (8, 1, "decode.tensor_parallel_size: 8 is invalid, must divide num_attention_heads (4)"),
])
def test_check_model_refuses_a_size_naming_the_role(tmp_path, decode, prefill, message):
    model_dir = _model_dir(tmp_path, num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(ValueError) as error:
        _tp(model_dir, decode, prefill).check_model()
    assert str(error.value) == message


def test_check_model_kv_heads(tmp_path):
    model_dir = _model_dir(tmp_path, num_attention_heads=6, num_key_value_heads=2)
    _tp(model_dir, 6, 2).check_model()  # 6 ranks share 2 KV heads, each held by 3 ranks
    with pytest.raises(ValueError) as error:
        _tp(model_dir, 1, 3).check_model()
    assert str(error.value) == ("prefill.tensor_parallel_size: 3 is invalid, must divide "
                                "num_key_value_heads (2) or be a multiple of it")


def test_check_model_kv_heads_default_to_attention_heads(tmp_path):
    model_dir = _model_dir(tmp_path, num_attention_heads=4)
    _tp(model_dir, 4, 2).check_model()
    with pytest.raises(ValueError, match="decode.tensor_parallel_size: 8 is invalid"):
        _tp(model_dir, 8, 1).check_model()


def test_check_model_skips_a_role_without_workers(tmp_path):
    model_dir = _model_dir(tmp_path, num_attention_heads=4, num_key_value_heads=2)
    _tp(model_dir, 2, 3, num_prefill_workers=0).check_model()


def test_check_model_needs_config_json(tmp_path):
    with pytest.raises(ValueError) as error:
        ClusterConfig(str(tmp_path)).check_model()
    assert str(error.value).startswith(f"{tmp_path / 'config.json'} cannot be read")
    model_dir = _model_dir(tmp_path, num_key_value_heads=2)
    with pytest.raises(ValueError, match="num_attention_heads: None is invalid, must be an "
                                         "integer >= 1"):
        ClusterConfig(model_dir).check_model()


def _serve_config(*argv: str) -> ClusterConfig:
    return cluster_config(build_parser().parse_args(["serve", "--model", "/m", *argv]))


def test_flags_override_the_config_file_which_overrides_the_defaults(tmp_path):
    path = tmp_path / "cluster.yaml"
    path.write_text("model_dir: /from-file\nkv_transfer_dtype: auto\n"
                    "decode: {num_workers: 2, max_local_prefill_tokens: 100}\n"
                    "router: {port: 9000, max_queue: 5}\n")
    config = _serve_config("--config", str(path), "--decode-workers", "3", "--port", "9100",
                           "--kv-cache-dtype", "fp8", "--kv-transfer-dtype", "fp8",
                           "--disagg-mode", "always", "--prefill-tp", "2", "--kv-weight", "0")
    assert config.model_dir == "/m"  # --model replaces the file's model_dir
    assert (config.decode.num_workers, config.decode.max_local_prefill_tokens) == (3, 100)
    assert (config.router.port, config.router.max_queue, config.router.kv_weight) == (9100, 5, 0)
    assert (config.decode.kv_cache_dtype, config.prefill.kv_cache_dtype) == ("fp8", "fp8")
    assert config.decode.disagg_mode is DisaggMode.ALWAYS
    assert (config.kv_transfer_dtype, config.prefill.tensor_parallel_size) == ("fp8", 2)
    assert _serve_config() == ClusterConfig("/m")


def test_each_flag_sets_the_fields_that_ask_for_it():
    assert {flag: config_flag.paths for flag, config_flag in config_flags().items()} == {
        "--model": ("model_dir",),
        "--decode-workers": ("decode.num_workers",),
        "--decode-tp": ("decode.tensor_parallel_size",),
        "--kv-cache-dtype": ("decode.kv_cache_dtype", "prefill.kv_cache_dtype"),
        "--disagg-mode": ("decode.disagg_mode",),
        "--max-local-prefill-tokens": ("decode.max_local_prefill_tokens",),
        "--prefill-workers": ("prefill.num_workers",),
        "--prefill-tp": ("prefill.tensor_parallel_size",),
        "--host": ("router.host",), "--port": ("router.port",),
        "--max-queue": ("router.max_queue",), "--kv-weight": ("router.kv_weight",),
        "--kv-transfer-dtype": ("kv_transfer_dtype",),
        "--kv-transfer-checksum": ("kv_transfer_checksum",), "--address": ("address",),
        "--dtype": ("dtype",), "--attention-backend": ("attention_backend",),
        "--quantization": ("quantization",),
    }


@pytest.mark.parametrize("argv,message", [
    (["--port", "70000"], "argument --port: '70000' is invalid, must be <= 65535"),
    (["--decode-workers", "0"], "argument --decode-workers: '0' is invalid, must be >= 1"),
    (["--prefill-workers", "x"],
     "argument --prefill-workers: 'x' is invalid, must be an integer >= 0"),
    (["--kv-weight", "nan"],
     "argument --kv-weight: 'nan' is invalid, must be a finite number >= 0"),
    (["--disagg-mode", "sometimes"], "argument --disagg-mode: 'sometimes' is invalid, must be "
                                     "one of ('conditional', 'always', 'never')"),
    (["--address", "nowhere"], "argument --address: 'nowhere' is invalid, must be 'local', "
                               "'auto', 'ray://...' or 'host:port'"),
])
def test_a_bad_flag_is_refused_by_the_fields_check(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["serve", *argv])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"pdserve serve: error: {message}"


def test_config_imports_neither_torch_nor_ray():
    # The router and the CLI validate the config; they must stay free of the heavy stack.
    code = ("import sys; import pdserve.config; print(sorted(m for m in "
            "('torch', 'ray', 'numpy', 'yaml', 'engine', 'kvtransfer') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "[]"

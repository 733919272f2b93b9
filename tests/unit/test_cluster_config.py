"""The cluster config: defaults, one error per bad field, loading, and the model check."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pdserve.config import ClusterConfig, DecodeConfig, PrefillConfig


def test_defaults_are_valid():
    config = ClusterConfig("/models/tiny")
    assert config.decode == DecodeConfig() and config.prefill == PrefillConfig()
    assert (config.kv_transfer_dtype, config.block_size, config.address) == ("fp8", 16, "local")
    assert config.decode.disagg_mode == "conditional" and config.prefill.max_num_seqs == 16


def test_the_spelled_out_error():
    with pytest.raises(ValueError) as error:
        DecodeConfig(max_local_prefill_tokens=-1)
    assert str(error.value) == "decode.max_local_prefill_tokens=-1 is invalid: must be >= 0"


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
    ("gpus_per_rank", -1), ("gpus_per_rank", None),
])
def test_bad_decode_field_is_named(name, value):
    with pytest.raises(ValueError) as error:
        DecodeConfig(**{name: value})
    assert str(error.value).startswith(f"decode.{name}={value!r} is invalid: must be ")


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
    assert str(error.value).startswith(f"prefill.{name}={value!r} is invalid: must be ")


@pytest.mark.parametrize("name,value", [
    ("model_dir", ""), ("model_dir", None), ("model_dir", Path("/m")),
    ("kv_transfer_dtype", "bf16"), ("block_size", 0), ("block_size", True),
    ("block_size", "16"), ("dtype", "fp16"), ("device", "tpu"), ("device", "cuda:0"),
    ("max_model_len", 0), ("address", ""), ("address", "localhost"),
    ("address", "head:port"), ("address", "ray://"), ("address", 6379),
    ("placement_timeout_s", 0), ("placement_timeout_s", -1.0), ("num_threads", 0),
    ("seed", -1), ("seed", "0"), ("log_level", "INFO"), ("log_level", "trace"),
])
def test_bad_cluster_field_is_named(name, value):
    values = {"model_dir": "/m", name: value}
    with pytest.raises(ValueError) as error:
        ClusterConfig(**values)
    assert str(error.value).startswith(f"{name}={value!r} is invalid: must be ")


@pytest.mark.parametrize("address", ["local", "auto", "ray://head:10001", "10.0.0.1:6379"])
def test_addresses_accepted(address):
    assert ClusterConfig("/m", address=address).address == address


def test_edge_values_accepted():
    decode = DecodeConfig(max_local_prefill_tokens=0, max_prefill_queue=0,
                          max_remote_reserved_blocks=0, remote_prefill_timeout_s=5,
                          gpus_per_rank=1)
    config = ClusterConfig("/m", decode, PrefillConfig(num_workers=0), device="cuda",
                           max_model_len=1, dtype="bfloat16", log_level="debug")
    assert config.decode.remote_prefill_timeout_s == 5 and config.prefill.num_workers == 0


@pytest.mark.parametrize("prefill,decode", [("fp8", "fp8"), ("fp8", "auto"), ("auto", "fp8"),
                                            ("auto", "auto")])
def test_fp8_wire_takes_any_pools(prefill, decode):
    ClusterConfig("/m", DecodeConfig(kv_cache_dtype=decode),
                  PrefillConfig(kv_cache_dtype=prefill))


@pytest.mark.parametrize("prefill,decode,named", [("fp8", "auto", "prefill kv_cache_dtype"),
                                                  ("auto", "fp8", "decode kv_cache_dtype")])
def test_lossless_wire_refuses_an_fp8_pool(prefill, decode, named):
    with pytest.raises(ValueError) as error:
        ClusterConfig("/m", DecodeConfig(kv_cache_dtype=decode),
                      PrefillConfig(kv_cache_dtype=prefill), kv_transfer_dtype="auto")
    assert str(error.value) == (f"kv_transfer_dtype='auto' (lossless) needs both pools in the "
                                f"model dtype, but {named}='fp8': use kv_transfer_dtype='fp8'")


def test_always_disaggregated_needs_prefill_workers():
    with pytest.raises(ValueError, match=r"decode.disagg_mode='always' needs prefill workers"):
        ClusterConfig("/m", DecodeConfig(disagg_mode="always"), PrefillConfig(num_workers=0))


def test_sections_must_be_role_configs():
    with pytest.raises(ValueError) as error:
        ClusterConfig("/m", decode={"num_workers": 2})
    assert str(error.value) == ("decode must be a DecodeConfig, got dict: "
                                "use ClusterConfig.from_dict for plain data")


def test_wire_rule_is_the_one_in_kvtransfer():
    import kvtransfer.wire
    import pdserve.config

    assert kvtransfer.wire.check_wire is pdserve.config.check_wire
    assert kvtransfer.wire.KV_TRANSFER_DTYPES == ("fp8", "auto")


def _custom() -> ClusterConfig:
    return ClusterConfig(
        "/models/tiny", DecodeConfig(num_workers=2, disagg_mode="always", num_blocks=512,
                                     max_remote_reserved_blocks=64),
        PrefillConfig(num_workers=3, tensor_parallel_size=2, kv_cache_dtype="fp8"),
        device="cpu", max_model_len=4096, address="ray://head:10001", seed=7)


def test_dict_round_trip():
    config = _custom()
    data = config.to_dict()
    assert data["decode"]["disagg_mode"] == "always" and data["prefill"]["num_workers"] == 3
    assert data["address"] == "ray://head:10001" and data["decode"]["num_blocks"] == 512
    assert ClusterConfig.from_dict(data) == config
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
                    "address: ray://head:10001\nseed: 7\n"
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
    ("model_dir: /m\nblock_size: 0\n", "block_size=0 is invalid"),
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
    (3, 1, "decode.tensor_parallel_size=3 does not divide num_attention_heads=4"),
    (1, 3, "prefill.tensor_parallel_size=3 does not divide num_attention_heads=4"),
    (8, 1, "decode.tensor_parallel_size=8 does not divide num_attention_heads=4"),
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
    assert str(error.value) == ("prefill.tensor_parallel_size=3 neither divides nor is a "
                                "multiple of num_key_value_heads=2")


def test_check_model_kv_heads_default_to_attention_heads(tmp_path):
    model_dir = _model_dir(tmp_path, num_attention_heads=4)
    _tp(model_dir, 4, 2).check_model()
    with pytest.raises(ValueError, match="decode.tensor_parallel_size=8"):
        _tp(model_dir, 8, 1).check_model()


def test_check_model_skips_a_role_without_workers(tmp_path):
    model_dir = _model_dir(tmp_path, num_attention_heads=4, num_key_value_heads=2)
    _tp(model_dir, 2, 3, num_prefill_workers=0).check_model()


def test_check_model_needs_config_json(tmp_path):
    with pytest.raises(ValueError) as error:
        ClusterConfig(str(tmp_path)).check_model()
    assert str(error.value).startswith(f"{tmp_path / 'config.json'} cannot be read")
    model_dir = _model_dir(tmp_path, num_key_value_heads=2)
    with pytest.raises(ValueError, match="num_attention_heads=None must be a positive integer"):
        ClusterConfig(model_dir).check_model()


def test_config_imports_neither_torch_nor_ray():
    # The router and the CLI validate the config; they must stay free of the heavy stack.
    code = ("import sys; import pdserve.config; print(sorted(m for m in "
            "('torch', 'ray', 'numpy', 'yaml', 'engine', 'kvtransfer') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "[]"

"""Weight quantization: the error bounds per layer, the kernels against plain torch, and
whole models against HF transformers loading the same quantized checkpoint."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from engine import LLM, SamplingParams
from engine.quantization import (
    dequantize,
    fp8_round_rows,
    fp8_round_rows_torch,
    quantize_rows,
    quantized_linear,
    scaled_mm_linear,
)
from pdserve.quant_config import QuantScheme, resolve_scheme
from tests.unit.engine_oracle import hf_greedy, hf_logits_along, random_prompts, top1_margin
from tests.unit.quant_checkpoints import (
    LINEARS,
    edit_tensors,
    write_compressed_tensors,
    write_fp8_block,
)

pytest.importorskip("compressed_tensors")

NUM_NEW_TOKENS = 24
GREEDY = SamplingParams(max_tokens=NUM_NEW_TOKENS, temperature=0, ignore_eos=True,
                        output_logits=True)
# Weight-only and fp32 compute: the engine and HF differ only in summation order (and in
# applying a scale after the sum rather than to each weight), as in the plain parity tests.
WEIGHT_ONLY_ATOL = 1e-3
# With fp8 activations a difference of one fp32 ulp upstream can move an activation across
# an e4m3 rounding boundary: that activation changes by one e4m3 step (2^-4 of its value), and
# a logit by up to ~5e-2 on the tiny model (measured 3e-2). Tokens must still agree exactly
# wherever HF's top-1 margin exceeds twice this.
W8A8_ATOL = 0.1


# -- per layer: quantize / dequantize error within the derived bound ------------------------

def _weights(rows=96, columns=80, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, columns, generator=generator)
    weight[3] *= 50  # rows of very different ranges: the scale is per row
    weight[5] = 0  # an all-zero row must not divide by zero
    return weight


def test_int8_error_is_at_most_half_a_step_of_the_row_scale():
    weight = _weights()
    values, scale = quantize_rows(weight, "int8")
    assert values.dtype == torch.int8 and scale.shape == (96, 1)
    # Symmetric rounding to the nearest multiple of scale = max|row| / 127: never clamped,
    # so each weight is off by at most scale / 2.
    error = (dequantize(values, scale, 80, torch.float32) - weight).abs()
    assert bool((error <= scale / 2 * (1 + 1e-6)).all())
    assert int(values.abs().max()) == 127
    assert bool((values[5] == 0).all())


def test_fp8_error_is_at_most_half_an_e4m3_ulp():
    weight = _weights()
    values, scale = quantize_rows(weight, "fp8")
    assert values.dtype == torch.float8_e4m3fn
    # e4m3 keeps 3 mantissa bits: a normal value is off by at most 2^-4 of itself; below
    # 2^-6 (subnormal) the step is 2^-9, so at most 2^-10 (times the row scale).
    error = (dequantize(values, scale, 80, torch.float32) - weight).abs()
    bound = torch.maximum(weight.abs() * 2**-4, scale * 2**-10) * (1 + 1e-6)
    assert bool((error <= bound).all())


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_layer_output_error_is_within_the_sum_of_the_weight_bounds(kind):
    weight = _weights()
    x = torch.randn(4, 80, generator=torch.Generator().manual_seed(1))
    values, scale = quantize_rows(weight, kind)
    exact = x @ weight.t()
    got = quantized_linear(x, values, scale, 80)
    # |sum_k x_k (w_k - w'_k)| <= sum_k |x_k| |w_k - w'_k| <= |x| . per-weight bound
    per_weight = (scale / 2 if kind == "int8"
                  else torch.maximum(weight.abs() * 2**-4, scale * 2**-10))
    bound = x.abs() @ per_weight.expand_as(weight).t() + 1e-4
    assert bool(((got - exact).abs() <= bound).all())


# -- the CPU kernels against plain torch -----------------------------------------------------

@pytest.mark.parametrize("kind", ["int8", "fp8"])
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 40, 64, 65, 130])
@pytest.mark.parametrize("group_size", [72, 32, 16])  # per channel; blocks (the last partial)
def test_quantized_gemm_equals_dequantize_then_matmul(kind, rows, group_size):
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(50, 72, generator=generator)
    values, _ = quantize_rows(weight, kind)
    scale = torch.rand(50, -(-72 // group_size), generator=generator) + 0.5
    x = torch.randn(rows, 72, generator=generator)
    expected = x @ dequantize(values, scale, group_size, torch.float32).t()
    # float32 sums in another order: a few ulps of the largest output.
    torch.testing.assert_close(quantized_linear(x, values, scale, group_size), expected,
                               atol=1e-6 * float(expected.abs().max()), rtol=1e-5)
    # bfloat16 rows: up to TILED_ROWS the sums are float32 and only the output is rounded;
    # beyond, the weights are dequantized to bfloat16 first (2^-9 each), as HF would.
    got_bf16 = quantized_linear(x.bfloat16(), values, scale, group_size)
    assert got_bf16.dtype == torch.bfloat16
    expected_bf16 = x.bfloat16().float() @ dequantize(values, scale, group_size,
                                                      torch.float32).t()
    torch.testing.assert_close(got_bf16.float(), expected_bf16, rtol=2**-8,
                               atol=1e-2 * float(expected_bf16.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("static", [None, 0.01, "rows"])
def test_fp8_activation_rounding_equals_torch_bit_for_bit(dtype, static):
    if static == "rows":
        static = torch.rand(7, 1, generator=torch.Generator().manual_seed(5)).to(dtype) + 0.01
    x = torch.randn(7, 96, generator=torch.Generator().manual_seed(2)).to(dtype) * 3
    x[2] = 0  # zero row: the scale falls back to eps, values stay 0
    x[4, :5] = torch.tensor([1e-6, -2e-5, 500.0, -500.0, 0.07])  # subnormal, clamp
    assert torch.equal(fp8_round_rows(x, static), fp8_round_rows_torch(x, static))


def test_scaled_mm_path_computes_the_emulated_w8a8():
    # torch._scaled_mm runs on the CPU too (slowly), so the CUDA path's arithmetic is checked
    # here against the CPU's emulation: fp8 activations per token, fp8 weights per channel.
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(64, 96, generator=generator)
    values, scale = quantize_rows(weight, "fp8")
    x = torch.randn(5, 96, generator=generator)
    emulated = quantized_linear(fp8_round_rows(x), values, scale, 96)
    torch.testing.assert_close(scaled_mm_linear(x, values, scale, None), emulated,
                               atol=1e-3, rtol=1e-4)


# -- schemes ---------------------------------------------------------------------------------

def test_schemes_on_a_full_precision_checkpoint(tiny_llama_dir):
    assert resolve_scheme("auto", tiny_llama_dir) is None
    assert resolve_scheme("none", tiny_llama_dir) is None
    assert resolve_scheme("int8", tiny_llama_dir) == QuantScheme("int8", "channel", "none",
                                                                 "on-load")
    fp8 = resolve_scheme("fp8", tiny_llama_dir)
    assert (fp8.weights, fp8.activations, fp8.fingerprint) == (
        "fp8", "dynamic", "fp8-channel-act-dynamic")
    with pytest.raises(ValueError, match=r"quantization='int4' is invalid: must be one of"):
        resolve_scheme("int4", tiny_llama_dir)


@pytest.fixture(scope="module")
def ct_channel_dir(tiny_llama_dir, tmp_path_factory):
    return write_compressed_tensors(tiny_llama_dir, tmp_path_factory.mktemp("q") / "ct")


@pytest.fixture(scope="module")
def ct_static_dir(tiny_llama_dir, tmp_path_factory):
    return write_compressed_tensors(tiny_llama_dir, tmp_path_factory.mktemp("q") / "static",
                                    "tensor", "static")


@pytest.fixture(scope="module")
def fp8_block_dir(tiny_llama_dir, tmp_path_factory):
    return write_fp8_block(tiny_llama_dir, tmp_path_factory.mktemp("q") / "block", (32, 32))


def test_a_published_checkpoint_is_loaded_as_it_says(ct_channel_dir, fp8_block_dir):
    assert resolve_scheme("auto", ct_channel_dir).fingerprint == "fp8-channel-act-dynamic"
    assert resolve_scheme("fp8", ct_channel_dir).source == "compressed-tensors"
    block = resolve_scheme("auto", fp8_block_dir)
    assert (block.block, block.scale_name, block.activations) == (
        (32, 32), "weight_scale_inv", "none")
    with pytest.raises(ValueError, match=r"quantization='int8' is invalid for .*already "
                                         r"quantized \(fp8, quant_method='compressed-tensors'\)"):
        resolve_scheme("int8", ct_channel_dir)


def _with_config(model_dir, tmp_path, edit):
    target = tmp_path / "edited"
    shutil.copytree(model_dir, target)
    config = json.loads((target / "config.json").read_text())
    edit(config["quantization_config"])
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.mark.parametrize("edit,message", [
    (lambda q: q.update(quant_method="gptq"),
     r"quant_method='gptq' is not supported; pdserve loads compressed-tensors .*fp8 \(block"),
    (lambda q: q.update(format="pack-quantized"),
     r"format='pack-quantized' is not supported"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(type="int", num_bits=4),
     r"config_groups.group_0.weights: type='int' num_bits=4 is not supported"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(strategy="group"),
     r"weights.strategy='group' is not supported"),
    (lambda q: q["config_groups"]["group_0"]["input_activations"].update(strategy="group"),
     r"input_activations: strategy='group' with dynamic=True is not supported"),
    (lambda q: q.update(ignore=["lm_head", "model.layers.0.mlp.down_proj"]),
     r"ignore lists 'model.layers.0.mlp.down_proj'"),
])
def test_unsupported_quantization_configs_are_refused_by_name(ct_channel_dir, tmp_path, edit,
                                                              message):
    with pytest.raises(ValueError, match=message):
        resolve_scheme("auto", _with_config(ct_channel_dir, tmp_path, edit))


# -- whole models against HF -----------------------------------------------------------------

def _engine_outputs(model_dir, prompts, **options):
    with LLM(str(model_dir), num_blocks=64, block_size=4, **options) as llm:
        return llm.generate(prompts, GREEDY)


def _assert_matches_hf(model_dir, prompts, outputs, atol, oracle_dir=None):
    oracle_dir = str(oracle_dir or model_dir)
    for prompt, output in zip(prompts, outputs, strict=True):
        ref_logits = hf_logits_along(oracle_dir, prompt, output.token_ids)
        torch.testing.assert_close(torch.stack(output.logits), ref_logits, atol=atol, rtol=0)
        ref_tokens, ref_greedy_logits = hf_greedy(oracle_dir, prompt, NUM_NEW_TOKENS)
        if top1_margin(ref_greedy_logits) > 2 * atol:
            assert output.token_ids == ref_tokens


PROMPTS = random_prompts([21, 6], 400, seed=4)


def test_compressed_tensors_channel_dynamic_matches_hf(ct_channel_dir):
    _assert_matches_hf(ct_channel_dir, PROMPTS, _engine_outputs(ct_channel_dir, PROMPTS),
                       W8A8_ATOL)


def test_compressed_tensors_static_input_scales_match_hf(ct_static_dir):
    _assert_matches_hf(ct_static_dir, PROMPTS, _engine_outputs(ct_static_dir, PROMPTS),
                       W8A8_ATOL)


def test_compressed_tensors_block_weight_only_matches_hf(tiny_llama_dir, tmp_path):
    model_dir = write_compressed_tensors(tiny_llama_dir, tmp_path / "ct-block", "block", "none")
    _assert_matches_hf(model_dir, PROMPTS, _engine_outputs(model_dir, PROMPTS),
                       WEIGHT_ONLY_ATOL)


def test_block_fp8_checkpoint_matches_hf(fp8_block_dir):
    _assert_matches_hf(fp8_block_dir, PROMPTS, _engine_outputs(fp8_block_dir, PROMPTS),
                       WEIGHT_ONLY_ATOL)


def test_int8_on_load_is_the_model_with_int8_rounded_weights(tiny_llama_dir, tmp_path):
    # The oracle: HF on a full-precision checkpoint whose linears hold the dequantized int8
    # weights, which is what weight-only int8 means.
    oracle = tmp_path / "int8-rounded"
    shutil.copytree(tiny_llama_dir, oracle)

    def rounded(tensors):
        for name, tensor in tensors.items():
            if name.endswith(".weight") and name.split(".")[-2] in LINEARS:
                values, scale = quantize_rows(tensor, "int8")
                tensors[name] = dequantize(values, scale, tensor.shape[1], tensor.dtype)
        return tensors

    edit_tensors(oracle, rounded)
    outputs = _engine_outputs(tiny_llama_dir, PROMPTS, quantization="int8")
    _assert_matches_hf(tiny_llama_dir, PROMPTS, outputs, WEIGHT_ONLY_ATOL, oracle_dir=oracle)


def test_fp8_on_load_is_the_compressed_tensors_fp8_dynamic_scheme(tiny_llama_dir,
                                                                  ct_channel_dir):
    # Quantized on load, fp8 is exactly llm-compressor's FP8_DYNAMIC checkpoint of the same
    # weights: the same bytes, so the same logits, and HF on that checkpoint is the oracle.
    on_load = _engine_outputs(tiny_llama_dir, PROMPTS, quantization="fp8")
    published = _engine_outputs(ct_channel_dir, PROMPTS)
    for a, b in zip(on_load, published, strict=True):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(torch.stack(a.logits), torch.stack(b.logits), atol=0,
                                   rtol=0)


# -- bad checkpoints refuse at load, naming the tensor ---------------------------------------

def _broken_copy(model_dir, tmp_path, edit):
    target = tmp_path / "broken"
    shutil.copytree(model_dir, target)
    edit_tensors(target, edit)
    return target


def _drop(name):
    return lambda tensors: {k: v for k, v in tensors.items() if k != name}


def _replace(name, value):
    return lambda tensors: {**tensors, name: value}


@pytest.mark.parametrize("case,message", [
    ("missing-scale", r"checkpoint lacks tensors \['model.layers.1.self_attn.k_proj."
                      r"weight_scale'\]"),
    ("scale-shape", r"checkpoint tensor 'model.layers.0.mlp.up_proj.weight_scale': "
                    r"weight_scale has shape \[7, 1\]: a per-channel scale is \[rows\]"),
    ("weight-dtype", r"checkpoint tensor 'model.layers.0.self_attn.o_proj.weight': weight is "
                     r"torch.float32: a compressed-tensors checkpoint holds float8_e4m3fn"),
    ("weight-shape", r"checkpoint tensor 'model.layers.1.mlp.down_proj.weight': weight has "
                     r"shape \[64, 100\]: expected \[rows, 128\]"),
])
def test_a_broken_checkpoint_refuses_at_load_naming_the_tensor(ct_channel_dir, tmp_path, case,
                                                               message):
    edit = {
        "missing-scale": _drop("model.layers.1.self_attn.k_proj.weight_scale"),
        "scale-shape": _replace("model.layers.0.mlp.up_proj.weight_scale", torch.ones(7, 1)),
        "weight-dtype": _replace("model.layers.0.self_attn.o_proj.weight", torch.ones(64, 64)),
        "weight-shape": _replace("model.layers.1.mlp.down_proj.weight",
                                 torch.ones(64, 100).to(torch.float8_e4m3fn)),
    }[case]
    with pytest.raises(ValueError, match=message):
        LLM(str(_broken_copy(ct_channel_dir, tmp_path, edit)), num_blocks=8)


def test_a_block_scale_of_the_wrong_shape_is_refused(fp8_block_dir, tmp_path):
    name = "model.layers.0.mlp.gate_proj.weight_scale_inv"
    broken = _broken_copy(fp8_block_dir, tmp_path, _replace(name, torch.ones(4, 3)))
    with pytest.raises(ValueError, match=rf"'{name}': weight_scale_inv has shape \[4, 3\]: "
                                         r"blocks of 32x32 over 64 inputs need \[>= 4, 2\]"):
        LLM(str(broken), num_blocks=8)


def test_scales_without_a_quantization_config_are_refused(ct_channel_dir, tmp_path):
    target = tmp_path / "no-config"
    shutil.copytree(ct_channel_dir, target)
    config = json.loads((target / "config.json").read_text())
    del config["quantization_config"]
    (target / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"weight_scale' is not part of a LlamaForCausalLM "
                                         r"model \(no quantization_config\)"):
        LLM(str(target), num_blocks=8)


def test_tensors_stay_where_the_checkpoint_put_them(ct_channel_dir):
    # The writer's layout is the published one: fp8 weights, [N, 1] float32 channel scales,
    # lm_head and embeddings untouched (ignore: [lm_head]).
    tensors = load_file(str(ct_channel_dir / "model.safetensors"))
    assert tensors["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float8_e4m3fn
    assert tensors["model.layers.0.self_attn.q_proj.weight_scale"].shape == (64, 1)
    assert tensors["model.embed_tokens.weight"].dtype == torch.float32
    assert "lm_head.weight_scale" not in tensors


def test_without_the_cpu_kernels_plain_torch_computes_the_same(monkeypatch):
    import engine.quantization as quantization

    generator = torch.Generator().manual_seed(6)
    weight = torch.randn(48, 64, generator=generator)
    values, scale = quantize_rows(weight, "fp8")
    x = torch.randn(3, 64, generator=generator)
    with_kernels = quantized_linear(fp8_round_rows(x), values, scale, 64)
    monkeypatch.setattr(quantization, "library_or_none", lambda: None)
    without = quantization.quantized_linear(quantization.fp8_round_rows(x), values, scale, 64)
    torch.testing.assert_close(without, with_kernels, atol=1e-4, rtol=1e-5)

"""The Triton kernel behind ``paged_triton.py``, in its own module so that importing the
engine does not import triton (about 0.15 s) where no CUDA device will use it."""

import triton
import triton.language as tl


@triton.jit
def fp8_e4m3_to_float(byte):
    # Normal: exponent and mantissa moved into place with the bias raised by 120;
    # subnormal: mantissa * 2^-9. The pool never holds NaN (quantization clamps).
    magnitude = (byte & 0x7F).to(tl.int32)
    normal = ((magnitude << 20) + (120 << 23)).to(tl.float32, bitcast=True)
    value = tl.where((magnitude >> 3) > 0, normal, magnitude.to(tl.float32) * 0.001953125)
    return tl.where((byte & 0x80) > 0, -value, value)


@triton.jit
def paged_attention(q_ptr, out_ptr, k_ptr, v_ptr, k_scale_ptr, v_scale_ptr, tables_ptr,
                     table_stride, visible_ptr, table_row_ptr, scale, num_heads,
                     NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr,
                     GROUP_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                     HEAD_DIM: tl.constexpr, IS_FP8: tl.constexpr):
    token = tl.program_id(0)
    kv_head = tl.program_id(1)
    visible = tl.load(visible_ptr + token)
    if visible > 0:
        table = tables_ptr + tl.load(table_row_ptr + token) * table_stride
        heads = tl.arange(0, GROUP_PAD)
        dims = tl.arange(0, HEAD_DIM)
        slots = tl.arange(0, BLOCK_SIZE)
        head_ok = heads < GROUP
        q_rows = (token * num_heads + kv_head * GROUP + heads) * HEAD_DIM
        q = tl.load(q_ptr + q_rows[:, None] + dims[None, :], mask=head_ok[:, None],
                    other=0.0).to(tl.float32) * scale  # [G, D]
        row_max = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        row_sum = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
        for b in range(0, tl.cdiv(visible, BLOCK_SIZE)):
            block = tl.load(table + b).to(tl.int64)
            key_ok = b * BLOCK_SIZE + slots < visible
            rows = (block * NUM_KV_HEADS + kv_head) * BLOCK_SIZE + slots  # [bs]
            offsets = rows[:, None] * HEAD_DIM + dims[None, :]
            if IS_FP8:
                k = fp8_e4m3_to_float(tl.load(k_ptr + offsets, mask=key_ok[:, None],
                                               other=0))
                v = fp8_e4m3_to_float(tl.load(v_ptr + offsets, mask=key_ok[:, None],
                                               other=0))
                k = k * tl.load(k_scale_ptr + rows, mask=key_ok, other=0.0)[:, None]
                v = v * tl.load(v_scale_ptr + rows, mask=key_ok, other=0.0)[:, None]
            else:
                k = tl.load(k_ptr + offsets, mask=key_ok[:, None], other=0.0).to(tl.float32)
                v = tl.load(v_ptr + offsets, mask=key_ok[:, None], other=0.0).to(tl.float32)
            scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # [G, bs]
            scores = tl.where(key_ok[None, :], scores, float("-inf"))
            new_max = tl.maximum(row_max, tl.max(scores, axis=1))
            weights = tl.exp(scores - new_max[:, None])
            correction = tl.exp(row_max - new_max)
            row_sum = row_sum * correction + tl.sum(weights, axis=1)
            acc = acc * correction[:, None] + tl.sum(weights[:, :, None] * v[None, :, :],
                                                     axis=1)
            row_max = new_max
        result = acc / row_sum[:, None]
        tl.store(out_ptr + q_rows[:, None] + dims[None, :],
                 result.to(out_ptr.dtype.element_ty), mask=head_ok[:, None])

"""The hand-written polynomial attention kernel against the plain formula."""
import pytest
import torch

from polynext.ops.poly_attention import _PolyAttentionFunction, _tiles, poly_attention, poly_attention_reference


def _qkv(dtype=torch.float64, b=2, h=3, n=11, m=11, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(b, h, n, d, generator=g, dtype=dtype) * 0.4).requires_grad_()
    k = (torch.randn(b, h, m, d, generator=g, dtype=dtype) * 0.4).requires_grad_()
    v = torch.randn(b, h, m, d, generator=g, dtype=dtype).requires_grad_()
    return q, k, v


def test_gradcheck_with_chunking():
    q, k, v = _qkv()
    assert torch.autograd.gradcheck(lambda q, k, v: _PolyAttentionFunction.apply(q, k, v, 4, 2 * 3 * 11 * 4 * 3),
                                    (q, k, v))


@pytest.mark.parametrize('chunk_bytes', [1, 1000, 2 ** 26])
def test_matches_reference_forward_and_backward(chunk_bytes):
    q, k, v = _qkv(torch.float32, n=37, m=37, d=8)
    out = poly_attention(q, k, v, chunk_bytes=chunk_bytes)
    ref = poly_attention_reference(q, k, v)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    g = torch.randn_like(out)
    ga = torch.autograd.grad(out, (q, k, v), g)
    gb = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_inference_path_has_no_autograd_and_matches():
    q, k, v = _qkv(torch.float32)
    with torch.no_grad():
        out = poly_attention(q, k, v, chunk_bytes=64)
    assert out.grad_fn is None
    torch.testing.assert_close(out, poly_attention_reference(q, k, v).detach(), atol=1e-6, rtol=1e-5)


def test_bfloat16_gradients_close_to_float64():
    """The low-precision backward (products in bf16, the power, row sums and dL/dA in float32)."""
    q, k, v = _qkv(torch.float64, n=64, m=64, d=16)
    g = torch.randn(q.shape, dtype=torch.float64)
    want = torch.autograd.grad(poly_attention_reference(q, k, v), (q, k, v), g)
    qb, kb, vb = (t.detach().bfloat16().requires_grad_() for t in (q, k, v))
    got = torch.autograd.grad(poly_attention(qb, kb, vb), (qb, kb, vb), g.bfloat16())
    for a, b in zip(got, want):
        assert a.dtype == torch.bfloat16
        assert (a.double() - b).norm() <= 1e-2 * b.norm()   # measured 5.0e-3 to 5.7e-3


def test_bfloat16_close_to_float32():
    q, k, v = _qkv(torch.float32, n=64, m=64, d=16)
    ref = poly_attention_reference(q, k, v)
    out = poly_attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)


def test_tiles():
    """The tiles the kernel works through (heads of the flattened batch·heads, query rows)."""
    q = torch.empty(2, 3, 10, 4)                # 6 heads, 10 queries; 10 keys: 400 bytes of float32 scores a head
    rows = slice(0, 10)
    # float32: whole heads, as many as fit (the chunk below the cache-sized tile)
    assert list(_tiles(q, 10, 1000)) == [(slice(0, 2), rows), (slice(2, 4), rows), (slice(4, 6), rows)]
    assert list(_tiles(q, 10, 2 ** 26)) == [(slice(0, 6), rows)]
    # a head larger than the tile: blocks of rows across all heads
    assert list(_tiles(q, 10, 300)) == [(slice(0, 6), slice(r, r + 1)) for r in range(10)]
    # bfloat16: blocks of rows across all heads
    assert list(_tiles(q.bfloat16(), 10, 1000)) == [
        (slice(0, 6), slice(0, 4)), (slice(0, 6), slice(4, 8)), (slice(0, 6), slice(8, 10))]


def test_odd_power_refused():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match='even'):
        poly_attention(q, k, v, power=3)


def test_strided_heads_match_reference_fp64():
    # heads as strided views of a channels-last activation, as PolyAttn passes them
    g = torch.Generator().manual_seed(3)
    b, h, n, d = 2, 3, 25, 4
    base = torch.randn(b, n, 3 * h * d, generator=g, dtype=torch.float64) * 0.3

    def heads(i):
        return base[..., i * h * d:(i + 1) * h * d].reshape(b, n, h, d).transpose(1, 2).detach().requires_grad_()

    q, k, v = heads(0), heads(1), heads(2)
    assert not q.is_contiguous()
    grad = torch.randn(b, h, n, d, generator=g, dtype=torch.float64)
    ref = poly_attention_reference(q, k, v)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad)
    # one tile; two heads per tile; five rows of every head per tile
    for chunk_bytes in (2 ** 26, 2 * n * n * 4, b * h * n * 4 * 5):
        out = poly_attention(q, k, v, chunk_bytes=chunk_bytes)
        # nothing N×N is kept for the backward: q, k, v (made contiguous), out, row sums
        assert [t.shape[-1] for t in out.grad_fn.saved_tensors] == [d, d, d, d, 1]
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        for a, r in zip(torch.autograd.grad(out, (q, k, v), grad), ref_grads):
            torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
def test_gradients_keep_the_channels_last_heads_layout(dtype):
    """Q, K, V as PolyAttn makes them (the heads of a channels-last activation: a dense strided view) get gradients
    in that same layout, so the activation's gradient comes back channels-last (not as a contiguous NCHW copy for
    the depthwise and 1x1 convolutions' backward to convert again); the values are the reference's. Heads that are
    not a dense view (test_strided_heads_match_reference_fp64) keep contiguous gradients. float32 takes the fused
    kernel where it is built."""
    g = torch.Generator().manual_seed(4)
    b, h, d, side = 2, 3, 16, 5
    acts = [(torch.randn(b, h * d, side, side, generator=g, dtype=dtype) * 0.3)
            .contiguous(memory_format=torch.channels_last).requires_grad_() for _ in range(3)]
    q, k, v = (a.reshape(b, h, d, -1).transpose(-1, -2) for a in acts)
    assert not q.is_contiguous()
    grad = torch.randn(b, h, side * side, d, generator=g, dtype=dtype)
    got = torch.autograd.grad(poly_attention(q, k, v), acts, grad)
    heads = torch.autograd.grad(poly_attention(q, k, v), (q, k, v), grad)
    ref = torch.autograd.grad(poly_attention_reference(q.double(), k.double(), v.double()), acts, grad.double())
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    for a, t, r in zip(got, heads, ref):
        assert a.is_contiguous(memory_format=torch.channels_last)
        assert t.stride() == q.stride()
        torch.testing.assert_close(a.double(), r.double(), rtol=tol, atol=tol)

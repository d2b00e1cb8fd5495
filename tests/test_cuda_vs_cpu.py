"""CUDA against CPU: the forward (fp32 and bf16), a training step and the attention kernel.

Each check runs the same computation twice, on a target and on the CPU in float32, and measures
the relative error ``max |target − cpu| / max |cpu|`` per output tensor. With a GPU the target is
``cuda`` (TF32 off for the fp32 checks; bf16 through autocast). Without one, the CUDA cases are
skipped and the same functions run with the target ``cpu64``: fp32 checks against the CPU in
float64, bf16 checks against CPU bf16 autocast. So the comparison code itself (copying the model,
moving inputs, gathering gradients, the error measure, the tolerances) runs on every machine and
is known to pass on a correct implementation.

Two measures: fp32 is held to the maximum relative error (1e-4 on outputs, 5e-4 on gradients;
float64 vs float32 on the CPU measures ≤ 4.7e-6 and ≤ 9.5e-5), bf16 to the relative L2 error
‖a − b‖ / ‖b‖ (0.3 on outputs, 0.4 on the gradient vector). bf16 is that loose because these
random-initialised polynomial minis lose 5-17 % of the logits' L2 norm to bf16 rounding (CPU bf16
autocast: 0.17 / 0.07 / 0.05 for cpolynext_t / apolynext_t / cpolynext_t_bn; gradients 0.22 / 0.10);
it still catches a wrong kernel, layout or dtype path, which moves outputs by O(1) (one gate of
cpolynext_t set to 1 − g: 1.1).
"""
import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import polynext
from polynext import load_reference_state_dict
from polynext.ops.poly_attention import poly_attention

from conftest import GOLDEN, mini_kwargs

needs_cuda = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')]
TARGETS = [pytest.param('cuda', marks=needs_cuda), 'cpu64']

FP32_TOL, FP32_GRAD_TOL = 1e-4, 5e-4      # max relative error
BF16_TOL, BF16_GRAD_TOL = 0.3, 0.4        # relative L2 error

#: mini model -> golden folder whose (calibrated) weights it loads; None = seeded random init
MODELS = {'cpolynext_t': None, 'apolynext_t': None, 'apolynext_t_bn': 'APolyNeXt_T_bn'}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| / max |b|, computed in float64 on the CPU (nan if either has a nan)."""
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖₂ / ‖b‖₂, computed in float64 on the CPU."""
    a, b = a.detach().cpu().double().flatten(), b.detach().cpu().double().flatten()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def error(a, b, precision):
    return rel_err(a, b) if precision == 'fp32' else rel_l2(a, b)


@contextlib.contextmanager
def on_target(target: str, precision: str):
    """Yields (device, parameter dtype) and sets up autocast / TF32 for one side of a comparison."""
    if precision not in ('fp32', 'bf16'):
        raise ValueError(precision)
    device = 'cuda' if target == 'cuda' else 'cpu'
    if target not in ('cuda', 'cpu64'):
        raise ValueError(target)
    param_dtype = torch.float64 if (target == 'cpu64' and precision == 'fp32') else torch.float32
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == 'bf16'):
            yield torch.device(device), param_dtype
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = polynext.create_model(name, **mini_kwargs(name))
    folder = MODELS.get(name)
    if folder is not None:
        load_reference_state_dict(model, load_file(str(GOLDEN / folder / 'state_dict.safetensors')))
    return model


def _input(seed=1234, batch=2):
    return torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def forward_on(model, x, target=None, precision='fp32'):
    """Eval logits of a copy of ``model``: on the CPU in float32 (target None) or on ``target``."""
    m = copy.deepcopy(model).eval()
    if target is None:
        with torch.no_grad():
            return m(x)
    with on_target(target, precision) as (device, dtype), torch.no_grad():
        return m.to(device, dtype)(x.to(device, dtype)).float().cpu()


def train_step_on(model, x, y, target=None, precision='fp32', lr=0.1):
    """One training step of a copy of ``model`` (train mode, cross-entropy, backward, SGD):
    returns the loss, every gradient and every weight after the step, as float32 CPU tensors."""
    m = copy.deepcopy(model).train()
    ctx = contextlib.nullcontext((torch.device('cpu'), torch.float32)) if target is None else on_target(target, precision)
    with ctx as (device, dtype):
        m = m.to(device, dtype)
        opt = torch.optim.SGD(m.parameters(), lr=lr)
        loss = F.cross_entropy(m(x.to(device, dtype)).float(), y.to(device))
        loss.backward()
    grads = {n: p.grad.float().cpu() for n, p in m.named_parameters()}
    opt.step()
    weights = {n: p.detach().float().cpu() for n, p in m.named_parameters()}
    return loss.detach().float().cpu(), grads, weights


def grad_errors(grads, ref_grads):
    """Per-tensor error relative to the larger of the tensor's own scale and 1 % of the largest
    gradient anywhere (a tensor whose gradient is ~0 is not judged on its rounding noise)."""
    top = max(g.abs().max().item() for g in ref_grads.values())
    out = {}
    for n, g in ref_grads.items():
        scale = max(g.abs().max().item(), 1e-2 * top)
        out[n] = (grads[n].double() - g.double()).abs().max().item() / scale
    return out


@pytest.mark.parametrize('target', TARGETS)
@pytest.mark.parametrize('precision', ['fp32', 'bf16'])
@pytest.mark.parametrize('name', list(MODELS))
def test_forward_matches_cpu(name, precision, target):
    model = build(name)
    x = _input()
    ref = forward_on(model, x)
    assert torch.isfinite(ref).all() and ref.abs().max() > 1e-3
    out = forward_on(model, x, target, precision)
    tol = FP32_TOL if precision == 'fp32' else BF16_TOL
    err = error(out, ref, precision)
    assert err <= tol, f'{name} {precision} on {target}: relative error {err:.2e} > {tol}'


@pytest.mark.parametrize('target', TARGETS)
@pytest.mark.parametrize('precision', ['fp32', 'bf16'])
def test_training_step_matches_cpu(precision, target):
    """apolynext_t (PolyConv stages and the recomputing attention kernel): loss, every gradient
    and every weight after one SGD step."""
    model = build('apolynext_t')
    x, y = _input(), torch.tensor([3, 9])
    loss_ref, grads_ref, w_ref = train_step_on(model, x, y)
    loss, grads, w = train_step_on(model, x, y, target, precision)
    if precision == 'fp32':
        assert rel_err(loss, loss_ref) <= FP32_TOL
        errors = grad_errors(grads, grads_ref)
        worst = max(errors, key=errors.get)
        assert errors[worst] <= FP32_GRAD_TOL, f'gradient of {worst}: relative error {errors[worst]:.2e}'
        for n in w_ref:  # the step itself: w − lr·g
            torch.testing.assert_close(w[n], w_ref[n], atol=0.1 * FP32_GRAD_TOL * grads_ref[n].abs().max().item(),
                                       rtol=1e-6, msg=n)
    else:
        assert rel_l2(loss, loss_ref) <= BF16_TOL
        flat = [torch.cat([g[n].flatten() for n in grads_ref]) for g in (grads, grads_ref)]
        assert rel_l2(*flat) <= BF16_GRAD_TOL
        assert all(torch.isfinite(w[n]).all() for n in w)


@pytest.mark.parametrize('target', TARGETS)
@pytest.mark.parametrize('precision', ['fp32', 'bf16'])
@pytest.mark.parametrize('chunk_bytes', [4096, None])
def test_attention_kernel_matches_cpu(chunk_bytes, precision, target):
    """poly_attention forward and backward (recomputing kernel, chunked and not) against the CPU."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 49, 32, generator=g) * s for s in (0.1, 0.1, 1.0))
    grad = torch.randn(2, 3, 49, 32, generator=g)

    def run(device, dtype, autocast):
        t = [a.detach().clone().to(device, dtype).requires_grad_() for a in (q, k, v)]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            qq, kk, vv = (a.to(torch.bfloat16) if autocast else a for a in t)
            out = poly_attention(qq, kk, vv, chunk_bytes=chunk_bytes)
        out.backward(grad.to(device, out.dtype))
        return [out.float().cpu()] + [a.grad.float().cpu() for a in t]

    ref = run(torch.device('cpu'), torch.float32, False)
    with on_target(target, precision) as (device, dtype):
        got = run(device, dtype, precision == 'bf16')
    for what, a, b in zip(('out', 'dq', 'dk', 'dv'), got, ref):
        if precision == 'fp32':
            tol = FP32_TOL if what == 'out' else FP32_GRAD_TOL
        else:
            tol = BF16_TOL if what == 'out' else BF16_GRAD_TOL
        err = error(a, b, precision)
        assert err <= tol, f'{what}: relative error {err:.2e} > {tol}'


def test_comparison_notices_a_wrong_result():
    """The measures are not blind: one gate of one cell set to 1 − g moves the logits far beyond
    both tolerances."""
    model = build('cpolynext_t')
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.stages[2].cells[0].gates.logits.neg_()
    x = _input()
    good, bad = forward_on(model, x), forward_on(broken, x)
    assert rel_err(bad, good) > 1000 * FP32_TOL and rel_l2(bad, good) > 2 * BF16_TOL

"""Where the time goes: a step's time by op class, each class's achieved rate against the machine's peak.

``profile_model(model, settings)`` runs one inference or training step of ``model`` (the step of
:func:`polynext.bench.make_step`) under ``torch.profiler`` several times and sorts every operator
into one of the classes of :data:`OP_CLASSES`:

==========================  ====================================================================
class                       operators
==========================  ====================================================================
1x1 conv                    pointwise convolutions (forward; backward = grad input + grad weight)
depthwise conv              depthwise convolutions (one filter per channel; any kernel, dilation)
other conv                  dense k×k convolutions (the stem, 3x3/2 reductions)
elementwise                 Hadamard products, gates, residual additions, channel scales
norms                       LayerNorm / ChannelBatchNorm / folded norms, forward and backward
attention                   the attention kernel: score matmuls, power, row sums, softmax
copies and layout           copies, flips, concatenations, layout changes (contiguous, permute)
optimizer                   ``AdamW.step`` and ``zero_grad``
other                       the classifier, the loss, gradient accumulation, Python overhead
==========================  ====================================================================

Norm and attention modules are recognised by type (a profiling-only forward hook opens a labelled
range around them, and around ``attend``, which PolyNeXt's training blocks call without the module's
forward); a backward node gets the class of the forward operator that created it (autograd's
sequence number), or, for hand-written autograd functions, of its name. The backward of a
hand-written depthwise function (``ops.depthwise``) counts the layer's own work, input and weight
gradients, not the phase and column pieces it runs. Besides the classes, every operator's time is
kept by (class, operator, first operand's shape): ``StepProfile.top_ops`` / ``format_top_ops`` list
the heaviest, which says which layer makes a class slow. Each class's
work is counted from the operators' shapes: MACs for convolutions and attention matmuls, bytes
moved (operands read plus the result written, estimated from the shapes) for the memory-bound
classes, and for the optimizer the minimum traffic of AdamW (7 fp32 words per parameter).

``measure_peaks()`` measures what this machine does at best for each kind of work, in this
process, with this dtype and thread count: the fastest of several channels-last 1x1
convolutions (GMAC/s), a channels-last depthwise 3x3 convolution (GMAC/s), a matrix product
(GMAC/s) and a large copy (GB/s, read + write). The model-level bound used by the README and
``benchmarks/cpu_limit.py`` is :func:`conv1x1_bound`: the images/s a model would reach if all of
its MACs ran at the 1x1-conv peak.

Why not ``torch.profiler``'s table alone: it lists operators, not what they do in the network
(a ``mul`` may be a gate, a norm's arithmetic or the attention's power), and it has no roofline.
"""
from __future__ import annotations

import contextlib
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

__all__ = [
    'OP_CLASSES', 'Peak', 'measure_peaks', 'conv1x1_bound', 'ClassTime', 'StepProfile', 'profile_step',
    'profile_model', 'format_profile', 'format_top_ops', 'prefault_heap', 'conv_op_class',
]

OP_CLASSES = ('1x1 conv', 'depthwise conv', 'other conv', 'elementwise', 'norms', 'attention',
              'copies and layout', 'optimizer', 'other')

#: which peak each class is measured against, and the unit of its work
_CLASS_PEAK = {'1x1 conv': 'conv1x1', 'depthwise conv': 'depthwise', 'other conv': 'conv1x1',
               'elementwise': 'memory', 'norms': 'memory', 'attention': 'matmul', 'copies and layout': 'memory',
               'optimizer': 'memory'}
_UNIT = {'conv1x1': 'GMAC/s', 'depthwise': 'GMAC/s', 'matmul': 'GMAC/s', 'memory': 'GB/s'}

_DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}
_ELEM_BYTES = {'float': 4, 'c10::BFloat16': 2, 'c10::Half': 2, 'double': 8, 'long int': 8, 'int': 4, 'bool': 1,
               'unsigned char': 1, 'signed char': 1, 'short int': 2}


# --------------------------------------------------------------------------------------
# Machine peaks
# --------------------------------------------------------------------------------------

@dataclass
class Peak:
    """The best measured rate of one kind of work (``unit``), and the probe that reached it."""
    name: str
    rate: float
    unit: str
    probe: str


def _median_seconds(fn: Callable[[], Any], runs: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


#: (C_in, C_out, H=W) of the 1x1 probes: the pointwise layers of the S-size models at 224 px
CONV1X1_PROBES = ((72, 288, 56), (144, 576, 28), (288, 1008, 14), (432, 1512, 7), (192, 768, 14))
DEPTHWISE_PROBES = ((96, 56), (216, 28))


def measure_peaks(dtype: str = 'fp32', batch_size: int = 32, runs: int = 5, device: str = 'cpu',
                  memory_mib: int = 256) -> Dict[str, Peak]:
    """This machine's best rate for each kind of work, measured now (see the module docstring).

    1x1 and depthwise convolutions run on channels-last tensors of ``batch_size`` images in
    ``dtype``, as the models run them; the rate is the median over ``runs`` calls of the fastest
    probe shape.
    """
    dt = _DTYPES[dtype]
    dev = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == 'cuda' else (lambda: None)
    cl = torch.channels_last
    peaks: Dict[str, Peak] = {}

    def timed(fn: Callable[[], Any]) -> float:
        def call() -> None:
            fn()
            sync()
        return _median_seconds(call, runs)

    with torch.inference_mode():
        best = (0.0, '')
        for cin, cout, hw in CONV1X1_PROBES:
            x = torch.randn(batch_size, cin, hw, hw, device=dev, dtype=dt).contiguous(memory_format=cl)
            w = torch.randn(cout, cin, 1, 1, device=dev, dtype=dt)
            rate = batch_size * hw * hw * cin * cout / timed(lambda: torch.nn.functional.conv2d(x, w)) / 1e9
            if rate > best[0]:
                best = (rate, f'{cin}->{cout} at {hw}x{hw}, batch {batch_size}, channels-last')
        peaks['conv1x1'] = Peak('1x1 conv', best[0], 'GMAC/s', best[1])

        best = (0.0, '')
        for c, hw in DEPTHWISE_PROBES:
            x = torch.randn(batch_size, c, hw, hw, device=dev, dtype=dt).contiguous(memory_format=cl)
            w = torch.randn(c, 1, 3, 3, device=dev, dtype=dt)
            rate = (batch_size * hw * hw * c * 9
                    / timed(lambda: torch.nn.functional.conv2d(x, w, padding=1, groups=c)) / 1e9)
            if rate > best[0]:
                best = (rate, f'3x3 on {c} channels at {hw}x{hw}, batch {batch_size}, channels-last')
        peaks['depthwise'] = Peak('depthwise conv', best[0], 'GMAC/s', best[1])

        n = 1024
        a = torch.randn(n, n, device=dev, dtype=dt)
        b = torch.randn(n, n, device=dev, dtype=dt)
        peaks['matmul'] = Peak('matrix product', n ** 3 / timed(lambda: torch.mm(a, b)) / 1e9, 'GMAC/s',
                               f'torch.mm {n}x{n}x{n}')

        numel = memory_mib * 2 ** 20 // 4
        src = torch.randn(numel, device=dev)
        dst = torch.empty_like(src)
        peaks['memory'] = Peak('memory', 2 * src.nbytes / timed(lambda: dst.copy_(src)) / 1e9, 'GB/s',
                               f'copy of {memory_mib} MiB fp32 (read + write)')
    return peaks


def conv1x1_bound(macs_per_image: float, peaks: Dict[str, Peak]) -> float:
    """Images/s if every MAC of the model ran at the measured 1x1-conv peak (no model can be faster)."""
    return peaks['conv1x1'].rate * 1e9 / macs_per_image


# --------------------------------------------------------------------------------------
# Sorting profiler events into op classes
# --------------------------------------------------------------------------------------

_SCOPE = 'polynext::scope::'
_CONV_OPS = {'aten::conv2d', 'aten::convolution', 'aten::_convolution', 'aten::mkldnn_convolution',
             'aten::_convolution_depthwise2d', 'aten::thnn_conv2d', 'aten::slow_conv_dilated2d',
             'aten::cudnn_convolution', 'mkldnn::_convolution_pointwise', 'mkldnn::_convolution_pointwise_'}
_LINEAR_OPS = {'aten::linear', 'aten::addmm', 'aten::mm', 'aten::matmul', 'aten::bmm', 'aten::baddbmm',
               'aten::scaled_dot_product_attention', 'aten::_scaled_dot_product_flash_attention_for_cpu',
               'aten::_softmax', 'aten::softmax'}
_COPY_OPS = {'aten::copy_', 'aten::clone', 'aten::contiguous', 'aten::flip', 'aten::cat', 'aten::to',
             'aten::_to_copy', 'aten::stack', 'aten::repeat', 'aten::index_select', 'aten::reshape',
             'aten::_unsafe_view', 'aten::zeros_like', 'aten::zero_', 'aten::fill_'}
_NORM_OPS = {'aten::layer_norm', 'aten::native_layer_norm', 'aten::native_layer_norm_backward',
             'aten::group_norm', 'aten::native_group_norm', 'aten::batch_norm', 'aten::native_batch_norm',
             'aten::_native_batch_norm_legit', 'aten::_native_batch_norm_legit_no_training',
             'polynext::channel_norm', 'polynext::channel_norm_', 'polynext::channel_norm_stats',
             'polynext::channel_norm_backward'}
_ELEMENTWISE_OPS = {'aten::mul', 'aten::mul_', 'aten::add', 'aten::add_', 'aten::addcmul', 'aten::addcmul_',
                    'aten::sub', 'aten::sub_', 'aten::div', 'aten::div_', 'aten::sigmoid', 'aten::sigmoid_',
                    'aten::pow', 'aten::pow_', 'aten::square', 'aten::square_', 'aten::rsqrt', 'aten::neg',
                    'aten::neg_', 'aten::clamp', 'aten::clamp_', 'aten::clamp_min', 'aten::clamp_min_',
                    'aten::where', 'aten::gelu', 'aten::gelu_backward', 'aten::relu', 'aten::relu_',
                    'aten::threshold_backward', 'aten::sigmoid_backward', 'aten::exp', 'aten::lerp_',
                    'aten::mean', 'aten::sum', 'aten::var_mean', 'aten::rand_like', 'aten::lt', 'aten::addcdiv_',
                    'polynext::flip_mul', 'polynext::flip_mul_backward'}
_BACKWARD = 'autograd::engine::evaluate_function: '
_BACKWARD_NAMES = (  # custom autograd functions and generic nodes, by name
    ('PolyAttention', 'attention'), ('FlexAttention', 'attention'), ('ScaledDotProduct', 'attention'),
    ('Softmax', 'attention'), ('Bmm', 'attention'), ('HalvesProduct', 'elementwise'), ('FlipProduct', 'elementwise'),
    ('NativeLayerNorm', 'norms'), ('ChannelNorm', 'norms'), ('NativeGroupNorm', 'norms'), ('NativeBatchNorm', 'norms'),
    ('AccumulateGrad', 'other'), ('Mm', 'other'), ('Addmm', 'other'), ('NllLoss', 'other'),
    ('LogSoftmax', 'other'), ('Mean', 'other'),
    ('Permute', 'copies and layout'), ('View', 'copies and layout'), ('Transpose', 'copies and layout'),
    ('Clone', 'copies and layout'), ('Cat', 'copies and layout'), ('Split', 'copies and layout'),
    ('Chunk', 'copies and layout'), ('Expand', 'copies and layout'), ('Slice', 'copies and layout'),
    ('Unsafe', 'copies and layout'), ('Reshape', 'copies and layout'), ('Flip', 'copies and layout'),
    ('ToCopy', 'copies and layout'), ('Select', 'copies and layout'), ('Squeeze', 'copies and layout'),
    ('Unsqueeze', 'copies and layout'), ('Narrow', 'copies and layout'), ('Stack', 'copies and layout'),
    ('Mul', 'elementwise'), ('Add', 'elementwise'), ('Sub', 'elementwise'), ('Div', 'elementwise'),
    ('Sigmoid', 'elementwise'), ('Pow', 'elementwise'), ('Rsqrt', 'elementwise'), ('Neg', 'elementwise'),
    ('Clamp', 'elementwise'), ('Gelu', 'elementwise'), ('Relu', 'elementwise'), ('Sum', 'elementwise'),
    ('Where', 'elementwise'), ('Exp', 'elementwise'), ('Square', 'elementwise'),
)


def _numel(shape: Sequence[int]) -> int:
    return math.prod(shape) if shape else 1


def _operand_bytes(ev) -> float:
    """Bytes an elementwise-like operator moves: every tensor operand read once, the largest written once."""
    sizes = []
    dtypes = list(getattr(ev, 'input_dtypes', None) or [])
    for i, shape in enumerate(ev.input_shapes or []):
        if not isinstance(shape, (list, tuple)) or not shape or not all(isinstance(s, int) for s in shape):
            continue
        dt = dtypes[i] if i < len(dtypes) else 'float'
        sizes.append(_numel(shape) * _ELEM_BYTES.get(dt, 4))
    return float(sum(sizes) + (max(sizes) if sizes else 0))


def _conv_geometry(ev) -> Optional[Tuple[List[int], List[int], Dict[str, Any]]]:
    """(input shape, weight shape, args) of a convolution event, or None."""
    shapes = ev.input_shapes or []
    concrete = list(getattr(ev, 'concrete_inputs', None) or [])
    name = ev.name
    if name == 'aten::convolution_backward':      # (grad_out, input, weight, bias_sizes, stride, padding, ...)
        if len(shapes) < 3:
            return None
        return shapes[1], shapes[2], dict(grad_out=shapes[0],
                                          mask=concrete[10] if len(concrete) > 10 else [True, True, False])
    if name == 'mkldnn::_convolution_pointwise_':   # in place: (other, X, W, B, padding, stride, dilation, ...)
        x_i, w_i, rest = 1, 2, 4
    elif name == 'mkldnn::_convolution_pointwise':   # (X, W, B, padding, ...) or .binary (X, other, W, B, ...)
        binary = len(shapes) > 2 and isinstance(shapes[2], (list, tuple)) and len(shapes[2]) == 4
        x_i, w_i, rest = (0, 2, 4) if binary else (0, 1, 3)
    else:                                            # aten::conv2d (X, W, B, stride, padding, dilation, groups)
        x_i, w_i, rest = 0, 1, 3
    if len(shapes) <= w_i or len(shapes[w_i]) != 4 or len(shapes[x_i]) != 4:
        return None
    args = {}
    vals = concrete[rest:rest + 4] if len(concrete) >= rest + 4 else []
    if name.startswith('mkldnn') and len(vals) == 4:
        args = dict(padding=vals[0], stride=vals[1], dilation=vals[2])
    elif len(vals) == 4:
        args = dict(stride=vals[0], padding=vals[1], dilation=vals[2])
    return shapes[x_i], shapes[w_i], args


def _conv_class_and_macs(ev) -> Tuple[str, float]:
    geo = _conv_geometry(ev)
    if geo is None:
        return 'other conv', 0.0
    x, w, args = geo
    cin, (cout, cin_g, kh, kw) = x[1], w
    groups = max(1, cin // max(cin_g, 1))
    if kh == kw == 1 and groups == 1:
        cls = '1x1 conv'
    elif cin_g == 1 and groups > 1:
        cls = 'depthwise conv'
    else:
        cls = 'other conv'
    if 'grad_out' in args:
        out = args['grad_out']
        mask = args['mask'] or [True, True, False]
        passes = int(bool(mask[0])) + int(bool(mask[1]))
        return cls, float(_numel(out) * cin_g * kh * kw * passes)

    def out_size(n: int, i: int) -> int:
        st = (args.get('stride') or [1, 1])[i] if isinstance(args.get('stride'), (list, tuple)) else 1
        pd = (args.get('padding') or [0, 0])[i] if isinstance(args.get('padding'), (list, tuple)) else 0
        dl = (args.get('dilation') or [1, 1])[i] if isinstance(args.get('dilation'), (list, tuple)) else 1
        k = (kh, kw)[i]
        return (n + 2 * pd - dl * (k - 1) - 1) // st + 1 if args else n
    oh, ow = out_size(x[2], 0), out_size(x[3], 1)
    return cls, float(x[0] * cout * oh * ow * cin_g * kh * kw)


def conv_op_class(ev) -> str:
    """'1x1 conv', 'depthwise conv' or 'other conv' for a profiler event of a convolution (forward or
    ``convolution_backward``), from its shapes."""
    return _conv_class_and_macs(ev)[0]


#: the operators of several depthwise convolutions in one kernel (the input, then each convolution's taps as
#: (k*k, C)): ops.polyconv_dw's (PolyConv's three, on u), ops.attention_convs' (PolyAttn's Q, K and V convolutions,
#: each on half the projection's 2A channels; its output convolution, on the heads): depthwise convolutions with
#: their MACs, the input's values per output channel times the taps
_FUSED_DEPTHWISE = {'polynext::polyconv_dw': 1.0, 'polynext::attention_convs': 0.5, 'polynext::heads_conv': 1.0}


def _fused_depthwise_macs(ev) -> float:
    shapes = ev.input_shapes or []
    taps = [s for s in shapes[1:4] if isinstance(s, (list, tuple)) and len(s) == 2]
    if not shapes or len(shapes[0]) != 4 or not taps:
        return 0.0
    return float(_numel(shapes[0]) * _FUSED_DEPTHWISE[ev.name] * sum(s[0] for s in taps))


#: ops.narrow_pointwise's operators: 1x1 convolutions (x, then the packed weight, K x N values; pointwise_norm's
#: LayerNorm epilogue is counted inside its convolution)
_NARROW_POINTWISE = ('polynext::pointwise', 'polynext::pointwise_add_', 'polynext::pointwise_norm',
                     'polynext::pointwise_norm_')


def _narrow_pointwise_macs(ev) -> float:
    shapes = ev.input_shapes or []
    if len(shapes) < 2 or len(shapes[0]) != 4 or len(shapes[1]) != 1 or not shapes[0][1]:
        return 0.0
    return float(_numel(shapes[0]) * shapes[1][0] / shapes[0][1])


def _poly_mlp_macs(ev) -> float:
    """ops.narrow_pointwise.poly_mlp_ (x, the packed input projection, the norm's weight and bias, the packed output
    projection): both projections' MACs."""
    shapes = ev.input_shapes or []
    if (len(shapes) < 5 or len(shapes[0]) != 4 or len(shapes[1]) != 1 or len(shapes[4]) != 1
            or not shapes[0][1]):
        return 0.0
    return float(_numel(shapes[0]) * (shapes[1][0] + shapes[4][0]) / shapes[0][1])


#: the products in one call of ops.cpu_kernels' fused attention operators (each Q·K-sized)
_FUSED_ATTENTION = {'polynext::poly_attention_fused': 2.0, 'polynext::poly_attention_backward_fused': 5.0}


def _matmul_macs(ev) -> float:
    shapes = ev.input_shapes or []
    if ev.name in _FUSED_ATTENTION and len(shapes) >= 2 and len(shapes[0]) == 3:
        (heads, queries, dim), keys = shapes[0], shapes[1][1]
        # ops.cpu_kernels' fused attention: Q Kᵀ and A V; its backward the recomputed scores and four gradients
        return _FUSED_ATTENTION[ev.name] * heads * queries * keys * dim
    if ev.name in ('aten::bmm', 'aten::mm', 'aten::matmul', 'aten::baddbmm', 'aten::addmm'):
        mats = [s for s in shapes if isinstance(s, (list, tuple)) and len(s) >= 2]
        if ev.name in ('aten::baddbmm', 'aten::addmm'):
            mats = mats[1:]
        if len(mats) >= 2:
            a, b = mats[0], mats[1]
            return float(_numel(a[:-2]) * a[-2] * a[-1] * b[-1])
    return 0.0


@dataclass
class ClassTime:
    """One op class in one profiled step: time (s), work (MACs or bytes) and calls."""
    seconds: float = 0.0
    macs: float = 0.0
    bytes: float = 0.0
    calls: int = 0


class _Sorter:
    """Walks the profiler's event tree of one step and sums time and work per class.

    ``device``: time an operator by the GPU kernels it launched (the profiler links each kernel to the
    innermost operator or range open when it was launched) instead of its CPU time, which on a GPU is the
    launch. Kernels launched by a range that is not an aten operator (inductor's Triton kernels, e.g. the
    compiled flex attention) count in the class of the range's scope."""

    def __init__(self, device: bool = False):
        self.device = device
        self.classes: Dict[str, ClassTime] = {c: ClassTime() for c in OP_CLASSES}
        self.ops: Dict[Tuple[str, str, str], ClassTime] = {}   # (class, operator, first shape) -> time and work
        self.seq_class: Dict[int, str] = {}
        self.seq_conv: Dict[int, Tuple[str, float]] = {}   # hand-written conv functions: class, forward MACs

    def total_s(self, ev) -> float:
        """The time of ``ev`` and everything under it, in seconds, on this sorter's clock."""
        return (ev.device_time_total if self.device else ev.cpu_time_total) / 1e6

    def self_s(self, ev) -> float:
        return (ev.self_device_time_total if self.device else ev.self_cpu_time_total) / 1e6

    def add(self, cls: str, ev, seconds: Optional[float] = None, macs: float = 0.0, nbytes: float = 0.0) -> None:
        seconds = self.total_s(ev) if seconds is None else seconds
        for c in (self.classes[cls], self.ops.setdefault((cls,) + _op_label(ev), ClassTime())):
            c.seconds += seconds
            c.macs += macs
            c.bytes += nbytes
            c.calls += 1

    def add_overhead(self, ev, scope: Optional[str] = None) -> None:
        """The self time of a range or Python-level event whose children are sorted on their own (not counted
        as a call): 'other' on the CPU, where it is Python's time; on a GPU it is the kernels the range launched
        itself, which are its scope's work (attention, norms) where it has one."""
        cls = scope if self.device and scope in self.classes else 'other'
        self.add(cls, ev, seconds=self.self_s(ev))
        self.classes[cls].calls -= 1
        self.ops[(cls,) + _op_label(ev)].calls -= 1

    def add_unlinked_kernels(self, seconds: float) -> None:
        """GPU kernel time the profiler linked to no operator ('other', one row)."""
        if seconds > 0:
            for c in (self.classes['other'], self.ops.setdefault(('other', 'kernels without an operator', ''),
                                                                 ClassTime())):
                c.seconds += seconds

    def remember(self, ev, cls: str) -> None:
        stack = [ev]
        while stack:
            e = stack.pop()
            if getattr(e, 'sequence_nr', -1) is not None and e.sequence_nr >= 0:
                self.seq_class.setdefault(e.sequence_nr, cls)
            stack.extend(e.cpu_children)

    def leaf_work(self, ev) -> Tuple[float, float]:
        """(MACs of matmuls and convs, bytes of the other operators) under ``ev``, first aten level."""
        macs = nbytes = 0.0
        for child in ev.cpu_children:
            name = child.name
            if name in _CONV_OPS or name == 'aten::convolution_backward':
                macs += _conv_class_and_macs(child)[1]
            elif name in _LINEAR_OPS or name in _FUSED_ATTENTION:
                macs += _matmul_macs(child) or self.leaf_work(child)[0]
            elif name.startswith('aten::') or name in _NORM_OPS:
                nbytes += _operand_bytes(child)
            else:
                m, b = self.leaf_work(child)
                macs, nbytes = macs + m, nbytes + b
        return macs, nbytes

    def visit(self, ev, scope: Optional[str] = None) -> None:
        name = ev.name
        if name.startswith(_SCOPE):
            kind = name[len(_SCOPE):]
            if kind == 'norms' and scope != 'attention':
                macs, nbytes = self.leaf_work(ev)
                self.add('norms', ev, nbytes=nbytes)
                self.remember(ev, 'norms')
                return
            self.add_overhead(ev, kind)
            for child in ev.cpu_children:
                self.visit(child, kind)
            return
        if name.startswith('Optimizer.'):
            self.add('optimizer', ev)
            return
        if name.startswith(_BACKWARD):
            self.visit_backward(ev, name[len(_BACKWARD):])
            return
        if name in _NARROW_POINTWISE or name == 'polynext::poly_mlp_':
            # (poly_mlp_: PolyMLP's two projections, with its product and norm between them)
            self.add('1x1 conv', ev, macs=_narrow_pointwise_macs(ev) if name in _NARROW_POINTWISE
                     else _poly_mlp_macs(ev))
            self.remember(ev, '1x1 conv')
            return
        if name in _FUSED_DEPTHWISE:
            self.add('depthwise conv', ev, macs=_fused_depthwise_macs(ev))
            self.remember(ev, 'depthwise conv')
            return
        if name in _CONV_OPS:
            cls, macs = _conv_class_and_macs(ev)
            self.add(cls, ev, macs=macs)
            self.remember(ev, cls)
            return
        if name in _NORM_OPS:
            self.add('norms', ev, nbytes=_operand_bytes(ev))
            self.remember(ev, 'norms')
            return
        if name in _COPY_OPS or name.startswith('aten::') and name.endswith(('_copy', 'contiguous')):
            self.add('copies and layout', ev, nbytes=_operand_bytes(ev))
            self.remember(ev, 'copies and layout')
            return
        if scope == 'attention' and name.startswith(('aten::', 'polynext::')):
            macs = _matmul_macs(ev)
            if not macs and name in _LINEAR_OPS:
                macs = self.leaf_work(ev)[0]
            self.add('attention', ev, macs=macs, nbytes=0.0 if macs else _operand_bytes(ev))
            self.remember(ev, 'attention')
            return
        if name in _ELEMENTWISE_OPS:
            self.add('elementwise', ev, nbytes=_operand_bytes(ev))
            self.remember(ev, 'elementwise')
            return
        if name.startswith('aten::') and self.total_s(ev) > 0:
            self.add('other', ev)
            self.remember(ev, 'other')
            return
        self.add_overhead(ev, scope)
        for child in ev.cpu_children:
            self.visit(child, scope)
        if scope == 'attention':
            # a compiled region or autograd function inside the attention (the flex kernel on CUDA): its backward
            # node is attention too (the operators under it keep their own classes, remembered first)
            self.remember(ev, 'attention')
        seq = getattr(ev, 'sequence_nr', -1)
        convs = list(_top_convs(ev)) if seq is not None and seq >= 0 else []
        if convs:
            # a hand-written autograd function around a convolution (ops.depthwise): its backward node
            # is known by this sequence number
            self.seq_conv[seq] = (conv_op_class(convs[0]), sum(_conv_class_and_macs(c)[1] for c in convs))

    def visit_backward(self, ev, node: str) -> None:
        conv = self.seq_conv.get(getattr(ev, 'sequence_nr', -1))
        if conv is not None and conv[0] == 'depthwise conv':
            # the layer's own work, input and weight gradients (2x its forward), whatever the function runs:
            # ops.depthwise cuts the weight gradient into phases and columns or does it tap by tap
            self.add(conv[0], ev, macs=2 * conv[1])
            return
        below = list(_descendants(ev))
        convs = [c for c in below if c.name == 'aten::convolution_backward']
        if convs:
            cls, _ = _conv_class_and_macs(convs[0])
            macs = sum(_conv_class_and_macs(c)[1] for c in convs)
            # ops.pointwise.PointwiseConv2d may take the weight gradient as one torch.mm
            macs += sum(_matmul_macs(c) for c in below if c.name == 'aten::mm')
            self.add(cls, ev, macs=macs)
            return
        cls = self.seq_class.get(getattr(ev, 'sequence_nr', -1))
        if cls is None or cls == 'other':
            cls = next((c for key, c in _BACKWARD_NAMES if key in node), cls or 'other')
        macs, nbytes = self.leaf_work(ev)
        if cls == 'attention':
            self.add(cls, ev, macs=macs)
        else:
            self.add(cls, ev, nbytes=nbytes)


def _op_label(ev) -> Tuple[str, str]:
    """(operator, shape of its first tensor operand) for the per-operator table: the aten name without its
    namespace, a backward node by its autograd name, the shape from the event or its first child with one."""
    name = ev.name
    if name.startswith(_BACKWARD):
        name = name[len(_BACKWARD):]
    elif name.startswith(_SCOPE):
        name = 'range ' + name[len(_SCOPE):]
    name = name.replace('aten::', '')
    stack = [ev]
    while stack:
        e = stack.pop(0)
        shape = next((x for x in (e.input_shapes or []) if isinstance(x, (list, tuple)) and x
                      and all(isinstance(v, int) for v in x)), None)
        if shape is not None:
            return name, 'x'.join(map(str, shape))
        stack.extend(e.cpu_children[:2])
        if len(stack) > 8:
            break
    return name, ''


def _top_convs(ev) -> Iterator[Any]:
    """The outermost convolution operators under ``ev`` (not the ones nested inside them)."""
    stack = list(ev.cpu_children)
    while stack:
        e = stack.pop()
        if e.name in _CONV_OPS or e.name == 'aten::convolution_backward':
            yield e
        else:
            stack.extend(e.cpu_children)


def _descendants(ev) -> Iterator[Any]:
    stack = list(ev.cpu_children)
    while stack:
        e = stack.pop()
        yield e
        stack.extend(e.cpu_children)


#: module types whose forward is labelled for the profiler (by class name, so that timm's and
#: polynext's modules need no import here)
_NORM_MODULES = ('LayerNorm2d', 'ChannelBatchNorm', 'ChannelLayerNorm', 'PositionAffine', 'RunningRowSumNorm',
                 'LayerNorm', 'LayerNorm2dNoBias', 'LayerNormNoBias', 'GroupNorm', 'GroupNorm1', 'BatchNorm2d',
                 'SyncBatchNorm', 'RmsNorm')
_ATTN_MODULES = ('PolyAttn', 'FoldedPolyAttn', 'Attention', 'Attention2d')


@contextlib.contextmanager
def _labelled_modules(model: nn.Module) -> Iterator[None]:
    """Forward hooks that open a profiler range around every norm and attention module (removed after)."""
    handles = []

    def hooks(label: str):
        stack: List[Any] = []

        def pre(module, args):
            rf = torch.profiler.record_function(_SCOPE + label)
            rf.__enter__()
            stack.append(rf)

        def post(module, args, output):
            stack.pop().__exit__(None, None, None)
        return pre, post

    def labelled(fn: Callable[..., Any], label: str) -> Callable[..., Any]:
        def call(*args, **kwargs):
            with torch.profiler.record_function(_SCOPE + label):
                return fn(*args, **kwargs)
        return call

    wrapped = []
    for m in model.modules():
        kind = type(m).__name__
        label = 'norms' if kind in _NORM_MODULES else 'attention' if kind in _ATTN_MODULES else None
        if label:
            pre, post = hooks(label)
            handles.append(m.register_forward_pre_hook(pre))
            handles.append(m.register_forward_hook(post))
        if label == 'attention' and callable(getattr(m, 'attend', None)) and 'attend' not in vars(m):
            # PolyNeXt's training blocks call ``attend`` (everything before ``proj``) without the module's
            # forward, whose hooks would not fire: its work is attention too
            m.attend = labelled(m.attend, label)
            wrapped.append(m)
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for m in wrapped:
            del m.attend


@dataclass
class StepProfile:
    """Median time and work per class over the profiled steps, and the unprofiled step time."""
    mode: str
    classes: Dict[str, ClassTime]
    profiled_step_s: float
    step_s: float
    batch_size: int
    macs_per_image: float = 0.0
    optimizer_bytes: float = 0.0
    peaks: Dict[str, Peak] = field(default_factory=dict)
    ops: Dict[Tuple[str, str, str], ClassTime] = field(default_factory=dict)
    page_faults: Optional[int] = None   # minor page faults in a profiled step (median)
    clock: str = 'cpu'   # 'gpu': the classes hold GPU kernel time, their sum is the GPU's busy time

    @property
    def busy_s(self) -> float:
        """The classes' total: the operators' time on the CPU, the kernels' time on a GPU."""
        return sum(c.seconds for c in self.classes.values())

    def _rate(self, cls: str, c: ClassTime, work: Optional[float] = None
              ) -> Tuple[Optional[float], Optional[Peak], str, float]:
        """(achieved rate, the class's peak, unit, work) of ``c``; ``work`` replaces the counted work."""
        peak_key = _CLASS_PEAK.get(cls)
        peak = self.peaks.get(peak_key) if peak_key else None
        if work is None:
            work = c.macs if peak_key in ('conv1x1', 'depthwise', 'matmul') else c.bytes
        rate = work / c.seconds / 1e9 if c.seconds > 0 and work and peak_key else None
        return rate, peak, _UNIT.get(peak_key, ''), work

    def top_ops(self, n: Optional[int] = None) -> List[Dict[str, Any]]:
        """The heaviest operators of the step (class, operator, first operand's shape), by time: calls, ms,
        share of the step, achieved rate and its fraction of the class's peak. An operator's rows over
        all shapes add up to its class's time."""
        total = sum(c.seconds for c in self.classes.values()) or 1.0
        out = []
        for (cls, op, shape), c in sorted(self.ops.items(), key=lambda kv: -kv[1].seconds)[:n]:
            rate, peak, unit, _ = self._rate(cls, c)
            out.append(dict(op_class=cls, op=op, shape=shape, calls=c.calls, ms=1000 * c.seconds,
                            share=c.seconds / total, rate=rate, unit=unit,
                            of_peak=(rate / peak.rate) if rate and peak and peak.rate else None))
        return out

    def rows(self) -> List[Dict[str, Any]]:
        total = sum(c.seconds for c in self.classes.values()) or 1.0
        out = []
        for name, c in self.classes.items():
            if c.seconds <= 0 and c.calls == 0:
                continue
            # the optimizer's work is AdamW's minimum traffic, not what its operator's shapes say
            rate, peak, unit, work = self._rate(name, c, self.optimizer_bytes if name == 'optimizer'
                                                and self.optimizer_bytes else None)
            out.append(dict(op_class=name, ms=1000 * c.seconds, share=c.seconds / total, calls=c.calls,
                            work=work, unit=unit, rate=rate,
                            peak=peak.rate if peak else None,
                            of_peak=(rate / peak.rate) if rate and peak and peak.rate else None))
        return out

    def to_dict(self) -> Dict[str, Any]:
        return dict(mode=self.mode, clock=self.clock, batch_size=self.batch_size, step_ms=1000 * self.step_s,
                    profiled_step_ms=1000 * self.profiled_step_s, busy_ms=1000 * self.busy_s,
                    macs_per_image=self.macs_per_image,
                    img_per_s=self.batch_size / self.step_s,
                    gmacs_per_s=self.macs_per_image * self.batch_size / self.step_s / 1e9,
                    page_faults_profiled=self.page_faults, rows=self.rows(), top_ops=self.top_ops(40), peaks={k: asdict(v) for k, v in self.peaks.items()})


def prefault_heap(max_bytes: Optional[int] = None) -> int:
    """Touches as much fresh heap as the process's peak resident memory so far (at least 1 GiB, at most half
    the memory available, or ``max_bytes``) and frees it; returns the bytes touched (0 where it cannot help).

    Why: the profiler keeps its events on the heap while a step runs, so the step's tensors land on heap
    pages never touched before, and the page faults of that first touch (``polynext profile cpolynext_s
    --modes train --no-prefault-heap``: 331,635 minor faults in a profiled step on a 2-core AMD EPYC, 2 with
    the touch) are charged to whichever operator writes there first. With the pinned allocator (``polynext.bench``:
    no mmap, no trimming) touched pages stay with the process, so touching them before each step leaves
    the profiled step with no faults. With glibc's default allocator large blocks go back to the system
    when freed, so there is nothing to keep and nothing is done."""
    from .bench import allocator_status
    if allocator_status() != 'pinned':
        return 0
    try:
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # kB on Linux
        with open('/proc/meminfo') as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith('MemAvailable:'))
    except (ImportError, OSError, StopIteration, ValueError):
        return 0
    nbytes = min(max(peak, 2**30), avail // 2, max_bytes or avail)
    buf = torch.empty(nbytes // 4, dtype=torch.float32)
    buf.fill_(0.0)
    del buf
    return nbytes


def _minor_faults() -> Optional[int]:
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    except ImportError:
        return None


def sort_events(events: Sequence[Any], device: bool = False) -> _Sorter:
    """Sort one profiled step's events (``prof.events()``) into the op classes. ``device``: by the GPU kernels'
    time (see :class:`_Sorter`); the kernel time the profiler linked to no operator goes to 'other'."""
    from torch.autograd import DeviceType
    sorter = _Sorter(device=device)
    roots = sorted((e for e in events if e.cpu_parent is None and e.device_type == DeviceType.CPU),
                   key=lambda e: e.time_range.start)
    for ev in roots:
        sorter.visit(ev)
    if device:
        kernels = sum(e.device_time_total for e in events if e.device_type != DeviceType.CPU) / 1e6
        sorter.add_unlinked_kernels(kernels - sum(sorter.total_s(e) for e in roots))
    return sorter


def profile_step(step: Callable[[], None], model: nn.Module, runs: int = 5, sync: Callable[[], None] = lambda: None,
                 prefault: bool = True, device: bool = False
                 ) -> Tuple[Dict[str, ClassTime], float, float, Dict[Tuple[str, str, str], ClassTime], Optional[int]]:
    """Profile ``step`` ``runs`` times (one step per profiler session, after the caller's warm-up).

    Returns the per-class median (time, work and calls of the median step), the median profiled
    step time, the median unprofiled step time (timed between the profiled ones) and the per-operator
    times of the profiled step whose total is the median one, and the median count of minor page faults
    in a profiled step (None where ``getrusage`` is missing). On the CPU, unless ``prefault`` is off, the
    heap is touched before every step (:func:`prefault_heap`), so no operator is charged with page faults
    the profiler caused. ``device``: the step runs on a CUDA GPU; the classes get its kernels' time."""
    from torch.profiler import ProfilerActivity, profile
    per_run: List[Dict[str, ClassTime]] = []
    per_run_ops: List[Dict[Tuple[str, str, str], ClassTime]] = []
    plain: List[float] = []
    profiled: List[float] = []
    faults: List[int] = []
    with _labelled_modules(model):
        cpu = prefault and next((p.device.type == 'cpu' for p in model.parameters()), True)
        for _ in range(runs):
            if cpu:
                prefault_heap()
            sync()
            t0 = time.perf_counter()
            step()
            sync()
            plain.append(time.perf_counter() - t0)
            if cpu:
                prefault_heap()
            f0 = _minor_faults()
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device else [])
            with profile(activities=activities, record_shapes=True) as prof:
                t0 = time.perf_counter()
                step()
                sync()
                profiled.append(time.perf_counter() - t0)
            if f0 is not None:
                faults.append(_minor_faults() - f0)
            sorter = sort_events(prof.events(), device)
            per_run.append(sorter.classes)
            per_run_ops.append(sorter.ops)
    merged = {}
    for cls in OP_CLASSES:
        runs_cls = sorted((r[cls] for r in per_run), key=lambda c: c.seconds)
        merged[cls] = runs_cls[len(runs_cls) // 2]
    by_total = sorted(range(runs), key=lambda i: sum(c.seconds for c in per_run[i].values()))
    return (merged, statistics.median(profiled), statistics.median(plain), per_run_ops[by_total[runs // 2]],
            int(statistics.median(faults)) if faults else None)


def profile_model(model: nn.Module, mode: str = 'infer', batch_size: int = 32, img_size: int = 224,
                  dtype: str = 'fp32', runs: int = 5, warmup: int = 2, channels_last: bool = False,
                  peaks: Optional[Dict[str, Peak]] = None, macs_per_image: Optional[float] = None,
                  device: str = 'cpu', fold: bool = False, prefault: bool = True) -> StepProfile:
    """Profile one step of ``model`` (``mode`` 'infer' or 'train', as ``polynext bench`` runs it, on
    ``device``, set up as ``bench`` does; on a GPU each class gets the time of the kernels its operators
    launched; ``fold``: a PolyNeXt folded with ``polynext.fold_for_inference`` first, inference only;
    ``prefault``: see :func:`profile_step`)."""
    from .bench import BenchSettings, make_step, prepare_device
    from .profile import count_macs
    from .errors import ConfigError
    settings = BenchSettings(img_size=img_size, batch_size=batch_size, mode=mode, dtype=dtype,
                             channels_last=channels_last, runs=runs, warmup=warmup, memory=False, device=device)
    settings.validate()
    dev = prepare_device(settings)
    if fold:
        from .models.folded import fold_for_inference
        if mode != 'infer':
            raise ConfigError('fold applies to inference only (a folded model has no training path)')
        if macs_per_image is None:
            macs_per_image = float(count_macs(model, input_size=img_size))
        model = fold_for_inference(model.eval())
    if macs_per_image is None:
        macs_per_image = float(count_macs(model, input_size=img_size))
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    step = make_step(model, settings, dev)
    gpu = dev.type == 'cuda'
    sync = (lambda: torch.cuda.synchronize(dev)) if gpu else (lambda: None)
    for _ in range(warmup):
        step()
    classes, profiled, plain, ops, faults = profile_step(step, model, runs, sync, prefault=prefault, device=gpu)
    return StepProfile(mode=mode, classes=classes, profiled_step_s=profiled, step_s=plain, batch_size=batch_size,
                       macs_per_image=macs_per_image, optimizer_bytes=7 * 4 * n_params if mode == 'train' else 0.0,
                       peaks=dict(peaks or {}), ops=ops, page_faults=None if gpu else faults,
                       clock='gpu' if gpu else 'cpu')


def format_profile(name: str, prof: StepProfile) -> str:
    """The class table of one profile (ms, share, achieved rate, peak, % of peak)."""
    from .bench import format_table
    rows = []
    for r in prof.rows():
        rate = '-' if r['rate'] is None else f"{r['rate']:,.1f} {r['unit']}"
        peak = '-' if r['peak'] is None else f"{r['peak']:,.1f}"
        of_peak = '-' if r['of_peak'] is None else f"{100 * r['of_peak']:.0f} %"
        rows.append([r['op_class'], f"{r['ms']:,.1f}", f"{100 * r['share']:.1f} %", rate, peak, of_peak])
    d = prof.to_dict()
    head = (f"{name} {prof.mode}: {d['step_ms']:,.1f} ms per batch of {prof.batch_size} unprofiled "
            f"({d['img_per_s']:,.1f} img/s, {d['gmacs_per_s']:,.1f} GMAC/s), {d['profiled_step_ms']:,.1f} ms profiled"
            + ('' if prof.page_faults is None else f" ({prof.page_faults:,} minor page faults)"))
    if prof.clock == 'gpu':
        # the rest of the profiled step the GPU waited: for launches, synchronisations, the host's Python
        head += (f"\nGPU kernels {d['busy_ms']:,.1f} ms: busy {100 * prof.busy_s / prof.profiled_step_s:.0f} % of the "
                 f"profiled step (the classes below are kernel time)")
    return head + '\n' + format_table(['op class', 'ms', 'share', 'achieved', 'peak', 'of peak'], rows)


def format_top_ops(prof: StepProfile, n: int) -> str:
    """The ``n`` heaviest operators of one profile (``StepProfile.top_ops``)."""
    from .bench import format_table
    rows = []
    for r in prof.top_ops(n):
        rate = '-' if r['rate'] is None else f"{r['rate']:,.1f} {r['unit']}"
        of_peak = '-' if r['of_peak'] is None else f"{100 * r['of_peak']:.0f} %"
        rows.append([r['op'], r['shape'], r['op_class'], str(r['calls']), f"{r['ms']:,.1f}",
                     f"{100 * r['share']:.1f} %", rate, of_peak])
    return (f'the {len(rows)} heaviest operators (first operand\'s shape; backward nodes by autograd name):\n'
            + format_table(['operator', 'shape', 'class', 'calls', 'ms', 'share', 'achieved', 'of peak'], rows))

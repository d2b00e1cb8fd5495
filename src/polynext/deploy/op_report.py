"""The op-set report of an ONNX graph: which operators it uses, and which are not polynomial.

A graph is a polynomial in its input when every operator on the data path (the operators that
depend on the input image; shape computations are not) is one of:

* linear: Conv, Gemm, MatMul with a constant, Add / Sub / Neg, a reduction that sums or
  averages (the global pool), Div by a constant, BatchNormalization with constant statistics;
* a product: Mul, MatMul of two data tensors, Pow with a constant non-negative integer exponent;
* layout: Reshape, Transpose, Split, Slice, Concat, Gather with constant indices, ...

Everything else on the data path is flagged, with the reason: Sigmoid, Exp, Div by a tensor,
Sqrt, Erf, Softmax, LayerNormalization, ReduceMean over the channels, Max / Min / Clip, Relu, ...
(``ReduceMean`` over the channel axis is how a channel norm starts; the mean itself is linear, but
it is flagged because it only appears as part of a normalisation.)

The report also gives the **product depth**: the largest number of data × data multiplications
on any path from the input to the output (a multiplication by a constant does not count; x^n
counts ceil(log2 n)). Under CKKS each such product consumes a level.
"""
from __future__ import annotations

import ast
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Set

__all__ = ['OpSetReport', 'NonPolynomialNode', 'op_set_report', 'LINEAR_OPS', 'LAYOUT_OPS']

#: linear in the data input(s) (a constant second operand where one exists)
LINEAR_OPS = {'Conv', 'ConvTranspose', 'Gemm', 'Add', 'Sub', 'Neg', 'Sum', 'Identity', 'GlobalAveragePool',
              'AveragePool', 'ReduceSum', 'BatchNormalization', 'Pad'}
#: move or select data without arithmetic (a permutation, a copy or a view)
LAYOUT_OPS = {'Reshape', 'Transpose', 'Split', 'Slice', 'Concat', 'Squeeze', 'Unsqueeze', 'Flatten', 'Expand',
              'Gather', 'Tile', 'Cast', 'Dropout', 'Identity'}
#: what each flagged operator is, for the message
_REASONS = {
    'Sigmoid': 'a sigmoid', 'Exp': 'an exponential', 'Log': 'a logarithm', 'Sqrt': 'a square root',
    'Reciprocal': 'a reciprocal', 'Erf': 'the error function (GELU)', 'Softmax': 'a softmax',
    'LayerNormalization': 'a LayerNorm (division by a data-dependent standard deviation)',
    'Tanh': 'a tanh', 'Relu': 'a ReLU', 'Gelu': 'a GELU', 'Max': 'a maximum', 'Min': 'a minimum',
    'Clip': 'a clamp', 'Abs': 'an absolute value', 'Where': 'a data-dependent selection',
    'MaxPool': 'a max pool', 'GlobalMaxPool': 'a max pool', 'ReduceMax': 'a maximum', 'ReduceMin': 'a minimum',
    'Sign': 'a sign', 'Floor': 'rounding', 'Ceil': 'rounding', 'Round': 'rounding',
    'InstanceNormalization': 'a norm with data statistics', 'GroupNormalization': 'a norm with data statistics',
    'LpNormalization': 'a norm with data statistics', 'HardSigmoid': 'a hard sigmoid', 'HardSwish': 'a hard swish',
}


@dataclass
class NonPolynomialNode:
    """A flagged node: its ONNX name, operator, the module it came from (if known) and why."""
    name: str
    op_type: str
    module: str
    reason: str

    def describe(self) -> str:
        where = f' in {self.module}' if self.module else ''
        return f"node '{self.name}' ({self.op_type}{where}): {self.reason}"


@dataclass
class OpSetReport:
    """Operator histogram of the data path, the flagged nodes and the product depth."""
    histogram: Dict[str, int]
    classes: Dict[str, str]
    non_polynomial: List[NonPolynomialNode] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    product_depth: Optional[int] = None
    shape_ops: int = 0

    @property
    def polynomial(self) -> bool:
        return not self.non_polynomial

    def table(self) -> str:
        width = max([len('operator')] + [len(k) for k in self.histogram])
        lines = [f"{'operator':<{width}}  count  class", f"{'-' * width}  -----  -----"]
        for op, n in sorted(self.histogram.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f'{op:<{width}}  {n:>5}  {self.classes[op]}')
        return '\n'.join(lines)

    def summary(self) -> str:
        if self.polynomial:
            head = 'polynomial: every operator on the data path is linear, a product or layout'
        else:
            kinds = Counter(n.op_type for n in self.non_polynomial)
            head = (f'NOT polynomial: {len(self.non_polynomial)} node(s) ('
                    + ', '.join(f'{k} ×{v}' for k, v in kinds.most_common()) + '); first: '
                    + self.non_polynomial[0].describe())
        lines = [head]
        if self.product_depth is not None:
            lines.append(f'product depth (data × data multiplications on the longest path): {self.product_depth}')
        lines += self.notes
        if self.shape_ops:
            lines.append(f'{self.shape_ops} shape-computation node(s) (dynamic sizes) are not on the data path')
        return '\n'.join(lines)

    def to_dict(self) -> Dict:
        return dict(polynomial=self.polynomial, histogram=self.histogram, classes=self.classes,
                    product_depth=self.product_depth, notes=self.notes, shape_ops=self.shape_ops,
                    non_polynomial=[vars(n) for n in self.non_polynomial])


def _module_of(node) -> str:
    """The module path that produced ``node`` (torch's dynamo exporter records the name scopes)."""
    for prop in node.metadata_props:
        if prop.key == 'pkg.torch.onnx.name_scopes':
            try:
                scopes = ast.literal_eval(prop.value)
            except (ValueError, SyntaxError):
                return ''
            modules = [s for s in scopes[:-1] if s]
            return modules[-1] if modules else ''
    return ''


def _attr(node, key: str, default=None):
    from onnx import helper
    for a in node.attribute:
        if a.name == key:
            return helper.get_attribute_value(a)
    return default


def op_set_report(model) -> OpSetReport:
    """Classify every operator of an ONNX ``ModelProto`` (see the module docstring)."""
    import numpy as np
    from onnx import numpy_helper

    graph = model.graph
    constants: Dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == 'Constant' and node.output:
            value = _attr(node, 'value')
            if value is not None:
                constants[node.output[0]] = numpy_helper.to_array(value)
    data: Set[str] = {i.name for i in graph.input if i.name not in constants}
    depth: Dict[str, int] = {name: 0 for name in data}
    ranks: Dict[str, int] = {}
    for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
        if vi.type.HasField('tensor_type') and vi.type.tensor_type.HasField('shape'):
            ranks[vi.name] = len(vi.type.tensor_type.shape.dim)

    histogram: Counter = Counter()
    classes: Dict[str, str] = {}
    flagged: List[NonPolynomialNode] = []
    notes: List[str] = []
    shape_ops = 0
    const_divs = 0

    def flag(node, reason: str) -> None:
        flagged.append(NonPolynomialNode(node.name, node.op_type, _module_of(node), reason))
        classes[node.op_type] = 'NOT polynomial'

    for node in graph.node:
        inputs = [i for i in node.input if i]
        data_in = [i for i in inputs if i in data]
        if not data_in or node.op_type == 'Shape' or node.op_type == 'Size':
            if data_in:
                shape_ops += 1
            continue                       # constants and shape computations: not on the data path
        op = node.op_type
        histogram[op] += 1
        d = max(depth.get(i, 0) for i in data_in)
        if op in ('Mul', 'MatMul', 'Einsum'):
            if len(data_in) >= 2:          # data × data: a product of degree d1 + d2
                d += 1
                classes[op] = 'polynomial (product)'
            else:
                classes.setdefault(op, 'linear')
        elif op == 'Pow':
            exponent = constants.get(inputs[1]) if len(inputs) > 1 else None
            e = None if exponent is None else np.asarray(exponent).reshape(-1)
            if inputs[0] in data and e is not None and e.size == 1 and float(e[0]).is_integer() and e[0] >= 0:
                d += math.ceil(math.log2(max(1, int(e[0]))))
                classes.setdefault(op, 'polynomial (integer power)')
            else:
                flag(node, 'a power with a non-integer or data-dependent exponent')
        elif op == 'Div':
            if inputs[1] in data:
                flag(node, 'a division by a data-dependent tensor')
            else:
                const_divs += 1
                classes.setdefault(op, 'linear (division by a constant)')
        elif op in ('ReduceMean', 'ReduceSum'):
            axes = _attr(node, 'axes')
            if axes is None and len(inputs) > 1:
                a = constants.get(inputs[1])
                axes = None if a is None else [int(v) for v in np.asarray(a).reshape(-1)]
            rank = ranks.get(inputs[0])
            norm_axes = None if axes is None or rank is None else {a % rank for a in axes}
            if op == 'ReduceMean' and rank == 4 and norm_axes is not None and 1 in norm_axes:
                flag(node, 'a mean over the channels (part of a channel norm)')
            else:
                classes.setdefault(op, 'linear (global pool)' if norm_axes == {2, 3} else 'linear (sum / mean)')
        elif op == 'Gather':
            if len(inputs) > 1 and inputs[1] in data:
                flag(node, 'a data-dependent selection')
            else:
                classes.setdefault(op, 'layout')
        elif op in LINEAR_OPS:
            classes.setdefault(op, 'linear')
        elif op in LAYOUT_OPS:
            classes.setdefault(op, 'layout')
        else:
            flag(node, _REASONS.get(op, 'not a polynomial operator'))
        for out in node.output:
            if out:
                data.add(out)
                depth[out] = d

    if const_divs:
        notes.append(f'{const_divs} Div node(s) divide by a constant: a multiplication by its reciprocal, which '
                     f'fold_for_inference folds into the weights')
    outputs = [o.name for o in graph.output if o.name in depth]
    product_depth = max((depth[o] for o in outputs), default=None) if not flagged else None
    return OpSetReport(dict(histogram), classes, flagged, notes, product_depth, shape_ops)

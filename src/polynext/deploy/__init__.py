"""Deployment: inference folding lives in ``polynext.models.folded``; here the exports.

* ``export_onnx`` / ``export_program``: ONNX (torch's dynamo exporter) and ``torch.export``
  programs, each checked against the eager model before the file is kept (``export``).
* ``op_set_report``: the operator histogram of an ONNX graph and its non-polynomial nodes.
* ``OnnxRuntimeModel``: a polynext ONNX export run by ONNX Runtime like the eager model.
* ``save_pretrained`` / ``check_hub_folder`` / ``load_pretrained`` / ``push_to_hub``: the Hugging
  Face Hub format (timm's layout).

The ONNX parts import ``onnx`` / ``onnxruntime`` only when called (``pip install "polynext[export]"``).
"""
from .export import ExportError, ExportResult, InputSpec, export_metadata, export_onnx, export_program, input_spec
from .hub import check_hub_folder, load_pretrained, push_to_hub, save_pretrained
from .op_report import OpSetReport, op_set_report
from .runtime import OnnxRuntimeModel, read_onnx_metadata

__all__ = ['ExportError', 'ExportResult', 'InputSpec', 'export_metadata', 'export_onnx', 'export_program',
           'input_spec', 'check_hub_folder', 'load_pretrained', 'push_to_hub', 'save_pretrained', 'OpSetReport',
           'op_set_report', 'OnnxRuntimeModel', 'read_onnx_metadata']

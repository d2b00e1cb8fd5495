"""Encrypted inference for fully polynomial PolyNeXt models (CKKS).

    from polynext.fhe import compile_model, simulate
"""

from .poly_attention import poly_attention, poly_attention_reference

__all__ = ["poly_attention", "poly_attention_reference"]

from .automedsam import AutoMedSAMInfer

__all__ = ["AutoMedSAMInfer"]

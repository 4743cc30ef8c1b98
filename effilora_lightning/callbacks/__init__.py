"""Lightning callbacks: EffiLoRACallback (selective B updates, memory and throughput logging)."""

from .effilora import EffiLoRACallback

__all__ = ["EffiLoRACallback"]

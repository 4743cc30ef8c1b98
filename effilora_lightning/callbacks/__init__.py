"""Lightning callbacks: EffiLoRACallback (selective B updates) and EfficiencyMonitor (tokens/s, memory, MFU)."""

from .effilora import EffiLoRACallback
from .monitor import EfficiencyMonitor

__all__ = ["EffiLoRACallback", "EfficiencyMonitor"]

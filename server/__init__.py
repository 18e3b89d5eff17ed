"""HTTP + WebSocket serving of an exported model directory (torch-free: onnxruntime via msssm_serve.runtime)."""

from .app import create_app
from .settings import Settings

__all__ = ["create_app", "Settings"]

"""msssm-serve: multi-scale state space models from training to streaming classification.

The package root imports nothing heavy: `msssm_serve.runtime` must load without torch, while
`msssm_serve.model` (torch) is imported only by training and export.
"""

__version__ = "0.1.0"

"""sar-scale: Set AutoRegressive modeling (SAR) pretraining at scale."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy so `import sar_scale` stays light (no transformers/deepspeed at import time).
    if name == "SARPipeline":
        from sar_scale.export.pipeline import SARPipeline

        return SARPipeline
    raise AttributeError(name)

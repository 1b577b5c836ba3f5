"""Export and inference: ``cli`` (`sar-scale export`), ``release`` (write/verify/register/upload),
``checkpoints`` (find + consolidate DeepSpeed checkpoints), ``weights`` (sharded safetensors),
``config`` (config.json schema), ``card`` (README.md), ``pipeline`` (SARPipeline),
``generate_cli`` / ``edit_cli`` (`sar-scale generate|edit`). Nothing heavy is imported here."""

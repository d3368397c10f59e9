"""Hugging Face checkpoints in and out: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2, DeepSeek-V3, and the dense
Llama and Qwen2 (`load_hf`, optionally straight onto a device mesh; `save_hf`).

See configs.py for what each config.json field becomes, weights.py for the tensor layouts, files.py for the
safetensors reading (lazy, sharded, float8) and writing.
"""
from moe_jax.hf.configs import DENSE_FAMILIES, FAMILIES, HFConfigError, hf_config_from_model, model_config_from_hf
from moe_jax.hf.convert import LoadInfo, export_tensors, load_hf, save_hf

__all__ = ["DENSE_FAMILIES", "FAMILIES", "HFConfigError", "LoadInfo", "export_tensors", "hf_config_from_model",
           "load_hf", "model_config_from_hf", "save_hf"]

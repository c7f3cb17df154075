"""The model family: decoder-only transformer LMs in Hugging Face format, from tiny to 1B+.

Every model lmaas builds and trains is a `transformers.LlamaForCausalLM`, so a saved directory
(`config.json`, `model.safetensors`, `generation_config.json`, `tokenizer.json` +
`tokenizer_config.json`) loads unchanged with `AutoModelForCausalLM.from_pretrained(dir)` and serves
with vLLM. Imported models may be any architecture of `hf.ARCHITECTURES` (Llama, Mistral, Qwen2,
Qwen3, GPT-2); `hf.check_causal_lm` is the check every causal-LM registration runs.

    config = model_config("tiny", vocab_size=1024, max_seq_len=128, eos_id=0)
    model = build_model(config)
    save_model(model, "out/", tokenizer_dir="tok/")
"""

from lmaas.models.family import (
    SIZES,
    ModelSize,
    build_model,
    config_from_dict,
    decoder_layers,
    flops_per_token,
    load_model,
    model_config,
    parameter_count,
    save_model,
)

__all__ = [
    "SIZES",
    "ModelSize",
    "build_model",
    "config_from_dict",
    "decoder_layers",
    "flops_per_token",
    "load_model",
    "model_config",
    "parameter_count",
    "save_model",
]

"""Drop-in integrations of `MoELayer` into model libraries.

- `epmoe.integrations.hf`: patch the MoE blocks of Hugging Face transformers models (v5).

Each integration imports its library lazily, so ``import epmoe`` never needs it installed.
"""

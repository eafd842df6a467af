"""Connections to other libraries. Each submodule imports its library only when used, so
`import ssmc` never needs them:

- `ssmc.integrations.transformers`: run a Hugging Face Mamba / Mamba2 model's mixers on ssmc.
"""

"""Integrations with other libraries; each submodule imports its library only when imported.

- :mod:`hfcompress.integrations.peft`: PEFT LoRA on compressed layers (``pip install peft``).

``import hfcompress`` imports none of them.
"""

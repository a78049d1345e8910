"""The built-in methods, one package each; importing this registers them, in this order.

Each package registers one :class:`hfcompress.registry.Method` in its ``__init__``; see
docs/methods.md for adding one.
"""

from importlib import import_module

BUILT_IN = ("prune", "lowrank", "kronecker", "width", "heads", "depth")

for _name in BUILT_IN:
    import_module(f"hfcompress.methods.{_name}")

__all__ = ["BUILT_IN"]

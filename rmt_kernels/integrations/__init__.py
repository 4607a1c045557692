"""Drop-in integrations: Hugging Face attention, the official RMT wrapper API, lucidrains' model.

Each submodule is imported explicitly by the user, and only it imports its third-party package:

- :mod:`rmt_kernels.integrations.hf` -- ``register()`` adds the ``"rmt_kernels"`` attention
  implementation to ``transformers``;
- :mod:`rmt_kernels.integrations.rmt` -- ``MemoryCell`` / ``RecurrentWrapper`` with the official
  wrapper's API and state-dict keys;
- :mod:`rmt_kernels.integrations.armt` -- ``AssociativeMemoryCell`` / ``AssociativeRecurrentWrapper``
  (ARMT) with the official API and state-dict keys;
- :mod:`rmt_kernels.integrations.lucidrains` -- ``apply_rmt_kernels(model)`` patches a
  ``recurrent_memory_transformer_pytorch.RecurrentMemoryTransformer`` in place.

Importing this package imports none of them. Their packages come with the extras
``rmt_kernels[hf]`` (``hf``, ``rmt``, ``armt``) and ``rmt_kernels[lucidrains]``; importing a submodule without
its package raises an ``ImportError`` that names the extra.
"""

__all__ = ["hf", "rmt", "armt", "lucidrains"]

"""A bitsandbytes 0.50 CPU quirk that would silently stop 4-bit training.

On CPUs with AVX512-BF16, `Linear4bit.forward` repacks its weight into a CPU inference layout the first
time it runs without gradients (generation, evaluation). From then on `matmul_4bit` takes the `gemv_4bit`
path, which has no autograd: the loss still computes but no gradient reaches the LoRA layers before it
(measured: the loss stayed exactly equal over steps). During training we unpack the weights and switch
the repacking off; afterwards we switch it back on, since it makes CPU generation ~1.6x faster.
"""

from __future__ import annotations

import contextlib


def _linear4bit_modules(model):
    try:
        import bitsandbytes as bnb
    except ImportError:  # no bitsandbytes, no 4-bit layers
        return []
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def unpack_cpu_weights(model):
    """Return every repacked 4-bit weight to the standard layout that supports gradients."""
    from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

    for module in _linear4bit_modules(model):
        state = module.weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(module.weight.data, state)


@contextlib.contextmanager
def trainable_4bit(model):
    """Inside this block, 4-bit layers on the CPU keep the layout that backpropagates."""
    modules = [m for m in _linear4bit_modules(model) if m.weight.device.type == "cpu"]
    if not modules:
        yield
        return
    flags = [getattr(m, "support_avx512bf16_for_cpu", False) for m in modules]
    unpack_cpu_weights(model)
    for m in modules:
        m.support_avx512bf16_for_cpu = False
    try:
        yield
    finally:
        for m, flag in zip(modules, flags):
            m.support_avx512bf16_for_cpu = flag

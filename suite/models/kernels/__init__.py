"""Hand-written kernels: TNT's fused inner block in Triton (``inner_triton``, imported only
when it runs) behind the ``tntbench::inner_block`` custom op and the ``model.inner_kernel``
switch (``inner_op``)."""

from .inner_op import (
    INNER_KERNELS,
    inner_block_macs,
    inner_forward,
    register_flop_formulas,
    use_triton,
)

__all__ = [
    "INNER_KERNELS",
    "inner_block_macs",
    "inner_forward",
    "register_flop_formulas",
    "use_triton",
]

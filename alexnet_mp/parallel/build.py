"""The model a config names, for this rank's place in the layout, ready to train.

This is where parallelism is applied to a model: the layout's plan
(:mod:`alexnet_mp.parallel.plans`) hands the model its exchange (which column, over which group)
and then its gradient sync; the model module itself never looks for a process group. And
``train.compile``, on any layout.
"""

from __future__ import annotations

import os
import shutil

from torch import nn

from alexnet_mp.config import ModelConfig
from alexnet_mp.parallel.layout import Layout


def build_model(cfg: ModelConfig, image_size: int, layout: Layout, seed: int) -> nn.Module:
    """The model on ``layout.device``, initialised from ``seed`` the same way in every layout,
    with the exchanges and gradient sync its plan gives it."""
    return layout.plan.build(cfg, image_size, layout, seed)


# torch.compile's backend; tests swap in "aot_eager", which traces the same graphs (forward and
# backward) without inductor's minute of C++ compilation.
COMPILE_BACKEND = "inductor"


def compile_blocker(layout: Layout) -> str | None:
    """Why ``train.compile`` cannot be used on this device, or None.

    Every layout compiles: one device, the column split (its functional-collective exchanges),
    hybrid and replicas all ran compiled on 2 CPU ranks with eager's losses (docs/paper_recipe.md).
    """
    device = layout.device.type
    if device == "cpu" and not (os.environ.get("CXX") or shutil.which("g++")
                                or shutil.which("clang++") or shutil.which("c++")):
        return "inductor compiles C++ on the CPU and no C++ compiler was found (set CXX)"
    if device == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return "inductor needs Triton on CUDA and it is not installed"
    if device == "mps":
        return "inductor's MPS backend has not been tried with this model"
    return None


def compile_model(model: nn.Module, layout: Layout) -> str | None:
    """``train.compile``: compile ``model`` in place, or say why not (one phrase).

    nn.Module.compile keeps the module object (no ``_orig_mod.`` wrapper), so parameter names,
    the rows a column holds and the checkpoints see no difference.
    """
    why_not = compile_blocker(layout)
    if why_not is not None:
        return why_not
    # Inductor otherwise draws dropout masks from its own generator: a compiled run would drop
    # other neurons than an eager one, and resume from the saved RNG states would not be exact.
    # An option of this compilation alone, so no other model in the process is affected.
    options = {"fallback_random": True} if COMPILE_BACKEND == "inductor" else None
    model.compile(backend=COMPILE_BACKEND, options=options)
    return None

"""Native CPU kernels, compiled on first use with the local C++ compiler.

``cpu_kernels()`` returns the compiled extension module (plain functions, for eager code; the
same kernels are also registered as ``torch.ops.slimformer.int4_linear`` / ``f32_linear`` /
``w8a8_linear`` ... for ``torch.compile``d graphs), or ``None`` (with one warning) when it cannot
be built -- no compiler, a failed build, or ``SLIMFORMER_NO_KERNELS=1`` -- in which case
callers fall back to their pure-PyTorch path, which computes the same result more slowly.

The build is cached by PyTorch under ``$TORCH_EXTENSIONS_DIR`` (default
``~/.cache/torch_extensions``); the first call in a fresh environment compiles for ~30-60 s.
The source is compiled with ``-march=native`` (the cache is per machine) and
``-ffp-contract=off``: the compiler may not fuse a multiply and an add that the source keeps
apart, so the W8A8 kernel rounds exactly as the PyTorch ops it replaces.
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
import warnings
from pathlib import Path
from types import ModuleType
from typing import Optional

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
_LOCK = threading.Lock()
_STATE: dict[str, object] = {}


CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off"]


def _name() -> str:
    # a new source or new flags get a new build
    digest = hashlib.sha1(SOURCE.read_bytes() + " ".join(CFLAGS).encode()).hexdigest()[:10]
    return f"slimformer_cpu_kernels_{digest}"


def disabled() -> bool:
    return os.environ.get("SLIMFORMER_NO_KERNELS", "").strip() not in ("", "0")


def cpu_kernels() -> Optional[ModuleType]:
    """The compiled kernel module, built on first call; ``None`` if it cannot be built."""
    if disabled():
        return None
    if "module" in _STATE:
        return _STATE["module"]  # type: ignore[return-value]
    with _LOCK:
        if "module" in _STATE:
            return _STATE["module"]  # type: ignore[return-value]
        module = None
        try:
            from torch.utils.cpp_extension import load
            log.info("compiling slimformer CPU kernels (first use only)")
            module = load(name=_name(), sources=[str(SOURCE)],
                          extra_cflags=CFLAGS,
                          extra_ldflags=["-fopenmp"], verbose=False)
        except Exception as e:  # no compiler, no ninja, build error: fall back, say so once
            warnings.warn(f"slimformer CPU kernels unavailable ({type(e).__name__}: "
                          f"{str(e).strip().splitlines()[-1] if str(e).strip() else e}); "
                          "using the slower pure-PyTorch paths", RuntimeWarning, stacklevel=2)
        if module is not None:
            _register_fakes()
        _STATE["module"] = module
        return module


def _register_fakes() -> None:
    """Shapes of the dispatcher ops (``torch.ops.slimformer.*``) for torch.compile's tracing."""
    import torch

    @torch.library.register_fake("slimformer::int4_linear")
    def _int4(x, qweight, scale, zero, group_size, zero_const):
        return x.new_empty(x.shape[0], qweight.shape[0])

    @torch.library.register_fake("slimformer::int8w_linear")
    def _int8w(x, qweight, scale, zero, group_size, zero_const):
        return x.new_empty(x.shape[0], qweight.shape[0])

    @torch.library.register_fake("slimformer::int8w_linear_cat")
    def _int8w_cat(x, qweights, scales, group_size):
        return x.new_empty(x.shape[0], sum(q.shape[0] for q in qweights))

    @torch.library.register_fake("slimformer::f32_linear")
    def _f32(x, weight):
        return x.new_empty(x.shape[0], weight.shape[0])

    @torch.library.register_fake("slimformer::decode_attention")
    def _decode_attention(q, k, v, start, first, scale):
        return q.new_empty(q.shape[0], q.shape[2], q.shape[1], q.shape[3])

    @torch.library.register_fake("slimformer::w8a8_linear")
    def _w8a8(x, w, wscale, bias, act_scale):
        return x.new_empty(x.shape[0], w.shape[0])

    @torch.library.register_fake("slimformer::w8a8_gated_mlp")
    def _w8a8_mlp(x, wgu, sgu, agu, wd, sd, bd, ad):
        return x.new_empty(x.shape[0], wd.shape[0])

"""HostTensorRecorder: what a piece of code would make the host wait for on a GPU, seen on the CPU."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Ops that read a device tensor's values back to the host on CUDA too (a sync): their output's
# size depends on the data (bincount reads the input's min and max to size its output). Scalar
# reads (_local_scalar_dense) are not listed: CPU kernels make some where the CUDA ones do not
# (F.one_hot's range checks, the unfused AdamW's step count), so the gpu tests' sync debug mode
# is what catches those.
READS_BACK = {"bincount", "nonzero", "unique", "_unique2", "unique_dim", "masked_select"}


class HostTensorRecorder(TorchDispatchMode):
    """Records every op that makes a tensor out of host data, moves one between devices, or reads
    device data back (READS_BACK).

    `torch.tensor(...)` inside a mode dispatches `lift_fresh` for the tensor it built from Python
    data; on a GPU that tensor is a blocking host->device copy. A device change is `_to_copy` or
    `copy_` with the input on another device than the output.
    """

    def __init__(self, also: tuple[str, ...] = ()):
        super().__init__()
        self.found: list[str] = []
        self.also = set(also)  # more op names to record, e.g. "_local_scalar_dense" for code without CPU-only reads

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name in ("lift_fresh", "lift_fresh_copy"):
            self.found.append(f"{func}: a tensor built from host data {tuple(args[0].shape)}")
        elif name in ("_to_copy", "copy_") and isinstance(out, torch.Tensor):
            src = args[1] if name == "copy_" else args[0]
            if src.device != out.device:
                self.found.append(f"{func}: {src.device} -> {out.device}")
        elif name in READS_BACK or name in self.also:
            self.found.append(f"{func}: reads device data back")
        return out

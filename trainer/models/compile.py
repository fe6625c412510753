"""--torch_compile / --dynamo_backend: compile the UNet with torch.compile (sd-scripts' flags, default inductor).

The UNet is compiled in place (`nn.Module.compile`): it stays the same object, so its attributes, state_dict and
the LoRA's forward hooks on its layers are untouched, and dynamo traces the hooks into the compiled graph. It must
be compiled after the LoRA is attached: dynamo does not watch for hooks added later
(torch._dynamo.config.skip_nnmodule_hook_guards). Only the UNet is compiled, it is nearly all of a step's work
(sd-scripts lets accelerate's dynamo plugin compile every prepared model). Changing shapes (buckets, sampling)
and train/eval switches recompile; dynamo then makes the shapes dynamic.

A backend whose toolchain is missing fails only when the first batch is compiled, deep in a stack trace: inductor
needs a C++ compiler on the CPU (MSVC's cl.exe on Windows, which most Windows users lack) and Triton on CUDA (not
installed with torch on Windows). So the backend is first tried on a tiny function on the training device; if that
fails, training runs uncompiled (eager) after one warning saying why and how to fix it. Compiling only makes steps
faster, so a slower run beats a stopped one. A backend name torch does not know is a typo: ConfigError.
"""

from __future__ import annotations

import logging

from trainer.errors import ConfigError, did_you_mean

log = logging.getLogger(__name__)

NO_COMPILE = "no"  # accelerate's name for "do not compile"


def check_backend(name: str) -> str:
    """The backend name as torch knows it (lower case), or ConfigError naming the ones this torch has."""
    import torch._dynamo

    backend = name.strip().lower()
    known = torch._dynamo.list_backends(exclude_tags=())
    if backend != NO_COMPILE and backend not in known:
        raise ConfigError(f"--dynamo_backend {name}: not a torch.compile backend of this torch"
                          f"{did_you_mean(backend, known)}. Available: {', '.join(known)} (inductor is the default; "
                          "eager or aot_eager need no compiler).")
    return backend


def probe_backend(backend: str, device) -> str | None:
    """Compile and run a tiny function with `backend` on `device`; the first line of the error, or None."""
    import torch

    def tiny(x):
        return torch.sin(x) * 2 + 1

    try:
        torch.compile(tiny, backend=backend)(torch.ones(8, device=device))
    except Exception as e:  # any failure means: do not compile the UNet with it
        first_line = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        return f"{type(e).__name__}: {first_line}"
    return None


def compile_unet(unet, backend: str, device) -> bool:
    """Compile `unet` in place with `backend` (already checked by `check_backend`); False when it runs eager."""
    if backend == NO_COMPILE:
        log.info("--torch_compile with --dynamo_backend no: the UNet is not compiled.")
        return False
    problem = probe_backend(backend, device)
    if problem:
        hint = ("inductor needs a C++ compiler on the CPU (on Windows: Visual Studio Build Tools, run from a "
                "'Developer Command Prompt') and Triton on a CUDA GPU (on Windows: pip install triton-windows)"
                if backend == "inductor" else "check that the backend's packages are installed")
        log.warning("--torch_compile: the %s backend does not work here (%s); training without torch.compile, "
                    "which only makes steps slower. Fix: %s; or drop --torch_compile.", backend, problem, hint)
        return False
    unet.compile(backend=backend)
    log.info("--torch_compile: the UNet is compiled with %s on the first step (this can take minutes).", backend)
    return True

"""The arithmetic a run computes in (--precision): float32, or a reduced-precision recipe under autocast.

A recipe is a base precision and the parts of the run it keeps in float32 (PARTS):
    fp32                    float32 everywhere; on a GPU with TF32 off, so that float32 means float32
    bf16                    bfloat16 autocast in training, precise BN and evaluation (no loss scaling)
    fp16                    float16 autocast with loss scaling (CUDA only)
    bf16+fp32:hyper,bn      bfloat16, the hyperlayers and every BatchNorm kept in float32
The recipe is stored in the run (RunConfig.precision, part of its identity) and replayed with it.

--precision auto takes AUTO[device type]: a reduced-precision recipe only where the paired accuracy
benchmark (bench_precision.py) has shown it non-inferior to float32 on that kind of device; float32
otherwise. On a 2-core CPU with native bfloat16, 8 paired AD versions put bfloat16's loss of BA in
[-0.051, +0.044] (not shown below 0.02) at 0.95x the speed, and 8 brain-age versions its loss of MAE in
[-0.09, +0.19] years (not shown below 0.15) (RESULTS.md, "Precision"): auto is float32.
No GPU has measured it yet: auto is float32 on CUDA too, until bench_precision.py's GPU run says more.
"""
import torch

from distributed import log
from layers import HyperLayer
from safeio import UserError

BASES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# What a recipe may keep in float32 under autocast, one part at a time (the ablation of bench_precision.py)
PARTS = {
    "hyper": "the hyperlayers: embedding, generators, generated weights and biases, and their product",
    "bn": "every BatchNorm's forward (training, precise BN, evaluation)",
    "first": "the first layer, on the raw input",
    "head": "the layers after the image features (AD fc1 and fc2, brain age its four linears)",
    "conv": "every convolution of the image network that is not a hyperlayer",
    "loss": "the loss, on float32 outputs",
    "precise-bn": "the precise-BN re-estimation pass (brain age)",
    "eval": "validation, test and prediction forward passes",
}
MODULE_PARTS = ("hyper", "bn", "first", "head", "conv")      # kept in float32 by keep_float32, on the model's modules
AUTO = {"cpu": "fp32", "cuda": "fp32"}               # what auto takes per device type (see the docstring)
PRECISIONS = ("auto",) + tuple(BASES)                # the plain choices; recipes with parts are accepted too


def parse(recipe):
    """"bf16+fp32:hyper,bn" -> ("bf16", ("hyper", "bn")), parts in PARTS' order; ValueError saying what is wrong."""
    base, _, kept = str(recipe).partition("+")
    if base not in BASES:
        raise ValueError(f"one of {', '.join(PRECISIONS)}, or a recipe such as bf16+fp32:hyper,bn")
    if not kept:
        return base, ()
    if base == "fp32" or not kept.startswith("fp32:"):
        raise ValueError(f"a recipe is bf16 or fp16, then +fp32: and the parts kept in float32 ({', '.join(PARTS)})")
    parts = kept[len("fp32:"):].split(",")
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise ValueError(f"unknown part {unknown[0] if unknown else '(none)'!r}: the parts are {', '.join(PARTS)}")
    return base, tuple(p for p in PARTS if p in parts)


def canonical(recipe):
    """One spelling per recipe (parts in PARTS' order), so that a resume compares recipes, not spellings."""
    base, parts = parse(recipe)
    return base + ("+fp32:" + ",".join(parts) if parts else "")


def base(recipe):
    """The autocast precision of a recipe: "fp32", "bf16" or "fp16"; None (a run from before precision was
    stored) is fp32."""
    return parse(recipe)[0] if recipe else "fp32"


def keeps(recipe, part):
    """Whether `recipe` keeps `part` in float32 (fp32 keeps everything)."""
    b, parts = parse(recipe) if recipe else ("fp32", ())
    return b == "fp32" or part in parts


def native_bf16(device):
    """Whether `device` computes bfloat16 natively: a GPU with bf16 units (Ampere and later), a CPU with
    AVX512-BF16 or AMX. Elsewhere bfloat16 is emulated, slower than float32."""
    if device.type == "cuda":
        try:
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # older torch: no emulation to exclude
            return torch.cuda.is_bf16_supported()
    return any(getattr(torch.cpu, f, lambda: False)() for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def unsupported(recipe, device):
    """Why `device` cannot compute in `recipe`, or None when it can: float16 (with loss scaling) is for
    CUDA, bfloat16 on CUDA needs a GPU that has it."""
    b = base(recipe)
    if b == "fp16" and device.type != "cuda":
        return "float16 with loss scaling is for CUDA; on CPU use bf16 or fp32"
    if b == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return f"{torch.cuda.get_device_name(device)} has no bfloat16; use fp16 or fp32"
    return None


def resolve_precision(name, device, quiet=False):
    """--precision -> the run's recipe on `device` (canonical; stored in its identity). auto: AUTO[device type]
    where the device computes it natively, else float32. A name that is no recipe, or one the device cannot
    compute, is a UserError naming the option. On CUDA, TF32 is switched off (allow_tf32 = False for
    matmuls and cuDNN, whose default is on): the float32 parts of every recipe are float32."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    if name == "auto":
        chosen = AUTO.get(device.type, "fp32")
        if base(chosen) == "bf16" and not native_bf16(device) or unsupported(chosen, device):
            chosen = "fp32"
        why = ("float32 until bench_precision.py shows a faster recipe as accurate on this kind of device; "
               "--precision bf16 is the option, its cost measured in RESULTS.md" if chosen == "fp32" else
               "shown as accurate as float32 on this kind of device; --precision fp32 for full precision")
        log(f"precision {chosen} (--precision auto: {why})", quiet)
        return chosen
    try:
        recipe = canonical(name)
    except ValueError as exc:
        raise UserError(f"--precision {name}: {exc}") from None
    if unsupported(recipe, device):
        raise UserError(f"--precision {name}: {unsupported(recipe, device)}")
    log(f"precision {recipe}" + (" (emulated on this CPU: slower than fp32)"
                                  if base(recipe) == "bf16" and not native_bf16(device) else ""), quiet)
    return recipe


def replay_precision(trained, device):
    """The recipe that replays a run on `device` as it was trained and tested: its own, unless the device
    cannot do it (unsupported) or the run is from before precision was stored: float32."""
    try:
        return canonical(trained) if trained and not unsupported(trained, device) else "fp32"
    except ValueError:
        return "fp32"


def autocast(device, recipe, part=None):
    """The forward pass at the recipe's precision: autocast to bfloat16 / float16, or none for fp32 and for a
    `part` ("loss", "precise-bn", "eval") that the recipe keeps in float32."""
    dtype = BASES[base(recipe)]
    enabled = dtype is not None and not (part is not None and keeps(recipe, part))
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=enabled)


def module_parts(model):
    """{part: [modules]} of MODULE_PARTS in `model`: its HyperLayers, BatchNorms, first layer (the first
    convolution or linear registered), its head (the model's `head_layers`, models.py) and its convolutions."""
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv3d, torch.nn.Linear, HyperLayer))]
    return {"hyper": [m for m in model.modules() if isinstance(m, HyperLayer)],
            "bn": [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)],
            "first": layers[:1],
            "head": [model.get_submodule(n) for n in getattr(model, "head_layers", ())],
            "conv": [m for m in model.modules() if isinstance(m, torch.nn.Conv3d)]}


def keep_float32(model, recipe):
    """Mark the modules of the recipe's kept MODULE_PARTS to run in float32 under autocast: a forward pre-hook
    turns autocast off and casts the floating inputs to float32, a forward hook turns it back on. Hooks, not a
    wrapper: the state dict, deepcopy and the module tree stay as they are. Returns `model`."""
    if not recipe or base(recipe) == "fp32":
        return model
    chosen = {id(m): m for part, ms in module_parts(model).items() if keeps(recipe, part) for m in ms}
    for m in chosen.values():
        m.register_forward_pre_hook(_enter_float32)
        m.register_forward_hook(_leave_float32, always_call=True)
    return model


_left = []   # the autocast contexts that kept modules have turned off, innermost last


def _enter_float32(module, args):
    device = next((a.device.type for a in args if torch.is_tensor(a)), "cpu")
    ctx = torch.autocast(device, enabled=False)
    ctx.__enter__()
    _left.append(ctx)
    return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def _leave_float32(module, args, output):
    _left.pop().__exit__(None, None, None)

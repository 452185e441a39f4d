"""A quantized base transformer for FLUX.1 and SD3.5 (`model.quantize`): what fits them on 24 GB.

- "4bit": the transformer is loaded as NF4 through diffusers' `BitsAndBytesConfig` (bitsandbytes,
  CUDA only; the same value means QLoRA for a language model, `loracli.llm`), as diffusers' `train_dreambooth_lora_flux.py --bnb_quantization_config_path` does.
- "fp8": the transformer's weights are stored in float8_e4m3fn and each layer is cast up to the
  training dtype for its own forward (diffusers' `enable_layerwise_casting`, the "layerwise
  upcasting" of diffusers' LoRA examples); it runs on the CPU too.

Only the frozen base is quantized: the LoRA weights train in fp32 as always, and export reads
the base again from disk, so a merged export folds the LoRA into the full-precision base.
`check` runs before a run folder is written, so a machine that cannot do it says so first.
"""

from __future__ import annotations

from loracli.errors import LoraError

CHOICES = ("", "4bit", "fp8")
OFF = 'set model.quantize = "" (a full-precision base), e.g. `--set model.quantize=`'


def check(quantize: str, family) -> None:
    """Refuse a quantization this family or this machine cannot do (error + hint, no run yet)."""
    if not quantize:
        return
    if quantize not in CHOICES:
        raise LoraError(f"model.quantize = {quantize!r} is not one of 4bit, fp8 or \"\"", OFF)
    if family.denoiser != "transformer":
        raise LoraError(f"model.quantize = {quantize!r} quantizes a FLUX or SD3.5 transformer; "
                        f"{family.name} has a UNet, which lora trains in full precision", OFF)
    import torch

    if quantize == "4bit":
        if not torch.cuda.is_available():
            raise LoraError("model.quantize = \"4bit\" needs bitsandbytes on a CUDA GPU, and "
                            "this machine has no CUDA device",
                            "set model.quantize = \"fp8\" (it also runs on the CPU) or \"\", "
                            "e.g. `--set model.quantize=fp8`")
        try:
            import bitsandbytes  # noqa: F401 - only whether it is there
        except ImportError:
            raise LoraError("model.quantize = \"4bit\" needs the bitsandbytes package, which is "
                            "not installed", "pip install bitsandbytes; or "
                            "`--set model.quantize=fp8`") from None
    if quantize == "fp8":
        from diffusers import ModelMixin

        if not (hasattr(torch, "float8_e4m3fn") and
                hasattr(ModelMixin, "enable_layerwise_casting")):
            raise LoraError("model.quantize = \"fp8\" needs torch with float8 and diffusers "
                            "with enable_layerwise_casting (diffusers 0.33 or newer)",
                            "pip install -U torch diffusers; or " + OFF)


def load_kwargs(quantize: str, compute_dtype) -> dict:
    """Extra `from_pretrained` arguments for the denoiser: the NF4 config for "4bit", or nothing."""
    if quantize != "4bit":
        return {}
    from diffusers import BitsAndBytesConfig

    return {"quantization_config": BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)}


def store(module, quantize: str, compute_dtype) -> None:
    """After the base is on its device and dtype: fp8 storage with per-layer upcasting."""
    import torch

    if quantize == "fp8":
        module.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn,
                                        compute_dtype=compute_dtype)


def is_quantized(module) -> bool:
    """Whether a loaded model is held quantized (its dtype cannot be changed with .to)."""
    return bool(getattr(module, "is_quantized", False))

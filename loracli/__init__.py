"""lora: from a folder of pictures to a LoRA that WebUI, ComfyUI and diffusers load."""

__version__ = "0.1.0"

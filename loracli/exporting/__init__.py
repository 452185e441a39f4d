"""`lora export` and `lora inspect`: conversions, metadata, loader compatibility, writers."""

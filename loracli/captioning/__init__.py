"""`lora caption`: CLIP labels ranked into captions, written as .txt files and metadata.csv."""

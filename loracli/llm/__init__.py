"""Causal language models: LoRA fine-tunes of chat, instruction and raw-text data.

The pieces, each usable on its own and called by the training loop through `task.CausalLMTask`:
`data` reads and normalises `.jsonl`/`.json` records; `templates` renders them with the model's
chat template and works out which tokens carry the loss; `batches` pads or packs them into
deterministic micro-batches; `causal` loads the base model, injects the LoRA and computes the
loss; `exports` and `gguf` write what transformers, vLLM, llama.cpp and Ollama load; `tinyllm`
builds the tiny models the tests and the demo train offline.
"""

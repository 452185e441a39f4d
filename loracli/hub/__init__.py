"""The hub: the only code that talks to the network (fetch, mirrors, the model cache, sync)."""

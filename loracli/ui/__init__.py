"""Terminal presentation for the commands: output, shared options, completion, live views."""

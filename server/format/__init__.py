"""Prompt format: render OpenAI chats to the training prompt, parse the model's answers, detokenize (pure, no I/O)."""

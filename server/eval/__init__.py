"""`agent-server eval`: measure a model's function calling through any OpenAI-compatible server.

Data files (BFCL, glaive/LLaMA-Factory sharegpt, ACEBench) are loaded into uniform :class:`Case`s
(`datasets`), sent as `/v1/chat/completions` requests with tools (`runner`), judged by BFCL's AST
rules (`judge`), and summarised (`report`) or compared before/after a fine-tune (`compare`).
"""

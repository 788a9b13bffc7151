"""Generation engines behind one interface: the built-in transformers engine and vLLM over HTTP."""

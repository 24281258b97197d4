"""The patched llama.cpp: which libllama, loading, ODP knobs and counters, perplexity, speed."""

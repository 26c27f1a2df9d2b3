"""BIGRec-style LLM teacher: prompts, generation, embeddings, grounding (``python -m teacher``).

Importing this package is cheap: torch / transformers / vllm / faiss load only inside the
functions that need them.
"""

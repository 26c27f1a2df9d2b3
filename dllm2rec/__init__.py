"""dllm2rec: distil an LLM-based recommender (BIGRec teacher) into small sequential students."""
__version__ = "0.1.0"

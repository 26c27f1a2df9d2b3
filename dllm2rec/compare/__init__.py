"""External baselines: the RecBole 1.2.1 bridge (``recbole_export``, ``recbole_runner`` run by
the optional RecBole venv, ``recbole`` = the ``python -m dllm2rec recbole`` command)."""

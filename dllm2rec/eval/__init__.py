"""Evaluation: ``metrics`` (full-ranking ranks, HR / NDCG, chunked top-k) and ``evaluate``
(sharded evaluation of a split and the ``evaluate`` command)."""

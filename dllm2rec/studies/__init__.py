"""Evidence: ``experiment`` (study grids), ``study_table`` (results over seeds), ``analyze``
(overlap, RD weights, curves), ``rankings`` (teacher / student top-k lists), ``teacher_profile``,
``latency``, ``plots``."""

"""Using a trained student: ``student`` (load a run folder), ``histories`` (request files),
``retrieval`` (top-k backends), ``recommend`` (batch top-k command), ``export`` (artefact)."""

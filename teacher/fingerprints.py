"""Phase fingerprints: the identity of each teacher phase's output.

A shard is finished for a phase only when its ``.done`` marker carries the phase's current
fingerprint, so a changed model, decoding, embedding engine or index never mixes with old parts.
Each fingerprint chains the one of the phase it reads from (generate -> embed -> ground). This
module sits below ``artifacts`` and the phases so that all of them can import it.
"""
from __future__ import annotations

from teacher.config import split_limits
from teacher.shards import fingerprint


def generate_fingerprint(cfg, data) -> str:
    return fingerprint("generate", cfg.model.base, cfg.model.adapter, cfg.model.dtype, vars(cfg.generate),
                       data.id_map_hash, data.domain, split_limits(cfg))


def embed_fingerprint(cfg, data) -> str:
    if cfg.query.kind != "generated":  # history queries: only the catalogue titles are embedded
        src = ("sentence", cfg.embed.model) if cfg.embed.engine == "sentence" else (cfg.model.base, cfg.model.dtype, cfg.embed.engine)
        return fingerprint("embed-items", *src, data.id_map_hash)
    if cfg.embed.engine == "sentence":  # the LLM plays no part in these vectors
        return fingerprint("embed", "sentence", cfg.embed.model, generate_fingerprint(cfg, data))
    return fingerprint("embed", cfg.model.base, cfg.model.dtype, cfg.embed.engine,
                       generate_fingerprint(cfg, data))


def ground_fingerprint(cfg, data) -> str:
    g = cfg.ground
    collab = () if g.collab == "none" else (g.collab, g.gamma, g.collab_dim, g.collab_neighbours)
    # BIGRec (generated) fingerprints stay exactly as before, so existing shards remain valid
    query = () if cfg.query.kind == "generated" else ("query", cfg.query.kind, cfg.query.decay, split_limits(cfg))
    return fingerprint("ground", g.index, g.top_n, g.nlist, g.nprobe, g.hnsw_m, g.ef_search, *collab, *query,
                       embed_fingerprint(cfg, data))

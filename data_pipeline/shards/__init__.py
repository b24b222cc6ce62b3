"""Shard + manifest mechanics shared by the soft-label and candidate formats (docs/architecture.md).

On disk, one directory per artifact:

    shard-r{rank:03d}-{index:06d}.safetensors   arrays with a leading record dimension
    manifest.r{rank:03d}.json                   one per writer rank, rewritten (temp + os.replace) after
                                                every shard: {format_version, kind, rank, world_size,
                                                meta, schema, shards, records, final}
    manifest.json                               written once by `finalize` (rank 0, after a barrier):
                                                {format_version, kind, meta, schema, writer_world_size,
                                                shards: [{file, index, rank, records, bytes, sha256}],
                                                total_records, final: true}

Atomicity: a shard is serialised in memory, written to `<name>.tmp`, fsynced and `os.replace`d; only
then is it listed in its rank's manifest (itself replaced atomically). So a reader never sees half a
shard, and a shard a manifest lists is complete unless something outside the writer damaged it (which
the reader catches: size, sha256, parse and record count are checked on open).

Global shard order (the rule every reader uses, follow mode or not): round-robin over writer ranks,
i.e. sorted by (index, rank): r0/0, r1/0, ..., r{W-1}/0, r0/1, r1/1, ... A rank that is final and has no
shard `index` is skipped in that round. While writing is ongoing, ordinal j is assigned only once every
slot before it is settled: each earlier (index, rank) slot either holds a committed shard or belongs to
a rank that is final with fewer shards. A missing slot of a still-writing rank stops the known prefix
there, so ordinals never change as more shards arrive and every consumer agrees on them.

Consumer streams: stream c = rank * max(num_workers, 1) + worker of C = world_size * max(num_workers, 1)
reads the shards with ordinal j ≡ c (mod C), in increasing j. Disjoint and complete by construction.

Modules: format (names, helpers), writer, manifest (order, finalize, read), reader, loader.
"""

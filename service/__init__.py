"""radcache.service: the CLI and (later) the HTTP service composing radcache.embeddings."""

"""radcache.clients: talk to a radcache service without torch."""

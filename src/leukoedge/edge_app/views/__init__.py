"""One blueprint per concern: pages (ui, history), files (media), JSON (api, ops), login (auth)."""

"""Files and model specs: integrity manifests and atomic writes, model specs (hub, folder,
embedded) and their fetching, process helpers (logs, device). May import nothing of refrag."""

"""The system around the method: config, storage, data, training, tuning, evaluation (Ray)."""

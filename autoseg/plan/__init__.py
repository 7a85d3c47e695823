"""Planning: the dataset fingerprint, topology building blocks, the timed compute probe and cost model, compute-budget
fitting. Above ``autoseg.train`` because the probe times training steps (losses, augmentation); may import it and below."""

"""The data path: intake (consumer, decode, batch, topics), landing (landing, fencing, retry),
positioning (positioning, offsets) and the worker that orders them."""

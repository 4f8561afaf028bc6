"""The names of the port's files in a run folder: light, so that the trainer can check a folder
before torch loads (:mod:`tl_torch.checkpoint` writes and reads them)."""

#: The trained model of a run (what predict and convert read).
MODEL_FILE = "model.ckpt"
#: The checkpoint of the last finished epoch, in ``checkpoints/`` (what --resume reads).
LAST_CHECKPOINT = "last"
#: The fine-tuned base as a Keras weights file.
BASE_WEIGHTS_FILE = "base.weights.h5"

"""Framework-free code shared by the Keras reference and the PyTorch port.

Nothing here imports TensorFlow or PyTorch: the experiment settings, the image file lists and the
test split, the offline demo data and weights, and the run outputs are defined once, so the two
trainers cannot drift apart.
"""

"""What tests share, by what it does (import the module you need):

- ``checkpoints``: a root's committed steps and step folders, a flipped byte, a shard of a
  checkpoint, and one comparison of tensors that checks keys as well as values.
"""

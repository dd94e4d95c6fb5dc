"""The user engine: a dm-thin pool in Python, exported as block devices over FUSE + loop."""
